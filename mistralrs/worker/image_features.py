"""Image features on the packed token axis: the model runner's side of vision models.

A sequence with images carries the model's `ImageInputs` (mistralrs/vision/base.py). `ImageFeatureCache.embeddings`
builds a step's input embeddings: the text embeddings of the packed tokens, with the rows of prompt tokens equal to
the model's `image_token_id` replaced by that image token's feature row (the k-th image token of a prompt takes row
k of `encode_images`). A sequence's features are computed once, at the first chunk that reaches an image token
(several sequences' images in one call when their tensors stack), kept while later chunks of its prefill still hold
image tokens (a chunk may split an image's run), and freed once a chunk passed its last image token. Positions the
prefix cache already holds are never computed, so a sequence whose images are all cached never encodes them.

Cross-attention models (`cross_attention_state`, Mllama) splice nothing: a sequence's state (its image keys/values
and prompt mask, `cross_attention_state(prompt_ids, inputs)`) is computed once, at its first step, kept for its whole
life (its decode tokens attend to the images too) and freed with the sequence; each step's chunk contexts go to
`ForwardBatch.cross_attention` (`cross_attention_for`).

M-RoPE models (`rope_positions` not None) get `[3, num_tokens]` positions per step (`rope_positions_for`), from a
table computed once per sequence and kept for its life (decode tokens continue it by the table's delta).

The runner's steps read a sequence's prompt and images from the cache's record of it (`SeqImagePrompt`), made at
the sequence's first step from a `StepImages` message: the head of a tensor-parallel group sends that message to the
other ranks with the step (its image tensors once per sequence), so every rank keeps, computes and frees the same
state in the same steps (`ImageFeatureCache.changes` on the head, `apply` everywhere).

Only the model's contract is used here (duck-typed, the worker floor does not import `vision`): `image_token_id`,
`encode_images(inputs)`, `embed(input_ids)`, `rope_positions(prompt_ids, inputs)`, and the inputs'
`num_image_tokens` and `tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class SeqImagePrompt:
    """What the image side of a step reads of a sequence besides its chunk (sent to the other ranks once)."""

    prompt_token_ids: list[int]  # its prompt (image token positions, M-RoPE tables, cross-attention masks)
    images: object | None  # its ImageInputs (tensors on the CPU); None: a sequence without images


@dataclass(frozen=True)
class StepImages:
    """How a step changes the cache's sequences: the message the head sends with the step's `StepInputs`."""

    new: dict[int, SeqImagePrompt]  # seq_id -> sequences scheduled for the first time
    finished_seq_ids: list[int]  # sequences gone since the previous step: their state is freed


@dataclass(frozen=True)
class _ImageSeq:
    """A sequence as the cache's steps read it: its id, its prompt and where its chunk starts."""

    seq_id: int
    prompt_token_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True)
class _ImageChunk:
    """One scheduled chunk as the cache's steps read it (the fields of a ScheduledSequence they use)."""

    seq: _ImageSeq
    num_new_tokens: int


@dataclass
class _SeqImages:
    """One sequence's image state."""

    inputs: object  # its ImageInputs
    token_positions: list[int]  # prompt indices of its image tokens, in order (row k of the features <-> k-th)
    features: torch.Tensor | None = None  # [len(token_positions), hidden] while its prefill still needs them
    done: bool = False  # its prefill has passed the last image token: features freed


