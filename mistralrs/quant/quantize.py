"""GGML block quantization of a float weight, in vectorized torch: what GGUF-type ISQ runs on every layer.

`quantize_ggml(weight, ggml_type, imatrix=None)` returns the weight as a `GGMLTensor`:

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 without an importance matrix: byte for byte what `gguf.quants.quantize`
  writes (and llama.cpp's `quantize_row_*_ref`): the same float32 operations in the same order.
- Q8_1, Q8_K: llama.cpp's `quantize_row_q8_1_ref` / `quantize_row_q8_K_ref`.
- K-quants (Q2_K ... Q6_K): llama.cpp's searches, see mistralrs/quant/kquants.py.
- With an importance matrix (one value per input column, e.g. mean squared activations), Q4_0, Q4_1, Q5_0,
  Q5_1 and the K-quants minimize the importance-weighted error as llama.cpp's
  `quantize_row_*_impl(..., quant_weights)` do; the 8-bit types cannot use one (ValueError).

Rows are quantized in chunks so that the temporaries of the scale searches stay small and cache-resident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.kquants import (QK_K, f16_bytes, make_qkx_quants, make_qx_quants, quantize_q2_k,
                                     quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k, rdiv)

# Weights per chunk of rows quantized at once (the searches keep ~10 float32 copies of a chunk): cache-sized on
# the CPU; large on accelerators, where each of the searches' many small operations is one kernel launch.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 23

RowQuantizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class GGMLQuantizer:
    """How one GGML type is produced from float rows."""

    block_size: int  # weights per block
    type_size: int  # bytes per block
    quantize_rows: RowQuantizer  # float32 [rows, cols], importance [cols] or None -> uint8 [rows, row_bytes]
    takes_imatrix: bool  # whether an importance matrix steers the error minimization


def _trunc_codes(scaled: torch.Tensor, bias: float, high: int) -> torch.Tensor:
    """gguf's `np.trunc(scaled + bias).astype(uint8).clip(0, high)` as int32."""
    return torch.trunc(scaled + bias).clamp_(0, high).int()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`1 / d`, and 0 where d is 0 (gguf's `np.where(d == 0, 0, 1 / d)`)."""
    return torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))


def _round_away(values: torch.Tensor) -> torch.Tensor:
    """C `roundf` (half away from zero), computed as gguf's `np_roundf`."""
    magnitude = values.abs()
    floored = torch.floor(magnitude)
    return torch.sign(values) * (floored + torch.floor(2 * (magnitude - floored)))


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int32 `[n, 32]` codes -> uint8 `[n, 16]`: byte j = low 4 bits of code j | (code j + 16) << 4."""
    return ((codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)).to(torch.uint8)


def _fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """int32 `[n, 32]` codes 0..31 -> uint8 `[n, 4]`: the little-endian u32 whose bit j is bit 4 of code j."""
    bits = ((codes >> 4) & 1).reshape(-1, 4, 8)
    return sum(bits[:, :, k] << k for k in range(8)).to(torch.uint8)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 32)


def _symmetric_max(blocks: torch.Tensor) -> torch.Tensor:
    """The first element of largest magnitude of each block, with its sign: `[n, 1]`."""
    return blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))


def _row_weights(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """llama.cpp's legacy-type weights qw * sqrt(sigma2 + x^2), sigma2 = mean of x^2 over the row: `[n, 32]`."""
    sigma2 = (x * x).sum(-1, keepdim=True) / x.shape[1]
    return _blocks(importance * torch.sqrt(sigma2 + x * x))


def _symmetric_codes(x: torch.Tensor, importance: torch.Tensor | None,
                     half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, codes 0..2*half-1) per 32-block of the Q4_0/Q5_0 kind: the largest-magnitude element maps to -half
    without `importance`, llama.cpp's weighted search with it."""
    blocks = _blocks(x)
    if importance is None:
        d = _symmetric_max(blocks) / -half
        return d, _trunc_codes(blocks * _inverse(d), half + 0.5, 2 * half - 1)
    d, codes = make_qx_quants(blocks, half, _row_weights(x, importance))
    return d, codes.int()


