"""The per-step context the model's attention layers read: packed token tensors plus paged-KV metadata.

The model runner describes one step as a list of `SeqChunk`s (one per scheduled sequence) and calls
`ForwardBatch.build`. Everything that attention needs (flat KV slots for the new tokens, gather indices that
read each sequence's context back through its block table, masks) is computed there once per step, so the
layers run no Python loops and no host syncs.

Layout conventions:
- The packed token axis concatenates the chunks in order: token `t` of chunk `s` is at `query_start_locs[s] + t`.
- The KV cache of a layer is a pair `(k, v)`, each `[num_blocks * block_size, num_kv_heads, head_dim]`; the K/V of
  position `p` of a sequence lives at flat slot `block_ids[p // block_size] * block_size + p % block_size`.
- The "padded" layout used by the batched attention path is `[num_seqs, max_query_len]` (queries) by
  `[num_seqs, max_context_len]` (keys); padding query rows are given position 0 so they attend to one valid key
  and never produce NaN; their output is dropped.

The running step's batch: layers that are not handed the batch (a `Linear`'s adapter hooks) read it through
`ForwardBatch.current()`, set by whoever runs the model within `with batch.active():` (the model runner, the
adapter runtime). It is the package's one sanctioned global, a context variable (so each thread, the engine's
included, sees only its own step); outside such a block it is None.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace

import torch

ATTENTION_BACKENDS = ("sdpa", "reference")

_ACTIVE: ContextVar[ForwardBatch | None] = ContextVar("mistralrs_active_forward_batch", default=None)  # see `active`


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    token_ids: list[int]  # the new tokens computed this step (at least one)
    start_pos: int  # position of token_ids[0] (== tokens of this sequence already in the KV cache)
    block_ids: list[int]  # the sequence's block table, covering at least start_pos + len(token_ids) tokens
    prompt_len: int = 0  # the sequence's prompt length (LongRoPE picks its factors by it, see layers/rotary.py)


@dataclass
class KVCacheSpec:
    """Shape of a model's paged KV cache (one K and one V tensor per layer).

    A model that caches something other than per-head K and V declares it through the widths: multi-head latent
    attention (DeepSeek) caches one "head" of `kv_lora_rank + qk_rope_head_dim` features per token in K and
    nothing in V (`v_head_dim=0`), so the runner, the block manager and the cache sizing stay generic.
    """

    num_layers: int  # decoder layers that own a KV cache
    num_kv_heads: int  # key/value heads per layer
    head_dim: int  # features per head of K (and of V unless v_head_dim says otherwise)
    v_head_dim: int | None = None  # features per head of V; None: head_dim; 0: no V cache (K holds everything)

    def __post_init__(self) -> None:
        if self.v_head_dim is not None and self.v_head_dim < 0:
            raise ValueError(f"KVCacheSpec.v_head_dim must be >= 0 or None, got {self.v_head_dim}")

    @property
    def value_dim(self) -> int:
        """Features per head of V (`v_head_dim`, defaulting to `head_dim`)."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes that one block of `block_size` tokens takes across all layers, K and V."""
        element_size = torch.empty((), dtype=dtype).element_size()
        features = self.head_dim + self.value_dim
        return self.num_layers * block_size * self.num_kv_heads * features * element_size


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU backed by an anonymous memory map, whose pages the kernel supplies already
    zeroed on first touch, so that cache memory becomes resident only as sequences fill it (a zero fill would
    make the whole cache resident at start-up)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, numel * dtype.itemsize)
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str | Sequence[torch.device],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-filled `(k, v)` per layer: k `[num_blocks * block_size, num_kv_heads, head_dim]`, v the same with
    `spec.value_dim` features (an empty tensor when the spec has no V cache); on `device`, or on `device[i]` for
    layer i when given one device per layer (a device-mapped model).

    Zero filling matters: masked-out cache slots are still read by the batched path and must hold finite values.
    """
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
    devices = [torch.device(device)] * spec.num_layers if isinstance(device, (str, torch.device)) \
        else [torch.device(d) for d in device]
    if len(devices) != spec.num_layers:
        raise ValueError(f"allocate_kv_caches: {len(devices)} devices given for {spec.num_layers} layers")
    k_shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
    v_shape = (num_blocks * block_size, spec.num_kv_heads, spec.value_dim)
    return [(_zeros(k_shape, dtype, d), _zeros(v_shape, dtype, d)) for d in devices]


@dataclass
class ForwardBatch:
    """One step's packed inputs and the paged-attention metadata derived from them (see module docstring)."""

    input_ids: torch.Tensor  # [num_tokens] int64, packed, no padding axis
    positions: torch.Tensor  # [num_tokens] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot each new token's K/V is written to
    last_token_indices: torch.Tensor  # [num_seqs] int64, packed index of each chunk's last token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), [num_blocks * block_size, kv_heads, dim]
    block_size: int  # tokens per KV block
    query_start_locs: list[int]  # [num_seqs + 1] packed offset of each chunk; the last entry is num_tokens
    context_lens: list[int]  # [num_seqs] tokens of each sequence visible after this step (start_pos + query len)
    prompt_lens: list[int]  # [num_seqs] each sequence's prompt length (0 when the caller did not give it)
    block_tables: list[list[int]]  # [num_seqs] block ids covering each sequence's context (trimmed to need)
    max_query_len: int  # longest chunk this step
    max_context_len: int  # longest context this step
    gather_indices: torch.Tensor  # [num_seqs * max_context_len] int64, flat slot of context position j of seq s
    query_pad_indices: torch.Tensor | None  # [num_tokens] int64 index into num_seqs * max_query_len; None: no padding
    attention_backend: str = "sdpa"  # "sdpa" (batched fast path) or "reference" (per-sequence plain twin)
    contiguous_start: int | None = None  # first flat slot when one sequence's context is consecutive slots, else None
    # per packed token, a weight per separately loaded adapter: [num_tokens, num_adapters] (LoRA: 1 for each adapter
    # of the token's request) or [num_tokens, num_lora_layers, num_adapters] (layerwise X-LoRA scalings); None: no
    # adapter applies. Set by the adapter runtime (mistralrs/adapters/runtime.py), read by every LoraHook and
    # ExpertLoraHook through `ForwardBatch.current()`.
    adapter_weights: torch.Tensor | None = None
    # M-RoPE models (Qwen2-VL): [3, num_tokens] int64 (temporal, height, width) position of each packed token, set
    # by the model runner from the model's `rope_positions`; None: `positions` on every axis.
    rope_positions: torch.Tensor | None = None
    # per packed token, the bidirectional block it belongs to, -1 for none ([num_tokens] int64): the tokens of one
    # block in one chunk see each other both ways (Gemma 3's image-token runs). Set by a model for its decoder with
    # `with_bidirectional_blocks`; read by `attention_mask` and the reference attention. None: causal everywhere.
    bidirectional_blocks: torch.Tensor | None = None
    # cross-attention models (Mllama): per sequence of the step, the model's cross-attention context of its chunk
    # (image keys/values kept for the request and the chunk's mask rows), None for a sequence without images; set by
    # the model runner from the model's `cross_attention_state`. None: no sequence has images.
    cross_attention: list[object | None] | None = None
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, init=False, repr=False)  # per window
    _placed: dict[torch.device, ForwardBatch] = field(default_factory=dict, init=False, repr=False)  # see `on`

    @property
    def num_seqs(self) -> int:
        """Chunks (sequences) in this step."""
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        """Tokens on the packed axis."""
        return self.query_start_locs[-1]

    @property
    def query_lens(self) -> list[int]:
        """[num_seqs] new tokens of each chunk."""
        locs = self.query_start_locs
        return [locs[i + 1] - locs[i] for i in range(self.num_seqs)]

    @classmethod
    def build(
        cls,
        chunks: list[SeqChunk],
        block_size: int,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device | str,
        attention_backend: str = "sdpa",
    ) -> ForwardBatch:
        """Packs `chunks` and precomputes slots, gather indices and padding indices on `device`."""
        _validate(chunks, block_size, attention_backend)
        query_lens = [len(c.token_ids) for c in chunks]
        context_lens = [c.start_pos + n for c, n in zip(chunks, query_lens)]
        num_seqs, max_query_len, max_context_len = len(chunks), max(query_lens), max(context_lens)
        blocks_needed = [-(-n // block_size) for n in context_lens]
        block_tables = [list(c.block_ids[:n]) for c, n in zip(chunks, blocks_needed)]
        max_blocks = max(blocks_needed)

        input_ids: list[int] = []
        positions: list[int] = []
        flat_context_index: list[int] = []  # per token: s * max_context_len + position
        pad_index: list[int] = []  # per token: s * max_query_len + index within its chunk
        query_starts = [0]
        for s, chunk in enumerate(chunks):
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_pos, context_lens[s]))
            row = s * max_context_len
            flat_context_index.extend(range(row + chunk.start_pos, row + context_lens[s]))
            pad_index.extend(range(s * max_query_len, s * max_query_len + query_lens[s]))
            query_starts.append(query_starts[-1] + query_lens[s])
        num_tokens = query_starts[-1]

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        padded_tables = as_tensor([t + [0] * (max_blocks - len(t)) for t in block_tables])  # [num_seqs, max_blocks]
        offsets = torch.arange(block_size, dtype=torch.int64, device=device)
        gather = (padded_tables.unsqueeze(-1) * block_size + offsets).view(num_seqs, max_blocks * block_size)
        gather_indices = gather[:, :max_context_len].reshape(-1)
        slot_mapping = gather_indices[as_tensor(flat_context_index)]
        query_pad_indices = as_tensor(pad_index) if num_tokens != num_seqs * max_query_len else None
        return cls(
            input_ids=as_tensor(input_ids),
            positions=as_tensor(positions),
            slot_mapping=slot_mapping,
            last_token_indices=as_tensor([q - 1 for q in query_starts[1:]]),
            kv_caches=kv_caches,
            block_size=block_size,
            query_start_locs=query_starts,
            context_lens=context_lens,
            prompt_lens=[c.prompt_len for c in chunks],
            block_tables=block_tables,
            max_query_len=max_query_len,
            max_context_len=max_context_len,
            gather_indices=gather_indices,
            query_pad_indices=query_pad_indices,
            attention_backend=attention_backend,
            contiguous_start=_contiguous_start(block_tables, block_size),
        )

    @contextmanager
    def active(self) -> Iterator[ForwardBatch]:
        """Makes this batch the running step's (`ForwardBatch.current()`) within the block, in this thread; the
        one that was current before is restored on exit (blocks nest)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @staticmethod
    def current() -> ForwardBatch | None:
        """The batch of the step running in this thread (see `active`); None outside a step, e.g. when a test or
        the imatrix collection calls the model directly."""
        return _ACTIVE.get()

    def on(self, device: torch.device) -> ForwardBatch:
        """This step's batch with its tensors on `device`, for decoder layers placed there by a device map
        (mistralrs/worker/device_map.py): made once per device and step; the KV caches are the same list (each
        layer's cache lives on its layer's device), every tensor field (`adapter_weights` included) is moved;
        itself when its tensors are on `device` already."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        placed = self._placed.get(device)
        if placed is None:
            moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                     if f.init and isinstance(getattr(self, f.name), torch.Tensor)}
            placed = self._placed[device] = replace(self, **moved)
        return placed

    def with_bidirectional_blocks(self, blocks: torch.Tensor | None) -> ForwardBatch:
        """This step's batch with `bidirectional_blocks` set (a copy sharing every tensor and the KV caches, its
        masks computed afresh); itself when `blocks` is None."""
        if blocks is None:
            return self
        if blocks.shape != self.input_ids.shape:
            raise ValueError(f"bidirectional_blocks must be [num_tokens] = {list(self.input_ids.shape)}, "
                             f"got {list(blocks.shape)}")
        return replace(self, bidirectional_blocks=blocks)

    def gather_contexts(self, cache: torch.Tensor) -> torch.Tensor:
        """Each sequence's context read from a flat cache: `[num_seqs * max_context_len, ...]`.

        A view of the cache when the step has one sequence whose blocks are consecutive (the common
        single-stream decode), an `index_select` copy otherwise.
        """
        if self.contiguous_start is not None:
            return cache[self.contiguous_start:self.contiguous_start + self.max_context_len]
        return cache.index_select(0, self.gather_indices)

    def attention_mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean mask `[num_seqs, 1, max_query_len, max_context_len]` (True = attend), cached per window.

        Key j is visible to a query at position p when j <= p or both are new tokens of the same bidirectional
        block (`bidirectional_blocks`), and, with a window W, j > p - W. Context validity follows from causality
        and from blocks lying in this step's chunks (p < context_len). None when every query sees every key.
        """
        if sliding_window in self._masks:
            return self._masks[sliding_window]
        mask = None
        sees_everything = self.num_seqs == 1 and self.max_query_len == 1
        if not (sees_everything and (sliding_window is None or self.max_context_len <= sliding_window)):
            query_pos = self.padded_query_positions().unsqueeze(-1)  # [num_seqs, max_query_len, 1]
            key_pos = torch.arange(self.max_context_len, device=query_pos.device)
            mask = key_pos <= query_pos
            if self.bidirectional_blocks is not None:
                mask |= self._same_block()
            if sliding_window is not None:
                mask &= key_pos > query_pos - sliding_window
            mask = mask.unsqueeze(1)
        self._masks[sliding_window] = mask
        return mask

    def _same_block(self) -> torch.Tensor:
        """`[num_seqs, max_query_len, max_context_len]` bool: query and key are new tokens of one block."""
        blocks = self.bidirectional_blocks
        query_blocks = blocks
        if self.query_pad_indices is not None:
            query_blocks = blocks.new_full((self.num_seqs * self.max_query_len,), -1).index_copy_(
                0, self.query_pad_indices, blocks)
        query_blocks = query_blocks.view(self.num_seqs, self.max_query_len, 1)
        seq_of_token = torch.repeat_interleave(torch.arange(self.num_seqs, device=blocks.device),
                                               torch.tensor(self.query_lens, device=blocks.device))
        key_blocks = blocks.new_full((self.num_seqs * self.max_context_len,), -1)
        key_blocks.index_copy_(0, seq_of_token * self.max_context_len + self.positions, blocks)
        key_blocks = key_blocks.view(self.num_seqs, 1, self.max_context_len)
        return (query_blocks == key_blocks) & (query_blocks >= 0)

    def padded_query_positions(self) -> torch.Tensor:
        """`[num_seqs, max_query_len]` positions of the padded query layout; padding slots hold 0."""
        if self.query_pad_indices is None:
            return self.positions.view(self.num_seqs, self.max_query_len)
        padded = self.positions.new_zeros(self.num_seqs * self.max_query_len)
        return padded.index_copy_(0, self.query_pad_indices, self.positions).view(self.num_seqs, self.max_query_len)


def _contiguous_start(block_tables: list[list[int]], block_size: int) -> int | None:
    """First slot of the one sequence's context when its blocks are consecutive; None otherwise."""
    if len(block_tables) != 1:
        return None
    table = block_tables[0]
    if any(b != table[0] + i for i, b in enumerate(table)):
        return None
    return table[0] * block_size


def _validate(chunks: list[SeqChunk], block_size: int, attention_backend: str) -> None:
    if not chunks:
        raise ValueError("chunks must hold at least one SeqChunk")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r}; accepted values: {list(ATTENTION_BACKENDS)}")
    for i, chunk in enumerate(chunks):
        if not chunk.token_ids:
            raise ValueError(f"chunks[{i}].token_ids is empty; each chunk needs at least one token")
        if chunk.start_pos < 0:
            raise ValueError(f"chunks[{i}].start_pos must be >= 0, got {chunk.start_pos}")
        needed = chunk.start_pos + len(chunk.token_ids)
        if len(chunk.block_ids) * block_size < needed:
            raise ValueError(
                f"chunks[{i}].block_ids covers {len(chunk.block_ids) * block_size} tokens, needs {needed}"
            )