@dataclass
class ImageFeatureCache:
    """Per-sequence image features and M-RoPE tables of a vision model (see the module docstring)."""

    model: nn.Module
    _seqs: dict[int, _SeqImages] = field(default_factory=dict)
    _rope: dict[int, tuple[torch.Tensor, int] | None] = field(default_factory=dict)  # seq_id -> (table, delta)
    _cross: dict[int, object] = field(default_factory=dict)  # seq_id -> the model's cross-attention state
    _prompts: dict[int, SeqImagePrompt] = field(default_factory=dict)  # seq_id -> every live sequence's record

    def changes(self, scheduled: list, live_seq_ids) -> StepImages:
        """The head: the step's message, before it runs: the records of the `scheduled` sequences (with their
        ImageInputs in `live_seq_ids[seq_id].images`) seen for the first time, and the sequences no longer live."""
        new = {s.seq.seq_id: SeqImagePrompt(s.seq.prompt_token_ids, live_seq_ids[s.seq.seq_id].images)
               for s in scheduled if s.seq.seq_id not in self._prompts}
        return StepImages(new, [seq_id for seq_id in self._prompts if seq_id not in live_seq_ids])

    def apply(self, step: StepImages) -> None:
        """Every rank: frees the finished sequences' state and records the new ones."""
        self.forget(step.finished_seq_ids)
        self._prompts.update(step.new)

    def forget(self, seq_ids) -> None:
        """Drops the state of sequences that are gone (finished, aborted, failed)."""
        for seq_id in seq_ids:
            for table in (self._seqs, self._rope, self._cross, self._prompts):
                table.pop(seq_id, None)

    def step_inputs(self, seq_ids: list[int], chunks: list) -> tuple[list[_ImageChunk], dict[int, object]]:
        """The step's chunks (`SeqChunk`s of the recorded sequences `seq_ids`) as the methods below read them, and
        seq_id -> ImageInputs of those with images."""
        scheduled = [_ImageChunk(_ImageSeq(seq_id, self._prompts[seq_id].prompt_token_ids, chunk.start_pos),
                                 len(chunk.token_ids)) for seq_id, chunk in zip(seq_ids, chunks)]
        images = {seq_id: self._prompts[seq_id].images for seq_id in seq_ids
                  if self._prompts[seq_id].images is not None}
        return scheduled, images

    @property
    def seq_ids(self) -> set[int]:
        """The sequences whose record the cache holds (tests check that every rank holds the same)."""
        return set(self._prompts)

    def has_features(self, seq_id: int) -> bool:
        """Whether the sequence's features are held now (tests check that they are freed)."""
        state = self._seqs.get(seq_id)
        return state is not None and state.features is not None

    def embeddings(self, input_ids: torch.Tensor, scheduled: list, images: dict[int, object],
                   query_start_locs: list[int]) -> torch.Tensor | None:
        """The step's input embeddings with image features spliced in; None when no chunk holds an image token
        (the model then embeds the tokens itself). `scheduled`: the step's chunks (ScheduledSequence-like: `seq` with
        `seq_id`, `prompt_token_ids`, `num_computed_tokens`, and `num_new_tokens`); `images`: seq_id -> ImageInputs
        of the sequences with images."""
        if self.uses_cross_attention:
            return None
        wanted = []  # (packed index, seq state, feature row)
        needs_encoding = []
        for s, chunk in enumerate(scheduled):
            seq = chunk.seq
            inputs = images.get(seq.seq_id)
            if inputs is None:
                continue
            state = self._state(seq.seq_id, seq.prompt_token_ids, inputs)
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_new_tokens
            rows = [(k, p) for k, p in enumerate(state.token_positions) if start <= p < end]
            if rows and state.features is None:
                needs_encoding.append(state)
            wanted.extend((query_start_locs[s] + p - start, state, k) for k, p in rows)
            if not state.token_positions or end > state.token_positions[-1]:
                state.done = True
        if not wanted:
            self._free_done()
            return None
        self._encode(needs_encoding)
        embeds = self.model.embed(input_ids)
        index = torch.tensor([i for i, _, _ in wanted], device=embeds.device)
        rows = torch.cat([state.features[k:k + 1] for _, state, k in wanted])
        embeds = embeds.index_copy(0, index, rows.to(device=embeds.device, dtype=embeds.dtype))
        self._free_done()
        return embeds

    @property
    def uses_cross_attention(self) -> bool:
        """Whether the model reads images through cross-attention (nothing spliced into the embeddings)."""
        return hasattr(self.model, "cross_attention_state")

    def has_cross_attention(self, seq_id: int) -> bool:
        """Whether the sequence's cross-attention state is held now (tests check that it is freed)."""
        return seq_id in self._cross

    def cross_attention_for(self, scheduled: list, images: dict[int, object]) -> list[object | None] | None:
        """Each scheduled sequence's cross-attention context of its chunk (None for a sequence without images);
        None when the model has no cross-attention or no sequence has images."""
        if not self.uses_cross_attention or not any(s.seq.seq_id in images for s in scheduled):
            return None
        contexts = []
        for chunk in scheduled:
            seq = chunk.seq
            inputs = images.get(seq.seq_id)
            if inputs is None:
                contexts.append(None)
                continue
            if seq.seq_id not in self._cross:
                self._cross[seq.seq_id] = self.model.cross_attention_state(seq.prompt_token_ids, inputs)
            contexts.append(self._cross[seq.seq_id].chunk(seq.num_computed_tokens, chunk.num_new_tokens))
        return contexts

    def _state(self, seq_id: int, prompt: list[int], inputs) -> _SeqImages:
        state = self._seqs.get(seq_id)
        if state is None or state.inputs is not inputs:
            image_token = self.model.image_token_id
            positions = [i for i, t in enumerate(prompt) if t == image_token]
            if len(positions) != sum(inputs.num_image_tokens):
                raise ValueError(f"the prompt holds {len(positions)} image tokens for "
                                 f"{sum(inputs.num_image_tokens)} image feature rows")
            state = self._seqs[seq_id] = _SeqImages(inputs, positions)
        if state.done and state.features is None:
            state.done = False  # recomputed from the start (preempted): encode again when reached
        return state

    def _encode(self, states: list[_SeqImages]) -> None:
        """Encodes the states' images: one `encode_images` call per group of sequences whose tensors stack."""
        groups: dict[tuple, list[_SeqImages]] = {}
        for state in states:
            key = tuple(sorted((name, tuple(t.shape[1:]), t.dtype) for name, t in state.inputs.tensors.items()))
            groups.setdefault(key, []).append(state)
        for group in groups.values():
            if len(group) == 1:
                group[0].features = self.model.encode_images(group[0].inputs)
                continue
            merged = type(group[0].inputs)(
                {name: torch.cat([s.inputs.tensors[name] for s in group]) for name in group[0].inputs.tensors},
                [n for s in group for n in s.inputs.num_image_tokens], "batch")
            features = self.model.encode_images(merged)
            for state, part in zip(group, features.split([sum(s.inputs.num_image_tokens) for s in group])):
                state.features = part

    def _free_done(self) -> None:
        for state in self._seqs.values():
            if state.done:
                state.features = None

    def rope_positions_for(self, scheduled: list, images: dict[int, object],
                           positions: torch.Tensor) -> torch.Tensor | None:
        """`[3, num_tokens]` M-RoPE positions of the step (None when the model has none for any sequence)."""
        tables = []
        for chunk in scheduled:
            seq = chunk.seq
            if seq.seq_id not in self._rope:
                self._rope[seq.seq_id] = self.model.rope_positions(seq.prompt_token_ids, images.get(seq.seq_id))
            tables.append(self._rope[seq.seq_id])
        if all(t is None for t in tables):
            return None
        pieces = []
        for chunk, table in zip(scheduled, tables):
            start = chunk.seq.num_computed_tokens
            index = torch.arange(start, start + chunk.num_new_tokens)
            if table is None:
                pieces.append(index.expand(3, -1))
                continue
            rope, delta = table
            prompt_len = rope.shape[1]
            chunk = torch.where(index < prompt_len, torch.zeros_like(index), index + delta).expand(3, -1).clone()
            in_prompt = index < prompt_len
            chunk[:, in_prompt] = rope[:, index[in_prompt]].to(chunk.dtype)
            pieces.append(chunk)
        return torch.cat(pieces, dim=1).to(positions.device)
