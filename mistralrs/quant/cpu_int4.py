"""GGML blocks repacked for torch's CPU int4 weight-only kernel (`torch._weight_int4pack_mm_for_cpu`).

The kernel reads, per output row n and group g of `group_size` inputs (32, 64, 128 or 256; it refuses 16),
4-bit codes q in 0..15 and computes `weight = (q - 8) * scale[g, n] + zero[g, n]`, with scale and zero in the
activation dtype, accumulating in float32 (convention checked by tests/quant/test_cpu_int4.py). It is fast for
bfloat16 activations only. Every GGML type decodes to `weight = s * c + b` per sub-block of G weights (integer
codes c, mistralrs/quant/block_types.py), which maps onto the kernel in one of two forms, exact up to the
rounding of the scales and zeros to bfloat16:

- one plane, when the codes span at most 16 values and G is 32 or 256 (Q4_0, Q4_1, Q4_K, TQ1_0, TQ2_0):
  q = c - o for an offset o (-8 when the codes lie in -8..7, else their minimum), scale s, zero s (o + 8) + b
  (just b, or 0, for o = -8). 4 bits a weight, one (scale, zero) per G.
- two planes, for wider codes (every other type but MXFP4/NVFP4): u = c + k = 16 h + l with h, l in 0..15, and
  one kernel group of 2 G' holds a sub-block's G' high nibbles then its G' low nibbles (G' = G, or 128 for
  G = 256), fed 16 x then x (exact in bfloat16). With scale s and zero z the group gives
  s (16 (h - 8) + l - 8) + 17 z = s (u - 136) + 17 z per input, so z = (s (136 - k) + b) / 17. Without a bias,
  k = 136 (z = 0: exact up to bf16(s)) for codes in -136..119, and k = 128, z = 8 s / 17 for Q8_0/Q8_K, whose
  codes reach 127 (the zero rounds once more, by at most 2^-9 of 8 s). With a bias, k is chosen per sub-block
  to bring z near 0. 8 bits a weight, one (scale, zero) per G'.
  Groups of 16 (Q2_K, Q3_K, Q6_K, IQ2_XS, IQ2_S, IQ1_M), which the kernel refuses, fit this way too.

The zeros with a bias (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K) also round once more. MXFP4/NVFP4 scales reach 2^127,
where 16 x would overflow the products: those two types take the tiled path.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 take these forms only with `use_fast_kernels="int4"` or while the C++ extension is
not built: by default they run the int8-activation dot products of mistralrs/quant/qdot.py, which are faster at
decode sizes and hold Q8_0 in its own 8.5 bits a weight (mistralrs/quant/gguf_linear.py chooses).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mistralrs.quant.block_types import AffineBlocks, GGMLBlockType
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type
from mistralrs.quant.packed import FusedLinearPart, LinearKind, PackedWeight

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
_ROW_MULTIPLE = 16  # torch's packer needs the output rows to be a multiple of this
# Rows repacked per step, at most (bounds the int32 code temporaries to about _CHUNK_CODES codes). A multiple of
# 64: the packer lays out rows in tiles of 64, so packed chunks concatenate to the packing of the whole (tested).
_ROWS_PER_CHUNK = 1024
_CHUNK_CODES = 1 << 19

# (codes int32 [rows, K] in 0..15, scale float32 [rows, K / group], zero float32 [rows, K / group]) for a row range
GroupSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Int4CpuWeight(PackedWeight):
    """4-bit codes with a bfloat16 scale and zero per group of inputs, in torch's CPU int4 kernel layout."""

    fused_kind = LinearKind.INT4  # how the fused C++ decoder layer computes this form

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, group_size: int = 32):
        self.packed = packed  # uint8 [padded_out, K / 2], torch's tiled layout; padded_out % 16 == 0
        self.scales_and_zeros = scales_and_zeros  # [K / group_size, padded_out, 2] activation dtype: (scale, zero)
        self.out_features = out_features  # rows beyond it (padding) are dropped from the output
        self.group_size = group_size  # inputs per (scale, zero) pair, one of KERNEL_GROUP_SIZES

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, in_features]` laid out as the kernel's K inputs (the identity for one plane)."""
        return x

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(self.kernel_input(x.reshape(-1, x.shape[-1])).contiguous(),
                                              self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    def fused_part(self) -> FusedLinearPart:
        return FusedLinearPart(self.fused_kind, self.group_size, self.out_features, self.packed, self.scales_and_zeros)

    @classmethod
    def pack(cls, num_rows: int, source: GroupSource, dtype: torch.dtype, group_size: int = 32) -> Int4CpuWeight:
        """Packs `num_rows` output rows read from `source` chunk by chunk; scales and zeros cast to `dtype`.

        The outputs are allocated once up front and filled per chunk, so that no chunk-sized allocation
        outlives its step (interleaved survivors would keep the freed temporaries resident).
        """
        padded_rows = num_rows + (-num_rows % _ROW_MULTIPLE)
        packed = scales_and_zeros = None
        rows_per_chunk = min(64, _ROWS_PER_CHUNK)  # until the first chunk tells the width of a row's codes
        start = 0
        while start < num_rows:
            stop = min(start + rows_per_chunk, num_rows)
            codes, scale, zero = source(start, stop)
            pad = (padded_rows - num_rows) if stop == num_rows else 0
            if pad:  # zero rows (scale 0, zero 0) that the output drops
                codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
                scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
            if packed is None:
                packed = torch.empty(padded_rows, codes.shape[1] // 2, dtype=torch.uint8)
                scales_and_zeros = torch.empty(scale.shape[1], padded_rows, 2, dtype=dtype)
                rows_per_chunk = max(64, min(_ROWS_PER_CHUNK, _CHUNK_CODES // codes.shape[1] // 64 * 64))
            rows = slice(start, stop + pad)
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            scales_and_zeros[:, rows, 0] = scale.t()
            scales_and_zeros[:, rows, 1] = zero.t()
            start = stop
        return cls(packed, scales_and_zeros, num_rows, group_size)


class Int4CpuPairWeight(Int4CpuWeight):
    """Two 4-bit planes per sub-block of `group_size / 2` inputs, fed 16 x then x (see module doc)."""

    fused_kind = LinearKind.INT4_PAIR

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        sub_blocks = x.reshape(x.shape[0], -1, self.group_size // 2)
        return torch.cat([sub_blocks * 16, sub_blocks], dim=-1).reshape(x.shape[0], -1)


def affine_group_size(fmt: GGMLBlockType) -> int:
    """Weights per scale in `fmt`'s affine decoding (16, 32 or 256)."""
    return fmt.decode(torch.zeros(1, fmt.type_size, dtype=torch.uint8)).group_size


def int4_cpu_form(ggml_type: str) -> tuple[type[Int4CpuWeight], int] | None:
    """(the int4 form `ggml_type` packs into, its kernel group size) (see module doc), or None for no form."""
    fmt = block_type(ggml_type)
    if fmt.decode is None or not fmt.int4_cpu:
        return None
    low, high = fmt.code_range
    group_size = affine_group_size(fmt)
    if high - low <= 15 and group_size in KERNEL_GROUP_SIZES:
        return Int4CpuWeight, group_size
    if -136 <= low and high <= 127:
        return Int4CpuPairWeight, min(2 * group_size, 256)
    return None


def _affine_rows(tensor: GGMLTensor, start: int, stop: int) -> tuple[AffineBlocks, int]:
    """The decoded blocks of rows `[start, stop)` and their number of rows."""
    fmt = block_type(tensor.ggml_type)
    return fmt.decode(tensor.data[start:stop].reshape(-1, fmt.type_size)), stop - start


def _zero(scale: torch.Tensor, bias: torch.Tensor | None, times_scale: int) -> torch.Tensor:
    """`times_scale * scale + bias` (float32), the kernel zero."""
    zero = scale * times_scale if times_scale else torch.zeros_like(scale)
    return zero if bias is None else zero + bias


def _single_plane(tensor: GGMLTensor, start: int, stop: int, group_size: int):
    affine, rows = _affine_rows(tensor, start, stop)
    low, high = block_type(tensor.ggml_type).code_range
    offset = -8 if low >= -8 and high <= 7 else low
    codes = affine.codes.to(torch.int32).reshape(rows, -1)
    codes -= offset
    return codes, affine.scale.reshape(rows, -1), _zero(affine.scale, affine.bias, offset + 8).reshape(rows, -1)


def _two_planes(tensor: GGMLTensor, start: int, stop: int, group_size: int):
    affine, rows = _affine_rows(tensor, start, stop)
    sub_block = group_size // 2
    repeat = affine.group_size // sub_block  # 1, or 2 when 256-weight scales cover two sub-blocks of 128
    scale = affine.scale.repeat_interleave(repeat, dim=1) if repeat > 1 else affine.scale
    bias = affine.bias.repeat_interleave(repeat, dim=1) if repeat > 1 and affine.bias is not None else affine.bias
    shift = _plane_shift(scale, bias, block_type(tensor.ggml_type).code_range)
    unsigned = affine.codes.to(torch.int32).reshape(rows, -1, sub_block)
    unsigned += shift.reshape(rows, -1, 1)  # 0..255
    planes = torch.empty(rows, unsigned.shape[1], group_size, dtype=torch.int32)
    torch.bitwise_right_shift(unsigned, 4, out=planes[..., :sub_block])
    torch.bitwise_and(unsigned, 0x0F, out=planes[..., sub_block:])
    zero = scale * (136 - shift)  # exact: a scale times a small integer
    zero = (zero if bias is None else zero + bias) / 17
    return planes.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


def _plane_shift(scale: torch.Tensor, bias: torch.Tensor | None, code_range: tuple[int, int]) -> torch.Tensor:
    """The code shift k per sub-block (int32, shaped like `scale`): u = c + k must lie in 0..255, and the zero
    (s (136 - k) + b) / 17 is best near 0, where its bfloat16 rounding costs least: k = 136 when there is no
    bias and the codes allow it (zero 0, exact), else the k nearest 136 + b / s."""
    low, high = code_range
    if bias is None:
        return torch.full_like(scale, min(136, 255 - high), dtype=torch.int32)
    ideal = torch.where(scale != 0, 136 + bias / scale, torch.full_like(scale, 136.0))
    return ideal.nan_to_num(136.0).round().clamp(-low, 255 - high).to(torch.int32)


_SOURCES = {Int4CpuWeight: _single_plane, Int4CpuPairWeight: _two_planes}


def int4_cpu_from_ggml(tensor: GGMLTensor, dtype: torch.dtype) -> Int4CpuWeight:
    """`tensor` `[out, in]` repacked for the CPU int4 kernel in its type's form; ValueError when it has none."""
    form = int4_cpu_form(tensor.ggml_type)
    if form is None:
        raise ValueError(f"ggml_type {tensor.ggml_type!r} has no CPU int4 form")
    cls, group_size = form
    source = _SOURCES[cls]
    return cls.pack(tensor.num_rows, lambda start, stop: source(tensor, start, stop, group_size), dtype, group_size)
