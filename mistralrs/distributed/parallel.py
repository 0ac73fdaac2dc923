"""What each rank of a tensor-parallel group holds, and the collectives that put the pieces back together.

The split of every weight is decided here, once, as plain `(start, size)` ranges of the checkpoint tensor, so
that the layers (`layers/linear.py`, `layers/embedding.py`, `layers/moe.py`) only narrow what they load and call
one collective after their product:

- column-parallel `Linear` (`LinearShard.kind == "column"`): each fused part (q, k, v / gate, up) keeps its own
  range of output rows; nothing to combine, the next layer consumes the pieces. With `gather_sizes` (the LM head)
  the outputs are all-gathered into the full width.
- row-parallel `Linear` (`"row"`): a range of input columns; the partial products are summed by an all-reduce, and
  the bias is added once (rank 0 holds it, the others hold zeros).
- attention heads (`head_shard`): query heads follow whole KV groups, so every rank keeps ordinary grouped-query
  attention; with fewer KV heads than ranks each rank keeps the one KV head its query heads use (replicated).
- vocabulary (`vocab_range`): contiguous rows per rank, sizes differing by at most one; the gather trims each
  rank's padding, so no padding column reaches the logits.

Splits are balanced, as even as the sizes allow (a rank may hold one unit more than another: SmolLM2's 3 KV
heads over 2 ranks are 2 + 1). Inner widths (MLP intermediate, expert intermediate) are cut at multiples of the
largest GGML block size that divides them (`ALIGNMENTS`), so the row-parallel layer after them slices GGUF
blocks whole whenever the width allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from mistralrs.distributed.group import TPGroup

# Split units tried for inner widths, largest first: K-quant blocks (256), the other GGML blocks (32), one column.
ALIGNMENTS = (256, 32, 1)

Range = tuple[int, int]  # (first index, count)


class QuantizedPiece(Protocol):
    """A quantized `[rows, columns]` weight that cuts itself: `GGMLTensor` (a GGUF tensor, an ISQ or UQFF layer's
    blocks) and the HQQ and FP8 forms of an ISQ / UQFF layer (`quant/isq_state.py`). A form that cannot keep a
    range in its own encoding (HQQ rows) returns it as a dense tensor."""

    shape: tuple[int, ...]

    def narrow_rows(self, start: int, size: int) -> torch.Tensor | QuantizedPiece:
        """Rows `[start, start + size)`."""

    def columns_aligned(self, start: int, size: int) -> bool:
        """Whether columns `[start, start + size)` fall on the encoding's block or group boundaries."""

    def narrow_columns(self, start: int, size: int) -> QuantizedPiece:
        """Columns `[start, start + size)` in the same encoding (`columns_aligned` must hold)."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight as a dense `dtype` tensor."""


