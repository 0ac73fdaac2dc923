"""GGML block formats and their dequantizers, written in torch (vectorized, on any device).

A GGML block type stores `block_size` consecutive weights of a row in `type_size` bytes; a row of a GGML
tensor is `num_cols / block_size` blocks back to back. The legacy types kept quantized here:

- Q4_0 (18 bytes): f16 `d`, then 16 bytes of 4-bit codes `q`; weight = d * (q - 8).
- Q4_1 (20 bytes): f16 `d`, f16 `m`, then 16 bytes of 4-bit codes `q`; weight = d * q + m.
- Q8_0 (34 bytes): f16 `d`, then 32 signed bytes `q`; weight = d * q.

In the 4-bit types, byte j of the codes holds weight j in its low nibble and weight j + 16 in its high nibble.
The dequantizers perform the float32 operations of `gguf.quants.dequantize` in the same order, so the two agree
bit for bit (tests/quant/test_ggml_types.py). Later block types (K-quants, IQ) add one entry to `BLOCK_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def f16_scalars(blocks: torch.Tensor, index: int) -> torch.Tensor:
    """The f16 at bytes `[2 * index, 2 * index + 2)` of each block (uint8 `[n, type_size]`, rows starting at even
    byte offsets, as in every GGUF tensor) -> float32 `[n, 1]`."""
    return blocks.view(torch.float16)[:, index:index + 1].float()


def unpack_nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """uint8 `[n, 16]` packed codes -> `dtype` `[n, 32]` codes 0..15 in weight order (low nibbles first)."""
    codes = torch.empty(packed.shape[0], 2, packed.shape[1], dtype=dtype, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=codes[:, 0])
    torch.bitwise_right_shift(packed, 4, out=codes[:, 1])
    return codes.reshape(packed.shape[0], 2 * packed.shape[1])


def split_q4_0(blocks: torch.Tensor, code_dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 blocks uint8 `[n, 18]` -> (d float32 `[n, 1]`, codes `[n, 32]` in 0..15)."""
    return f16_scalars(blocks, 0), unpack_nibbles(blocks[:, 2:], code_dtype)


def split_q4_1(blocks: torch.Tensor, code_dtype: torch.dtype = torch.uint8
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks uint8 `[n, 20]` -> (d float32 `[n, 1]`, m float32 `[n, 1]`, codes `[n, 32]` in 0..15)."""
    return f16_scalars(blocks, 0), f16_scalars(blocks, 1), unpack_nibbles(blocks[:, 4:], code_dtype)


def split_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks uint8 `[n, 34]` -> (d float32 `[n, 1]`, codes int8 `[n, 32]`, a view of the blocks)."""
    return f16_scalars(blocks, 0), blocks[:, 2:].view(torch.int8)


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, codes = split_q4_0(blocks)
    return d * (codes.to(torch.int8) - 8).float()


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, codes = split_q4_1(blocks)
    return d * codes.float() + m  # two roundings (no fused multiply-add), as gguf's numpy code


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, codes = split_q8_0(blocks)
    return d * codes.float()


@dataclass(frozen=True)
class GGMLBlockType:
    """One GGML block format and its torch dequantizer."""

    name: str  # GGML type name, e.g. "Q4_1"
    block_size: int  # weights per block
    type_size: int  # bytes per block
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, type_size] -> float32 [n, block_size]


# GGML type name → format. The GGUF loader keeps tensors of these types quantized (it dequantizes the others).
BLOCK_TYPES: dict[str, GGMLBlockType] = {
    "Q4_0": GGMLBlockType("Q4_0", 32, 18, _dequantize_q4_0),
    "Q4_1": GGMLBlockType("Q4_1", 32, 20, _dequantize_q4_1),
    "Q8_0": GGMLBlockType("Q8_0", 32, 34, _dequantize_q8_0),
}


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
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of {ggml_type} blocks ({fmt.type_size} bytes)")
    blocks = data.reshape(-1, fmt.type_size)
    return fmt.dequantize_blocks(blocks).reshape(num_rows, row_bytes // fmt.type_size * fmt.block_size)
