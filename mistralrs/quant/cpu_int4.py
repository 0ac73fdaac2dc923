"""GGML blocks repacked for torch's CPU int4 weight-only kernel (`torch._weight_int4pack_mm_for_cpu`).

The kernel reads, per output row n and group g of 32 inputs, 4-bit codes q in 0..15 and computes
`weight = (q - 8) * scale[g, n] + zero[g, n]`, with scale and zero in the activation dtype, accumulating in
float32 (convention checked by tests/quant/test_cpu_int4.py). It is fast for bfloat16 activations only. The
GGML legacy types map onto it exactly, up to the rounding of their f16 scales to bfloat16:

- Q4_0: d * (q - 8)            -> scale = d, zero = 0
- Q4_1: d * q + m              -> scale = d, zero = m + 8 d
- Q8_0: d * c, c in -128..127  -> two 4-bit planes of u = c + 128 = 16 h + l, laid side by side along the input
  axis (the input is fed twice): h with scale 16 d and zero 0, l with scale d and zero 8 d, since
  16 d (h - 8) + d (l - 8) + 8 d = d (u - 128) = d c.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type, split_q4_0, split_q4_1, split_q8_0
from mistralrs.quant.packed import PackedWeight

GROUP_SIZE = 32  # inputs per (scale, zero) pair; the GGML block size
_ROW_MULTIPLE = 16  # torch's packer needs the output rows to be a multiple of this
# Rows repacked per step (bounds the int32 code temporaries). A multiple of 64: the packer lays out rows in
# tiles of 64, so packed chunks concatenate to the packing of the whole (tested).
_ROWS_PER_CHUNK = 1024

# (codes int32 [rows, in] in 0..15, scale float32 [rows, in / 32], zero float32 [rows, in / 32]) for a row range
GroupSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Int4CpuWeight(PackedWeight):
    """4-bit codes with a bfloat16 scale and zero per group of 32 inputs, in torch's CPU int4 kernel layout."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int):
        self.packed = packed  # uint8 [padded_out, in / 2], torch's tiled layout; padded_out % 16 == 0
        self.scales_and_zeros = scales_and_zeros  # [in / 32, padded_out, 2] activation dtype: (scale, zero)
        self.out_features = out_features  # rows beyond it (padding) are dropped from the output

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, GROUP_SIZE,
                                              self.scales_and_zeros)  # the kernel needs a contiguous input
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    @classmethod
    def pack(cls, num_rows: int, source: GroupSource, dtype: torch.dtype) -> Int4CpuWeight:
        """Packs `num_rows` output rows read from `source` chunk by chunk; scales and zeros cast to `dtype`.

        The outputs are allocated once up front and filled per chunk, so that no chunk-sized allocation
        outlives its step (interleaved survivors would keep the freed temporaries resident).
        """
        padded_rows = num_rows + (-num_rows % _ROW_MULTIPLE)
        packed = scales_and_zeros = None
        for start in range(0, num_rows, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, num_rows)
            codes, scale, zero = source(start, stop)
            pad = (padded_rows - num_rows) if stop == num_rows else 0
            if pad:  # zero rows (scale 0, zero 0) that the output drops
                codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
                scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
            if packed is None:
                packed = torch.empty(padded_rows, codes.shape[1] // 2, dtype=torch.uint8)
                scales_and_zeros = torch.empty(scale.shape[1], padded_rows, 2, dtype=dtype)
            rows = slice(start, stop + pad)
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales_and_zeros[:, rows, 0] = scale.t()
            scales_and_zeros[:, rows, 1] = zero.t()
        return cls(packed, scales_and_zeros, num_rows)


class Int4CpuPairWeight(Int4CpuWeight):
    """Q8_0 as two 4-bit planes side by side along the input axis; the input is fed twice (see module doc)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return super().matmul(torch.cat([x, x], dim=-1))


def _blocks(tensor: GGMLTensor, start: int, stop: int) -> torch.Tensor:
    """The blocks of rows `[start, stop)`: uint8 `[(stop - start) * blocks_per_row, type_size]`."""
    return tensor.data[start:stop].reshape(-1, block_type(tensor.ggml_type).type_size)


def int4_cpu_from_q4_0(tensor: GGMLTensor, dtype: torch.dtype) -> Int4CpuWeight:
    """Q4_0 `[out, in]` -> `Int4CpuWeight` (scale = d, zero = 0)."""
    def source(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, codes = split_q4_0(_blocks(tensor, start, stop), torch.int32)
        scale = d.reshape(stop - start, -1)
        return codes.reshape(stop - start, -1), scale, torch.zeros_like(scale)

    return Int4CpuWeight.pack(tensor.num_rows, source, dtype)


def int4_cpu_from_q4_1(tensor: GGMLTensor, dtype: torch.dtype) -> Int4CpuWeight:
    """Q4_1 `[out, in]` -> `Int4CpuWeight` (scale = d, zero = m + 8 d)."""
    def source(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, m, codes = split_q4_1(_blocks(tensor, start, stop), torch.int32)
        return codes.reshape(stop - start, -1), d.reshape(stop - start, -1), (m + 8 * d).reshape(stop - start, -1)

    return Int4CpuWeight.pack(tensor.num_rows, source, dtype)


def int4_cpu_from_q8_0(tensor: GGMLTensor, dtype: torch.dtype) -> Int4CpuPairWeight:
    """Q8_0 `[out, in]` -> `Int4CpuPairWeight` over `[out, 2 * in]` (high nibbles, then low nibbles)."""
    def source(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = stop - start
        d, signed = split_q8_0(_blocks(tensor, start, stop))
        unsigned = (signed.to(torch.int32) + 128).reshape(rows, -1)  # 0..255
        codes = torch.empty(rows, 2 * unsigned.shape[1], dtype=torch.int32)
        torch.bitwise_right_shift(unsigned, 4, out=codes[:, :unsigned.shape[1]])
        torch.bitwise_and(unsigned, 0x0F, out=codes[:, unsigned.shape[1]:])
        d = d.reshape(rows, -1)
        return codes, torch.cat([16 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8 * d], dim=1)

    return Int4CpuPairWeight.pack(tensor.num_rows, source, dtype)