def balanced_ranges(total: int, parts: int, unit: int = 1) -> list[Range]:
    """`total` split into `parts` contiguous ranges of whole `unit`s (`unit` divides `total`), the first ranges
    one unit longer when the units do not divide evenly."""
    if total % unit:
        raise ValueError(f"cannot split {total} in units of {unit}")
    units, extra = divmod(total // unit, parts)
    ranges, start = [], 0
    for part in range(parts):
        size = (units + (part < extra)) * unit
        ranges.append((start, size))
        start += size
    return ranges


def aligned_range(total: int, group: TPGroup | None) -> Range:
    """This rank's range of an inner width `total`: balanced, in units of the largest of `ALIGNMENTS` that divides
    `total` and still gives every rank at least one unit. The whole width without a group."""
    if group is None:
        return 0, total
    unit = next((u for u in ALIGNMENTS if total % u == 0 and total // u >= group.world_size), None)
    if unit is None:
        raise ValueError(f"cannot split a width of {total} over {group.world_size} tensor-parallel ranks")
    return balanced_ranges(total, group.world_size, unit)[group.rank]


def vocab_ranges(vocab_size: int, group: TPGroup | None) -> list[Range]:
    """Every rank's rows of the embedding and LM head (one range, the whole vocabulary, without a group)."""
    if group is None:
        return [(0, vocab_size)]
    if vocab_size < group.world_size:
        raise ValueError(f"config field 'vocab_size' ({vocab_size}) is smaller than the tensor-parallel size "
                         f"{group.world_size}")
    return balanced_ranges(vocab_size, group.world_size)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes: query heads `[q_start, q_start + num_heads)` and the KV heads
    `[kv_start, kv_start + num_kv_heads)` they use (query head h uses KV head h // (heads per KV head))."""

    q_start: int  # first query head of this rank
    num_heads: int  # query heads of this rank
    kv_start: int  # first KV head of this rank
    num_kv_heads: int  # KV heads of this rank (what its KV cache holds)


def head_shard(num_heads: int, num_kv_heads: int, group: TPGroup | None) -> HeadShard:
    """This rank's heads. With at least as many KV heads as ranks the KV heads are split (balanced) and each rank
    takes their query heads; with fewer, `world_size` must be a multiple of `num_kv_heads`, each rank keeps one KV
    head and a balanced share of its query heads. ValueError naming the config field when no such split exists."""
    if group is None:
        return HeadShard(0, num_heads, 0, num_kv_heads)
    world, rank = group.world_size, group.rank
    per_kv = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv_start, kv_count = balanced_ranges(num_kv_heads, world)[rank]
        return HeadShard(kv_start * per_kv, kv_count * per_kv, kv_start, kv_count)
    if world % num_kv_heads:
        raise ValueError(f"config field 'num_key_value_heads' ({num_kv_heads}) must be at least the tensor-parallel "
                         f"size {world} or divide it")
    ranks_per_kv = world // num_kv_heads
    if per_kv < ranks_per_kv:
        raise ValueError(f"config field 'num_attention_heads' ({num_heads}) must be at least the tensor-parallel "
                         f"size {world}")
    kv_head = rank // ranks_per_kv
    q_offset, q_count = balanced_ranges(per_kv, ranks_per_kv)[rank % ranks_per_kv]
    return HeadShard(kv_head * per_kv + q_offset, q_count, kv_head, 1)


@dataclass(frozen=True)
class LinearShard:
    """How one `Linear` is split over `group` (see the module docstring)."""

    group: TPGroup  # the ranks
    kind: str  # "column" (output rows split) or "row" (input columns split, outputs all-reduced)
    ranges: tuple[Range, ...]  # column: per fused part, its rows of that part's checkpoint tensor; row: one range
    gather_sizes: tuple[int, ...] | None = None  # column only: every rank's output width, to all-gather the output

    def __post_init__(self) -> None:
        if self.kind not in ("column", "row"):
            raise ValueError(f"LinearShard.kind must be 'column' or 'row', got {self.kind!r}")
        if self.kind == "row" and (len(self.ranges) != 1 or self.gather_sizes is not None):
            raise ValueError("a row-parallel LinearShard has one input-column range and no gather")

    def local_sizes(self, partition_sizes: Sequence[int], in_features: int) -> tuple[list[int], int]:
        """(this rank's output widths per fused part, its input width) for a layer of the given full sizes."""
        if self.kind == "row":
            return list(partition_sizes), self.ranges[0][1]
        if len(self.ranges) != len(partition_sizes):
            raise ValueError(f"column-parallel split has {len(self.ranges)} ranges for {len(partition_sizes)} parts")
        return [size for _, size in self.ranges], in_features

    def local_piece(self, param_name: str, loaded: torch.Tensor | QuantizedPiece, part: int,
                    dtype: torch.dtype) -> torch.Tensor | QuantizedPiece:
        """This rank's piece of checkpoint tensor `loaded` ("weight" or "bias" of fused part `part`). A row split
        of a quantized weight that does not fall on its block or group boundaries is dequantized to `dtype` (that
        piece only)."""
        if self.kind == "column":
            start, size = self.ranges[part]
            return narrow_rows(loaded, start, size)
        if param_name == "bias":
            return loaded if self.group.is_head else torch.zeros(loaded.shape, dtype=dtype)
        start, size = self.ranges[0]
        return narrow_columns(loaded, start, size, dtype)

    def lora_factors(self, a: torch.Tensor, b: torch.Tensor, part: int | None,
                     partition_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's LoRA factors `A [r, in]`, `B [out, r]` of fused part `part` (None: the whole layer, every
        part stacked in B as the checkpoint stores it; `partition_sizes` are the full parts). Row-parallel: A's
        input columns (each rank's delta is partial, summed with the product); column-parallel: B's rows."""
        if self.kind == "row":
            return a.narrow(1, *self.ranges[0]), b
        if part is not None:
            return a, b.narrow(0, *self.ranges[part])
        offsets = [sum(partition_sizes[:i]) for i in range(len(partition_sizes))]
        return a, torch.cat([b.narrow(0, offset + start, size) for offset, (start, size) in zip(offsets, self.ranges)])

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from this rank's product `y`: summed over the ranks (row), gathered (column with
        `gather_sizes`), or `y` itself."""
        if self.kind == "row":
            return all_reduce(y, self.group)
        if self.gather_sizes is not None:
            return all_gather_columns(y, self.gather_sizes, self.group)
        return y


def column_shard(group: TPGroup | None, ranges: Sequence[Range]) -> LinearShard | None:
    """A column-parallel split with the given rows per fused part (None without a group)."""
    return None if group is None else LinearShard(group, "column", tuple(ranges))


def row_shard(group: TPGroup | None, columns: Range) -> LinearShard | None:
    """A row-parallel split over the given input columns (None without a group)."""
    return None if group is None else LinearShard(group, "row", (columns,))


def qkv_ranges(heads: HeadShard, head_dim: int) -> list[Range]:
    """Rows of the q, k and v checkpoint tensors a rank with `heads` keeps."""
    kv = (heads.kv_start * head_dim, heads.num_kv_heads * head_dim)
    return [(heads.q_start * head_dim, heads.num_heads * head_dim), kv, kv]


def vocab_shard(group: TPGroup | None, vocab_size: int) -> LinearShard | None:
    """The LM head's split: this rank's vocabulary rows, outputs gathered into the full vocabulary."""
    if group is None:
        return None
    ranges = vocab_ranges(vocab_size, group)
    return LinearShard(group, "column", (ranges[group.rank],), tuple(size for _, size in ranges))


def narrow_rows(tensor: torch.Tensor | QuantizedPiece, start: int, size: int) -> torch.Tensor | QuantizedPiece:
    """Rows `[start, start + size)` of a dense tensor or of a quantized weight, which cuts itself (GGML blocks:
    whole block rows, no copy)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.narrow(0, start, size)
    return tensor.narrow_rows(start, size)


def narrow_columns(tensor: torch.Tensor | QuantizedPiece, start: int, size: int,
                   dtype: torch.dtype) -> torch.Tensor | QuantizedPiece:
    """Columns `[start, start + size)`: the quantized weight's own columns when the range falls on its block or
    group boundaries, else the weight dequantized to `dtype` and narrowed."""
    if isinstance(tensor, torch.Tensor):
        return tensor.narrow(-1, start, size)
    if tensor.columns_aligned(start, size):
        return tensor.narrow_columns(start, size)
    return tensor.dequantize(dtype).narrow(-1, start, size).contiguous()


def all_reduce(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """The sum of `x` over the ranks. Half-precision partial sums travel as float32 over gloo: the sum rounds once
    instead of at every rank, and gloo's own half-precision reduction is the slower one (a [1, 576] all-reduce
    between two CPU processes: 1.6 ms in bfloat16 against 0.64 ms in float32, measured)."""
    if group.backend == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
        wide = x.float()
        dist.all_reduce(wide, group=group.process_group)
        return wide.to(x.dtype)
    x = x.contiguous()
    dist.all_reduce(x, group=group.process_group)
    return x


def all_gather_columns(x: torch.Tensor, sizes: Sequence[int], group: TPGroup) -> torch.Tensor:
    """`[..., sizes[rank]]` on every rank -> `[..., sum(sizes)]`, rank order. Each rank's piece is padded to the
    widest for the collective and trimmed after it."""
    width = max(sizes)
    padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group.process_group)
    return torch.cat([piece[..., :size] for piece, size in zip(pieces, sizes)], dim=-1)
