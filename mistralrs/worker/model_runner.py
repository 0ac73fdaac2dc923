"""Runs one scheduled step: packed tensors in, one sampled token per finished chunk out.

Under tensor parallelism (mistralrs/engine/tensor_parallel.py) the head's runner sends each step's `StepInputs`
to the other ranks over its `peers` channel before computing it, and every other rank's runner `replay`s them:
the same model calls (the forward, then the logits of the sampled rows, which a vocab-parallel LM head gathers),
without sampling. A vision model's step carries its `StepImages` (worker/image_features.py): the sequences seen for
the first time, with their image tensors, and those gone, so every rank keeps the same image state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.core import ScheduledSequence, SchedulerOutput
from mistralrs.worker.device_map import layer_devices
from mistralrs.sample import SampledToken, Sampler, SamplingParams, SamplingRow
from mistralrs.worker.cpu_threads import CpuThreadChooser
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.host_memory import release_after_step
from mistralrs.worker.image_features import ImageFeatureCache, StepImages
from mistralrs.worker.options import ExecutionOptions, apply_execution_options

KEEP_ALIVE_INTERVAL_S = 5.0  # a tensor-parallel head idle this long tells the other ranks it is alive
KEEP_ALIVES_PER_TIMEOUT = 4  # keep-alives the head sends at least within the ranks' collective timeout


@dataclass
class SeqSampling:
    """How one sequence runs and samples: its request's parameters, its own RNG (None when greedy), its adapters
    and its images."""

    params: SamplingParams
    generator: torch.Generator | None
    adapters: tuple[str, ...] | None = None  # the sequence's LoRA adapter set (None: the model's active set)
    images: object | None = None  # the request's ImageInputs (mistralrs/vision/base.py); None: no image


@dataclass(frozen=True)
class ChunkOwner:
    """What the model's side of a step reads of a chunk's sequence (the X-LoRA runtime's per-sequence state)."""

    seq_id: int
    num_output_tokens: int


@dataclass
class StepInputs:
    """Everything a rank's model needs to compute one step (what the head broadcasts under tensor parallelism):
    per scheduled chunk, in the step's order, its tokens and block table, its sequence, its adapter set and
    whether it ends in a sampled row; for a vision model, how the step changes the image state."""

    chunks: list[SeqChunk]
    owners: list[ChunkOwner]
    adapter_sets: list[tuple[str, ...] | None]  # None: the model's active set
    sample: list[bool]
    images: StepImages | None = None  # a vision model's new and finished sequences; None: a text model

    @classmethod
    def of(cls, output: SchedulerOutput, sampling: dict[int, SeqSampling],
           images: ImageFeatureCache | None = None) -> StepInputs:
        """The inputs of the scheduled step `output` (`images`: a vision model's cache, whose changes it carries)."""
        chunks, owners = [], []
        for scheduled in output.scheduled:
            seq = scheduled.seq
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids[start:start + scheduled.num_new_tokens]
            chunks.append(SeqChunk(tokens, start, list(seq.block_ids), seq.num_prompt_tokens))
            owners.append(ChunkOwner(seq.seq_id, seq.num_output_tokens))
        return cls(chunks, owners, [sampling[s.seq.seq_id].adapters for s in output.scheduled],
                   [s.sample for s in output.scheduled],
                   None if images is None else images.changes(output.scheduled, sampling))

    def scheduled(self) -> list[ScheduledSequence]:
        """Stand-ins for the step's ScheduledSequences on a rank that holds no sequences (the adapter runtime reads
        `seq.seq_id` and `seq.num_output_tokens`)."""
        return [ScheduledSequence(owner, len(chunk.token_ids), sample)
                for chunk, owner, sample in zip(self.chunks, self.owners, self.sample)]


class StepPeers(Protocol):
    """The other ranks of a tensor-parallel group, as the head's runner sees them."""

    def send_step(self, step: StepInputs) -> None:
        """Hand the step to every other rank before the head computes it."""

    def step_failed(self, exc: Exception) -> None:
        """The head's step raised `exc` (the ranks may have parted ways); raises the group's error."""

    def keep_alive(self) -> None:
        """Tell the other ranks, while no step runs, that the head is alive."""


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler, and runs the model the way `options` say (applied to
    the model here: MoE backend, fused decoder layers; per step: attention backend, CPU thread policy)."""

    max_draft_tokens = 0  # draft tokens a decoding sequence may verify per step (speculative runners only)

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device, options: ExecutionOptions, peers: StepPeers | None = None) -> None:
        self.model = model
        self.peers = peers  # the head of a tensor-parallel group: the other ranks; None: a single process
        self.options = options
        apply_execution_options(model, options)
        self.block_size = block_size
        self.device = device
        spec = model.kv_cache_spec()
        self.kv_caches = allocate_kv_caches(spec, num_blocks, block_size, kv_dtype,
                                            layer_devices(model, spec.num_layers, device))
        self.sampler = Sampler()
        self.adapters = adapter_runtime_of(model)  # per-token adapter weights; None without separate adapters
        self.cpu_threads = CpuThreadChooser(device, options.cpu_threads)  # see worker/cpu_threads.py
        # a vision model's per-sequence image features and M-RoPE tables; None for a text model
        self.images = ImageFeatureCache(model) if hasattr(model, "encode_images") else None

    @property
    def idle_interval(self) -> float | None:
        """Seconds the engine thread may wait for work before calling `idle` (None: it may wait for ever)."""
        if self.peers is None:
            return None
        return min(KEEP_ALIVE_INTERVAL_S, self.options.tp_timeout_s / KEEP_ALIVES_PER_TIMEOUT)

    def idle(self) -> None:
        """Called by the engine thread every `idle_interval` seconds while no step runs."""
        if self.peers is not None:
            self.peers.keep_alive()

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, sampling: dict[int, SeqSampling]) -> dict[int, list[SampledToken]]:
        """Compute the scheduled chunks and sample for those that reached their sequence's end: the tokens each
        sequence gained in the step, in order (one here; a speculative runner may give several)."""
        step = StepInputs.of(output, sampling, self.images)
        if self.peers is not None:
            self.peers.send_step(step)
        batch = self.build_batch(step.chunks)
        with self.cpu_threads.step(batch.num_tokens):
            try:
                return self._forward_and_sample(batch, step, output, sampling)
            except Exception as exc:
                if self.peers is not None:
                    self.peers.step_failed(exc)
                raise
            finally:
                release_after_step(batch.num_tokens, self.device)

    @torch.inference_mode()
    def replay(self, step: StepInputs) -> None:
        """A rank other than the head: the model calls of the head's step (forward, then the sampled rows'
        logits), whose results the head samples from."""
        batch = self.build_batch(step.chunks)
        with self.cpu_threads.step(batch.num_tokens):
            embeds = self._image_inputs(batch, step)
            hidden = self.hidden_states(batch, step.scheduled(), step.adapter_sets, embeds)
            self._sampled_logits(batch, hidden, step.sample)
        release_after_step(batch.num_tokens, self.device)

    def build_batch(self, chunks: list[SeqChunk]) -> ForwardBatch:
        """The step's `ForwardBatch` of `chunks` over this runner's KV cache."""
        return ForwardBatch.build(chunks, self.block_size, self.kv_caches, self.device,
                                  self.options.attention_backend)

    def hidden_states(self, batch: ForwardBatch, scheduled: list, adapter_sets: list[tuple[str, ...] | None],
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on `batch` (one chunk per `scheduled[i]`, with the adapters `adapter_sets[i]`; None: the
        active set; `inputs_embeds`: a vision model's embeddings with image features spliced in); returns the
        hidden states `[num_tokens, hidden]`."""
        if self.adapters is not None:
            return self.adapters.forward(self.model, batch, scheduled, adapter_sets)
        with batch.active():
            if inputs_embeds is None:
                return self.model(batch.input_ids, batch.positions, batch)
            return self.model(batch.input_ids, batch.positions, batch, inputs_embeds=inputs_embeds)

    def _forward_and_sample(self, batch: ForwardBatch, step: StepInputs, output: SchedulerOutput,
                            sampling: dict[int, SeqSampling]) -> dict[int, list[SampledToken]]:
        embeds = self._image_inputs(batch, step)
        hidden = self.hidden_states(batch, output.scheduled, step.adapter_sets, embeds)
        sample_rows, logits = self._sampled_logits(batch, hidden, [s.sample for s in output.scheduled])
        if logits is None:
            return {}
        rows = []
        for i in sample_rows:
            seq = output.scheduled[i].seq
            seq_sampling = sampling[seq.seq_id]
            rows.append(SamplingRow(seq_sampling.params, seq.all_token_ids, seq.num_prompt_tokens,
                                    seq_sampling.generator))
        tokens = self.sampler(logits, rows, private=True)  # the LM head's fresh output, read no more
        return {output.scheduled[i].seq.seq_id: [tok] for i, tok in zip(sample_rows, tokens)}

    def _sampled_logits(self, batch: ForwardBatch, hidden: torch.Tensor,
                        sample: list[bool]) -> tuple[list[int], torch.Tensor | None]:
        """The chunks that end in a sampled row (indices into the step) and their rows' logits; None when no chunk
        does. Every rank of a tensor-parallel group makes this call (a vocab-parallel LM head gathers)."""
        rows = [i for i, sampled in enumerate(sample) if sampled]
        if not rows:
            return rows, None
        index = batch.last_token_indices[torch.tensor(rows, device=batch.last_token_indices.device)]
        return rows, self.model.compute_logits(hidden[index])

    def _image_inputs(self, batch: ForwardBatch, step: StepInputs) -> torch.Tensor | None:
        """A vision model's step (None for a text model): its input embeddings with image features spliced in (None:
        plain token embeddings), `batch.rope_positions` for M-RoPE models and `batch.cross_attention` for
        cross-attention models (worker/image_features.py). Head and replaying ranks alike."""
        if self.images is None:
            return None
        self.images.apply(step.images)
        scheduled, images = self.images.step_inputs([owner.seq_id for owner in step.owners], step.chunks)
        batch.rope_positions = self.images.rope_positions_for(scheduled, images, batch.positions)
        batch.cross_attention = self.images.cross_attention_for(scheduled, images)
        return self.images.embeddings(batch.input_ids, scheduled, images, batch.query_start_locs)
