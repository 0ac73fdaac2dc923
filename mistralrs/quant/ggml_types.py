"""GGML block formats and their dequantizers, written in torch (vectorized, on any device).

A GGML block type stores `block_size` consecutive weights of a row in `type_size` bytes; a row of a GGML
tensor is `num_cols / block_size` blocks back to back. `BLOCK_TYPES` holds every type the `gguf` package can
dequantize (and Q8_K), from three files:

- here: the float types (F32, F16, BF16: blocks of one element) and the legacy types with 32-weight blocks:
  Q4_0 (f16 d, 16 bytes of 4-bit codes; d * (q - 8)), Q4_1 (f16 d, f16 m; d * q + m), Q5_0 / Q5_1 (the same
  with a fifth bit per weight in a 32-bit word), Q8_0 (f16 d, 32 signed bytes; d * q), Q8_1 (f16 d, f16 s = d *
  sum(q), 32 signed bytes; d * q: ggml's 36-byte layout, which the quantizers write; gguf-py's size table still
  says 40 bytes and gguf cannot dequantize it, so it is checked against a decoder written in the test);
- mistralrs/quant/kquant_types.py: Q2_K .. Q6_K, Q8_K, TQ1_0, TQ2_0 (256-weight super-blocks);
- mistralrs/quant/iquant_types.py: IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M,
  MXFP4, NVFP4 (codebook types).

In the 4-bit legacy types, byte j of the codes holds weight j in its low nibble and weight j + 16 in its high
nibble. Every dequantizer performs the float32 operations of `gguf.quants.dequantize` in the same order, so the
two agree bit for bit (tests/quant/test_ggml_types.py). The integer types (I8..I64), F64 and Q1_0 (no dequantizer
in gguf) are left out.
"""

from __future__ import annotations

import torch

from mistralrs.quant.block_types import (AffineBlocks, GGMLBlockType, affine_type, bits_lsb_first, f16_at,
                                         low_high_nibbles)
from mistralrs.quant.iquant_types import IQUANT_TYPES
from mistralrs.quant.kquant_types import KQUANT_TYPES


def _elements(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 `[n, itemsize]` -> `dtype` `[n, 1]` (copied first when the bytes are not aligned for a view)."""
    if not blocks.is_contiguous() or blocks.storage_offset() % dtype.itemsize:
        blocks = blocks.clone()
    return blocks.view(dtype)


def _dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return _elements(blocks, torch.float32)


def _dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _elements(blocks, torch.float16).float()


def _dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bit for bit as gguf: the 16 bits become the high half of a float32 (NaN payloads kept)
    return (_elements(blocks, torch.int16).to(torch.int32) << 16).view(torch.float32)


def _fifth_bits(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5's 32-bit word of high bits at `offset` -> uint8 `[n, 32]`, bit j for weight j."""
    return bits_lsb_first(blocks[:, offset:offset + 4]).reshape(blocks.shape[0], 32)


def decode_q4_0(blocks: torch.Tensor) -> AffineBlocks:
    """Q4_0 (18 bytes): codes q - 8, scale d."""
    return AffineBlocks(low_high_nibbles(blocks[:, 2:18]).to(torch.int16) - 8, f16_at(blocks, 0), None, 32)


def decode_q4_1(blocks: torch.Tensor) -> AffineBlocks:
    """Q4_1 (20 bytes): codes q, scale d, bias m."""
    return AffineBlocks(low_high_nibbles(blocks[:, 4:20]).to(torch.int16), f16_at(blocks, 0), f16_at(blocks, 2), 32)


def decode_q5_0(blocks: torch.Tensor) -> AffineBlocks:
    """Q5_0 (22 bytes: d, 32 high bits, 16 bytes of nibbles): codes q - 16, scale d."""
    codes = low_high_nibbles(blocks[:, 6:22]) | (_fifth_bits(blocks, 2) << 4)
    return AffineBlocks(codes.to(torch.int16) - 16, f16_at(blocks, 0), None, 32)


def decode_q5_1(blocks: torch.Tensor) -> AffineBlocks:
    """Q5_1 (24 bytes: d, m, 32 high bits, 16 bytes of nibbles): codes q, scale d, bias m."""
    codes = low_high_nibbles(blocks[:, 8:24]) | (_fifth_bits(blocks, 4) << 4)
    return AffineBlocks(codes.to(torch.int16), f16_at(blocks, 0), f16_at(blocks, 2), 32)


def decode_q8_0(blocks: torch.Tensor) -> AffineBlocks:
    """Q8_0 (34 bytes): codes the signed bytes, scale d."""
    codes = blocks[:, 2:34].contiguous().view(torch.int8).to(torch.int16)
    return AffineBlocks(codes, f16_at(blocks, 0), None, 32)


def decode_q8_1(blocks: torch.Tensor) -> AffineBlocks:
    """Q8_1 (36 bytes): codes the signed bytes after d and s, scale d."""
    codes = blocks[:, 4:36].contiguous().view(torch.int8).to(torch.int16)
    return AffineBlocks(codes, f16_at(blocks, 0), None, 32)


# GGML type name → format. The GGUF loader keeps 2-D tensors of these types in block form.
BLOCK_TYPES: dict[str, GGMLBlockType] = {
    "F32": GGMLBlockType("F32", 1, 4, _dequantize_f32),
    "F16": GGMLBlockType("F16", 1, 2, _dequantize_f16),
    "BF16": GGMLBlockType("BF16", 1, 2, _dequantize_bf16),
    "Q4_0": affine_type("Q4_0", 32, 18, decode_q4_0, (-8, 7)),
    "Q4_1": affine_type("Q4_1", 32, 20, decode_q4_1, (0, 15)),
    "Q5_0": affine_type("Q5_0", 32, 22, decode_q5_0, (-16, 15)),
    "Q5_1": affine_type("Q5_1", 32, 24, decode_q5_1, (0, 31)),
    "Q8_0": affine_type("Q8_0", 32, 34, decode_q8_0, (-128, 127)),
    "Q8_1": affine_type("Q8_1", 32, 36, decode_q8_1, (-128, 127)),
    **KQUANT_TYPES,
    **IQUANT_TYPES,
}

FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as plain numbers, not blocks of codes


def block_type(ggml_type: str) -> GGMLBlockType:
    """The format named `ggml_type`; ValueError listing the supported names."""
    if ggml_type not in BLOCK_TYPES:
        raise ValueError(f"ggml_type {ggml_type!r} has no torch block format; supported: {', '.join(BLOCK_TYPES)}")
    return BLOCK_TYPES[ggml_type]


def dequantize_rows(data: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """uint8 `[num_rows, row_bytes]` of `ggml_type` blocks -> float32 `[num_rows, num_cols]`."""
    fmt = block_type(ggml_type)
    num_rows, row_bytes = data.shape
    if row_bytes % fmt.type_size:
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of {ggml_type} blocks "
                         f"({fmt.type_size} bytes)")
    blocks = data.reshape(-1, fmt.type_size)
    return fmt.dequantize_blocks(blocks).reshape(num_rows, row_bytes // fmt.type_size * fmt.block_size)
