"""`GGMLTensor`: a weight kept in its GGML block encoding, as the GGUF loader hands it to the layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mistralrs.quant.ggml_types import block_type, dequantize_rows

# Rows dequantized per step by `GGMLTensor.dequantize`, so that the float32 temporaries stay small
# (a 128k-row vocabulary at once would need gigabytes).
_DEQUANTIZE_ROWS_PER_CHUNK = 4096


@dataclass(frozen=True)
class GGMLTensor:
    """A block-quantized tensor: raw GGML blocks (often a view of the memory-mapped file), type and logical shape.

    Row permutations (the loader's Q/K un-permutation) and row concatenation (fused projections) act on the
    block rows directly: each logical row is `num_cols / block_size` whole blocks.
    """

    data: torch.Tensor  # uint8 [num_rows, row_bytes]: logical row r as its blocks, back to back
    ggml_type: str  # block format, a key of mistralrs.quant.ggml_types.BLOCK_TYPES
    shape: tuple[int, ...]  # logical shape in PyTorch order; num_rows = prod(shape[:-1]), num_cols = shape[-1]
    # Drops the pages of block rows [start, stop) from the resident set, for `data` over a memory-mapped file that
    # is read again if a row is touched later (the GGUF loader's); None for other data. Row-derived tensors
    # (`with_rows`, `map_rows`, ...) have none.
    release_pages: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        fmt = block_type(self.ggml_type)
        if not self.shape or self.shape[-1] % fmt.block_size:
            raise ValueError(f"GGMLTensor shape {self.shape}: the last dimension must be a multiple of the "
                             f"{self.ggml_type} block size {fmt.block_size}")
        expected = (math.prod(self.shape[:-1]), self.shape[-1] // fmt.block_size * fmt.type_size)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(f"GGMLTensor data must be uint8 {list(expected)} for {self.ggml_type} {self.shape}, "
                             f"got {self.data.dtype} {list(self.data.shape)}")

    @property
    def num_rows(self) -> int:
        """Logical rows (output features of a linear weight)."""
        return self.data.shape[0]

    @property
    def num_cols(self) -> int:
        """Logical columns (input features of a linear weight)."""
        return self.shape[-1]

    @property
    def device(self) -> torch.device:
        """Where the blocks live."""
        return self.data.device

    def to(self, device: torch.device | str) -> GGMLTensor:
        """The same blocks on `device` (self when already there)."""
        return self if self.data.device == torch.device(device) else self.with_rows(self.data.to(device))

    def with_rows(self, data: torch.Tensor) -> GGMLTensor:
        """A tensor of the same type and columns over other block rows (uint8 `[new_num_rows, row_bytes]`)."""
        return GGMLTensor(data, self.ggml_type, (data.shape[0], self.num_cols))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GGMLTensor:
        """Applies a row permutation/selection `fn` (written for a `[num_rows, ...]` tensor) to the block rows."""
        return self.with_rows(fn(self.data))

    def narrow_rows(self, start: int, size: int) -> GGMLTensor:
        """Rows `[start, start + size)` (their blocks, no copy)."""
        return self.with_rows(self.data[start:start + size])

    def columns_aligned(self, start: int, size: int) -> bool:
        """Whether columns `[start, start + size)` are whole blocks."""
        block = block_type(self.ggml_type).block_size
        return start % block == 0 and size % block == 0 and size > 0

    def narrow_columns(self, start: int, size: int) -> GGMLTensor:
        """Columns `[start, start + size)` as whole blocks of every row (`columns_aligned` must hold)."""
        if not self.columns_aligned(start, size):
            raise ValueError(f"columns [{start}, {start + size}) of a {self.ggml_type} tensor are not whole blocks")
        fmt = block_type(self.ggml_type)
        first, count = start // fmt.block_size * fmt.type_size, size // fmt.block_size * fmt.type_size
        return GGMLTensor(self.data[:, first:first + count].contiguous(), self.ggml_type, (self.num_rows, size))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All weights as a dense `dtype` tensor of `shape` (float32 math, cast per chunk of rows)."""
        out = torch.empty(self.num_rows, self.num_cols, dtype=dtype, device=self.device)
        for start in range(0, self.num_rows, _DEQUANTIZE_ROWS_PER_CHUNK):
            rows = self.data[start:start + _DEQUANTIZE_ROWS_PER_CHUNK]
            out[start:start + rows.shape[0]] = dequantize_rows(rows, self.ggml_type)
        return out.reshape(self.shape)

    def dequantize_selected_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` (any shape of int64 ids) dequantized: `[*index.shape, num_cols]` in `dtype`."""
        rows = dequantize_rows(self.data[index.reshape(-1)], self.ggml_type).to(dtype)
        return rows.reshape(*index.shape, self.num_cols)

    @staticmethod
    def cat_rows(tensors: Sequence[GGMLTensor]) -> GGMLTensor:
        """Concatenation along rows of tensors with the same type and columns (a copy): the file pages of the
        tensors with `release_pages` are released once copied."""
        first = tensors[0]
        for tensor in tensors[1:]:
            if (tensor.ggml_type, tensor.num_cols) != (first.ggml_type, first.num_cols):
                raise ValueError(f"cannot concatenate {tensor.ggml_type} {tensor.shape} rows onto "
                                 f"{first.ggml_type} {first.shape}")
        result = first.with_rows(torch.cat([t.data for t in tensors]))
        for tensor in tensors:
            if tensor.release_pages is not None:
                tensor.release_pages(0, tensor.num_rows)
        return result
