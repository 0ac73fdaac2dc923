"""The K-quant block formats (256-weight super-blocks) and the ternary TQ formats, decoded in torch.

Layouts (bytes, in order), each weight = scale * code + bias per sub-block, as `gguf.quants` computes them:

- Q2_K (84): 16 bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit codes, f16 d, f16 dmin;
  sub-blocks of 16: (d * sc) * q - dmin * m, q in 0..3.
- Q3_K (110): 32 bytes of high-bit masks, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, f16 d;
  sub-blocks of 16: (d * (sc - 32)) * q, q in -4..3 (a set mask bit means no -4).
- Q4_K (144) / Q5_K (176): f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs, (Q5_K: 32 bytes of fifth
  bits,) 128 bytes of nibbles; sub-blocks of 32: (d * sc) * q - dmin * m.
- Q6_K (210): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales, f16 d;
  sub-blocks of 16: (d * sc) * (q - 32).
- Q8_K (292): f32 d, 256 signed bytes, 16 int16 block sums (unused here); d * q.
- TQ1_0 (54): 48 bytes of base-3 digits (5 per byte, 4 in the last 4 bytes), f16 d; d * (t - 1), t in 0..2.
- TQ2_0 (66): 64 bytes of 2-bit codes, f16 d; d * (q - 1).
"""

from __future__ import annotations

import torch

from mistralrs.quant.block_types import (QK_K, AffineBlocks, GGMLBlockType, affine_type, f16_at,
                                         f32_at, shifts, split_bits)


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> (scales, mins) float32 `[n, 8]`."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def decode_q2_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q2_K: 16 sub-blocks of 16 with 4-bit scale and min."""
    n = blocks.shape[0]
    packed_scales = blocks[:, 0:16]
    d, dmin = f16_at(blocks, 80), f16_at(blocks, 82)
    scale = d * (packed_scales & 0x0F).float()
    bias = -(dmin * (packed_scales >> 4).float())
    codes = split_bits(blocks[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 0x03)  # [n, 2, 4, 32]
    return AffineBlocks(codes.reshape(n, QK_K).to(torch.int16), scale, bias, 16)


def decode_q3_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q3_K: 16 sub-blocks of 16 with 6-bit signed scales, codes -4..3."""
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = split_bits(packed[:, 0:8], [0, 4], 0x0F).reshape(n, 16)
    high = split_bits(packed[:, 8:12], [0, 2, 4, 6], 0x03).reshape(n, 16)
    scale = f16_at(blocks, 108) * ((low | (high << 4)).to(torch.int16) - 32).float()
    low_bits = split_bits(blocks[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, QK_K)
    high_bits = split_bits(blocks[:, 0:32], range(8), 0x01).reshape(n, QK_K)
    codes = low_bits.to(torch.int16) - ((high_bits ^ 1).to(torch.int16) << 2)
    return AffineBlocks(codes, scale, None, 16)


def _k_affine(blocks: torch.Tensor, codes: torch.Tensor) -> AffineBlocks:
    """Q4_K/Q5_K: scale d * sc and bias -dmin * m per sub-block of 32."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    return AffineBlocks(codes.to(torch.int16), f16_at(blocks, 0) * scales, -(f16_at(blocks, 2) * mins), 32)


def _nibble_pairs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[n, 128]` -> `[n, 256]`: per 32-byte chunk, its low nibbles then its high nibbles."""
    return split_bits(packed.reshape(packed.shape[0], 4, 32), [0, 4], 0x0F).reshape(packed.shape[0], QK_K)


def decode_q4_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q4_K: 8 sub-blocks of 32, codes 0..15."""
    return _k_affine(blocks, _nibble_pairs(blocks[:, 16:144]))


def decode_q5_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q5_K: 8 sub-blocks of 32, codes 0..31 (fifth bit i of byte j for weight 32 i + j)."""
    n = blocks.shape[0]
    fifth = split_bits(blocks[:, 16:48], range(8), 0x01).reshape(n, QK_K)
    return _k_affine(blocks, _nibble_pairs(blocks[:, 48:176]) | (fifth << 4))


def decode_q6_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, codes -32..31."""
    n = blocks.shape[0]
    scale = f16_at(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()
    low = split_bits(blocks[:, 0:128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, QK_K)
    high = split_bits(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, QK_K)
    return AffineBlocks((low | (high << 4)).to(torch.int16) - 32, scale, None, 16)


def decode_q8_k(blocks: torch.Tensor) -> AffineBlocks:
    """Q8_K: one f32 scale per 256 signed bytes."""
    codes = blocks[:, 4:260].contiguous().view(torch.int8).to(torch.int16)
    return AffineBlocks(codes, f32_at(blocks, 0), None, QK_K)


def decode_tq1_0(blocks: torch.Tensor) -> AffineBlocks:
    """TQ1_0: base-3 digits packed as fixed-point fractions; digit k of byte b is (b * 3^k mod 256) * 3 >> 8."""
    n = blocks.shape[0]
    powers = shifts([1, 3, 9, 27, 81], blocks.device).reshape(5, 1)
    first = (blocks[:, 0:32].unsqueeze(1) * powers).reshape(n, 160)  # uint8 products wrap mod 256, as in gguf
    second = (blocks[:, 32:48].unsqueeze(1) * powers).reshape(n, 80)
    last = (blocks[:, 48:52].unsqueeze(1) * powers[:4]).reshape(n, 16)
    digits = (torch.cat([first, second, last], dim=1).to(torch.int16) * 3) >> 8
    return AffineBlocks(digits - 1, f16_at(blocks, 52), None, QK_K)


def decode_tq2_0(blocks: torch.Tensor) -> AffineBlocks:
    """TQ2_0: 2-bit codes minus one, one f16 scale."""
    n = blocks.shape[0]
    codes = split_bits(blocks[:, 0:64].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, QK_K)
    return AffineBlocks(codes.to(torch.int16) - 1, f16_at(blocks, 64), None, QK_K)


KQUANT_TYPES: dict[str, GGMLBlockType] = {
    "Q2_K": affine_type("Q2_K", QK_K, 84, decode_q2_k, (0, 3)),
    "Q3_K": affine_type("Q3_K", QK_K, 110, decode_q3_k, (-4, 3)),
    "Q4_K": affine_type("Q4_K", QK_K, 144, decode_q4_k, (0, 15)),
    "Q5_K": affine_type("Q5_K", QK_K, 176, decode_q5_k, (0, 31)),
    "Q6_K": affine_type("Q6_K", QK_K, 210, decode_q6_k, (-32, 31)),
    "Q8_K": affine_type("Q8_K", QK_K, 292, decode_q8_k, (-128, 127)),
    "TQ1_0": affine_type("TQ1_0", QK_K, 54, decode_tq1_0, (-1, 1)),
    "TQ2_0": affine_type("TQ2_0", QK_K, 66, decode_tq2_0, (-1, 2)),
}