def _q4_0(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    d, codes = _symmetric_codes(x, importance, 8)
    return torch.cat([f16_bytes(d), _pack_nibbles(codes)], dim=1)


def _affine_codes(x: torch.Tensor, importance: torch.Tensor | None,
                  levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, min, codes 0..levels) per 32-block of the Q4_1/Q5_1 kind: min/max without `importance`, llama.cpp's
    weighted search with it."""
    blocks = _blocks(x)
    if importance is None:
        low = blocks.min(dim=-1, keepdim=True).values
        d = (blocks.max(dim=-1, keepdim=True).values - low) / levels
        return d, low, _trunc_codes((blocks - low) * _inverse(d), 0.5, levels)
    d, the_min, codes = make_qkx_quants(blocks, _row_weights(x, importance), levels, -0.9, 0.05, 36, use_mad=False)
    return d, -the_min, codes.int()


def _q4_1(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    d, low, codes = _affine_codes(x, importance, 15)
    return torch.cat([f16_bytes(d), f16_bytes(low), _pack_nibbles(codes)], dim=1)


def _q5_0(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    d, codes = _symmetric_codes(x, importance, 16)
    return torch.cat([f16_bytes(d), _fifth_bits(codes), _pack_nibbles(codes)], dim=1)


def _q5_1(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    d, low, codes = _affine_codes(x, importance, 31)
    return torch.cat([f16_bytes(d), f16_bytes(low), _fifth_bits(codes), _pack_nibbles(codes)], dim=1)


def _q8_0(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    blocks = _blocks(x)
    d = blocks.abs().max(dim=-1, keepdim=True).values / 127
    codes = _round_away(blocks * _inverse(d)).to(torch.int8)
    return torch.cat([f16_bytes(d), codes.view(torch.uint8)], dim=1)


def _q8_1(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    blocks = _blocks(x)
    d = blocks.abs().max(dim=-1, keepdim=True).values / 127
    codes = _round_away(blocks * _inverse(d))
    total = codes.sum(-1, keepdim=True) * d  # exact integer sum (|sum| <= 32 * 127), times d in float32
    return torch.cat([f16_bytes(d), f16_bytes(total), codes.to(torch.int8).view(torch.uint8)], dim=1)


def _q8_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    blocks = x.reshape(-1, QK_K)
    amax, index = blocks.abs().max(dim=-1, keepdim=True)
    is_zero = amax == 0
    iscale = rdiv(-127.0, torch.where(is_zero, 1.0, blocks.gather(-1, index)))
    codes = torch.where(is_zero, 0.0, torch.round(iscale * blocks).clamp_(max=127))
    block_sums = codes.reshape(-1, 16, 16).sum(-1).to(torch.int16)
    d = torch.where(is_zero, 0.0, rdiv(1.0, iscale))
    return torch.cat([d.view(torch.uint8), codes.to(torch.int8).view(torch.uint8), block_sums.view(torch.uint8)], dim=1)


def _k_quant(quantize_blocks: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> RowQuantizer:
    """A row quantizer from a super-block quantizer (`[B, 256]`, importance `[B, 256]` or None -> `[B, bytes]`)."""
    def quantize_rows(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        num_rows = x.shape[0]
        blocks = x.reshape(-1, QK_K)
        if importance is not None:
            importance = importance.reshape(1, -1).expand(num_rows, -1).reshape(-1, QK_K)
        return quantize_blocks(blocks, importance).reshape(num_rows, -1)
    return quantize_rows


def _legacy(quantize_blocks: RowQuantizer) -> RowQuantizer:
    """A row quantizer from a block quantizer that already takes rows (and returns `[num_blocks, bytes]`)."""
    def quantize_rows(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        return quantize_blocks(x, importance).reshape(x.shape[0], -1)
    return quantize_rows


# GGML type name -> its quantizer. Names as in mistralrs.quant.ggml_types.BLOCK_TYPES.
QUANTIZERS: dict[str, GGMLQuantizer] = {
    "Q4_0": GGMLQuantizer(32, 18, _legacy(_q4_0), True),
    "Q4_1": GGMLQuantizer(32, 20, _legacy(_q4_1), True),
    "Q5_0": GGMLQuantizer(32, 22, _legacy(_q5_0), True),
    "Q5_1": GGMLQuantizer(32, 24, _legacy(_q5_1), True),
    "Q8_0": GGMLQuantizer(32, 34, _legacy(_q8_0), False),
    "Q8_1": GGMLQuantizer(32, 36, _legacy(_q8_1), False),
    "Q2_K": GGMLQuantizer(QK_K, 84, _k_quant(quantize_q2_k), True),
    "Q3_K": GGMLQuantizer(QK_K, 110, _k_quant(quantize_q3_k), True),
    "Q4_K": GGMLQuantizer(QK_K, 144, _k_quant(quantize_q4_k), True),
    "Q5_K": GGMLQuantizer(QK_K, 176, _k_quant(quantize_q5_k), True),
    "Q6_K": GGMLQuantizer(QK_K, 210, _k_quant(quantize_q6_k), True),
    "Q8_K": GGMLQuantizer(QK_K, 292, _legacy(_q8_k), False),
}


def ggml_quantizer(ggml_type: str) -> GGMLQuantizer:
    """The quantizer of `ggml_type`; ValueError listing the accepted names."""
    if ggml_type not in QUANTIZERS:
        raise ValueError(f"ggml_type {ggml_type!r} cannot be quantized to; accepted: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[ggml_type]


def _checked_imatrix(imatrix: torch.Tensor | None, ggml_type: str, quantizer: GGMLQuantizer, num_cols: int,
                     device: torch.device) -> torch.Tensor | None:
    if imatrix is None:
        return None
    if not quantizer.takes_imatrix:
        accepted = ", ".join(name for name, q in QUANTIZERS.items() if q.takes_imatrix)
        raise ValueError(f"ggml_type {ggml_type} does not support an imatrix; types that do: {accepted}")
    if imatrix.dim() != 1 or imatrix.shape[0] != num_cols:
        raise ValueError(f"imatrix must be one value per input column ({num_cols}), got shape {list(imatrix.shape)}")
    return imatrix.to(device=device, dtype=torch.float32)


def quantize_ggml_rows(weight: torch.Tensor, ggml_type: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The GGML blocks of `weight` (`[..., cols]`, any float dtype) as uint8 `[rows, row_bytes]` on its device.

    `imatrix`: importance of each input column (`[cols]`), for the types that take one."""
    quantizer = ggml_quantizer(ggml_type)
    if weight.dim() == 0 or weight.shape[-1] % quantizer.block_size:
        raise ValueError(f"weight shape {list(weight.shape)}: the last dimension must be a multiple of the "
                         f"{ggml_type} block size {quantizer.block_size}")
    num_cols = weight.shape[-1]
    importance = _checked_imatrix(imatrix, ggml_type, quantizer, num_cols, weight.device)
    rows = weight.reshape(-1, num_cols)
    out = torch.empty(rows.shape[0], num_cols // quantizer.block_size * quantizer.type_size,
                      dtype=torch.uint8, device=weight.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS.get(weight.device.type, _CHUNK_ELEMENTS_ACCELERATOR) // num_cols)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows[start:start + rows_per_chunk].to(torch.float32)
        out[start:start + chunk.shape[0]] = quantizer.quantize_rows(chunk, importance)
    return out


def quantize_ggml(weight: torch.Tensor, ggml_type: str, imatrix: torch.Tensor | None = None) -> GGMLTensor:
    """`weight` (`[rows, cols]`, float) quantized to `ggml_type` blocks, as a `GGMLTensor` on the weight's device.

    `ggml_type`: one of `QUANTIZERS` (ValueError listing them otherwise). `imatrix`: importance per input column
    (`[cols]`) for Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K; ValueError for the 8-bit types.
    """
    data = quantize_ggml_rows(weight, ggml_type, imatrix)
    return GGMLTensor(data, ggml_type, tuple(weight.shape))
