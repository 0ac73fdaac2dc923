"""The codebook block formats (IQ*, MXFP4, NVFP4), decoded in torch.

Each weight is a scale times an integer from a table: IQ4 and the FP4 types index a 16-entry table of signed
integers; IQ2/IQ3 index grids of 4 or 8 small positive integers and flip signs per weight; IQ1 indexes a grid of
-1/0/1 and adds +-1/8 per group of 8 (taken here as codes 8 * grid +- 1 with the scale divided by 8, exactly
the same products). The grids are llama.cpp's, kept in mistralrs/quant/iq_grids.py; the 7-bit sign table is
computed (each index with its parity as the eighth bit) and IQ4's 16 values are written below. Layouts (bytes):

- IQ4_NL (18): f16 d, 16 bytes of nibbles (low nibbles first); d * kvalues[q]. Blocks of 32.
- IQ4_XS (136): f16 d, 16-bit high scale bits, 4 bytes of low scale nibbles, 128 bytes of nibbles;
  sub-blocks of 32: d * (sc - 32) * kvalues[q].
- IQ2_XXS (66): f16 d, 8 x (4 grid bytes, 32 bits: 4 x 7-bit sign indices, 4-bit scale);
  sub-blocks of 32: d * (0.5 + s) * 0.25 * grid * sign.
- IQ2_XS (74): f16 d, 32 x uint16 (9-bit grid index, 7-bit sign index), 8 bytes of 4-bit scales; sub-blocks of 16.
- IQ2_S (82): f16 d, 32 grid bytes, 32 sign bytes, 8 bytes of 2-bit grid-index highs, 8 bytes of 4-bit scales;
  sub-blocks of 16.
- IQ3_XXS (98): f16 d, 64 grid bytes (4 values each), 8 x 32 bits of signs and scale;
  sub-blocks of 32: d * (0.5 + s) * 0.5 * grid * sign.
- IQ3_S (110): f16 d, 64 grid bytes, 8 bytes of ninth index bits, 32 sign bytes, 4 bytes of 4-bit scales;
  sub-blocks of 32: d * (1 + 2 s) * grid * sign.
- IQ1_S (50): f16 d, 32 grid bytes, 8 x uint16 (3-bit index highs x 4, 3-bit scale, delta sign);
  sub-blocks of 32: d * (2 s + 1) * (grid + delta).
- IQ1_M (56): 32 grid bytes, 16 bytes of (3-bit index high, delta sign) nibbles, 4 x uint16 of 3-bit scales
  whose top nibbles form the f16 d; sub-blocks of 16, delta per 8.
- MXFP4 (17): e8m0 exponent byte, 16 bytes of nibbles; 2^(e - 128) * doubled-e2m1[q]. Blocks of 32.
- NVFP4 (36): 4 ue4m3 scales, 4 x 8 bytes of nibbles; sub-blocks of 16.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mistralrs.quant.block_types import (QK_K, AffineBlocks, GGMLBlockType, affine_type, bits_lsb_first, f16_at,
                                         f16_from_bits, le_uint, le_uints, lookup, low_high_nibbles, shifts,
                                         signs_from_bits, split_bits)
from mistralrs.quant.iq_grids import GRIDS, unpack_grid

# MXFP4/NVFP4: e2m1 values doubled (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, times two)
_FP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# IQ4_NL / IQ4_XS: ggml-common.h's kvalues_iq4nl
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@functools.cache
def _grid(name: str) -> np.ndarray:
    """The decoded grid of IQ type `name`: `[num_entries, 4 or 8]` small integers (as float32)."""
    return unpack_grid(GRIDS[name])


def _iq2xxs_grid() -> np.ndarray:
    return _grid("IQ2_XXS")


def _iq2xs_grid() -> np.ndarray:
    return _grid("IQ2_XS")


def _iq2s_grid() -> np.ndarray:
    return _grid("IQ2_S")


def _iq3xxs_grid() -> np.ndarray:
    return _grid("IQ3_XXS")


def _iq3s_grid() -> np.ndarray:
    return _grid("IQ3_S")


def _iq1s_grid() -> np.ndarray:
    return _grid("IQ1_S")


def _ksigns() -> np.ndarray:
    """128 bytes: the 8 sign bits for each 7-bit sign index (the eighth bit is the parity: an even count)."""
    index = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(index[:, None], axis=1).sum(axis=1, dtype=np.uint8) & 1
    return index | (parity << 7)


def _iq4_values() -> np.ndarray:
    return np.array(_IQ4_VALUES, dtype=np.int16)


def _fp4_values() -> np.ndarray:
    return np.array(_FP4_VALUES, dtype=np.int16)


def _e8m0_half() -> np.ndarray:
    """The MXFP4 scale of each exponent byte e: 2^(e - 128) as float32 (e < 2 gives subnormals)."""
    e = np.arange(256, dtype=np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)


def _ue4m3_half() -> np.ndarray:
    """The NVFP4 scale of each byte: unsigned e4m3 (bias 7, bit 7 ignored, 0x7F and 0 give 0) times 0.5."""
    x = np.arange(256)
    exp, man = (x >> 3) & 0xF, (x & 0x7).astype(np.float64)
    raw = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    return np.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5).astype(np.float32)  # every value exact in float32


def _signed_grid(grid_build, index: torch.Tensor, sign_bits: torch.Tensor) -> torch.Tensor:
    """grid[index] (`[..., k]`) times +-1 from `sign_bits` (`[..., k]` of 0/1) -> int16."""
    return lookup(grid_build, index) * signs_from_bits(sign_bits)


def _ksign_bits(sign_index: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices `[...]` -> their 8 sign bits `[..., 8]`."""
    return bits_lsb_first(lookup(_ksigns, sign_index, torch.uint8))


def _half_steps(d: torch.Tensor, nibbles: torch.Tensor, factor: float) -> torch.Tensor:
    """IQ2/IQ3_XXS sub-block scale `d * (0.5 + s) * factor`, in gguf's order."""
    return d * (0.5 + nibbles.float()) * factor


def decode_iq4_nl(blocks: torch.Tensor) -> AffineBlocks:
    return AffineBlocks(lookup(_iq4_values, low_high_nibbles(blocks[:, 2:18])), f16_at(blocks, 0), None, 32)


def decode_iq4_xs(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    low = low_high_nibbles(blocks[:, 4:8].reshape(n * 4, 1)).reshape(n, 8)
    high = (le_uint(blocks, 2, 2).unsqueeze(1) >> shifts(range(0, 16, 2), blocks.device, torch.int64)) & 0x03
    scale = f16_at(blocks, 0) * ((low.long() | (high << 4)) - 32).float()
    codes = split_bits(blocks[:, 8:136].reshape(n, 8, 16), [0, 4], 0x0F).reshape(n, QK_K)
    return AffineBlocks(lookup(_iq4_values, codes), scale, None, 32)


def decode_iq2_xxs(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    words = blocks[:, 2:66].reshape(n * 8, 8)
    sign_word = le_uint(words, 4, 4).reshape(n, 8)
    scale = _half_steps(f16_at(blocks, 0), sign_word >> 28, 0.25)
    sign_index = (sign_word.unsqueeze(-1) >> shifts([0, 7, 14, 21], blocks.device, torch.int64)) & 0x7F
    codes = _signed_grid(_iq2xxs_grid, words[:, 0:4].reshape(n, 8, 4), _ksign_bits(sign_index))
    return AffineBlocks(codes.reshape(n, QK_K), scale, None, 32)


def decode_iq2_xs(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    entries = le_uints(blocks, 2, 32, 2)  # [n, 32] uint16 values
    scale = _half_steps(f16_at(blocks, 0), low_high_nibbles(blocks[:, 66:74].reshape(n * 8, 1)).reshape(n, 16), 0.25)
    codes = _signed_grid(_iq2xs_grid, entries & 511, _ksign_bits(entries >> 9))
    return AffineBlocks(codes.reshape(n, QK_K), scale, None, 16)


def decode_iq2_s(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    highs = split_bits(blocks[:, 66:74].unsqueeze(-1), [0, 2, 4, 6], 0x03).reshape(n, 32)
    index = blocks[:, 2:34].long() | (highs.long() << 8)
    scale = _half_steps(f16_at(blocks, 0), low_high_nibbles(blocks[:, 74:82].reshape(n * 8, 1)).reshape(n, 16), 0.25)
    codes = _signed_grid(_iq2s_grid, index, bits_lsb_first(blocks[:, 34:66]))
    return AffineBlocks(codes.reshape(n, QK_K), scale, None, 16)


def decode_iq3_xxs(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    sign_word = le_uints(blocks, 66, 8, 4)  # [n, 8]
    scale = _half_steps(f16_at(blocks, 0), sign_word >> 28, 0.5)
    sign_index = (sign_word.unsqueeze(-1) >> shifts([0, 7, 14, 21], blocks.device, torch.int64)) & 0x7F
    sign_bits = _ksign_bits(sign_index).reshape(n, 64, 4)  # 8 sub-blocks x 4 sign bytes x 8 bits
    codes = _signed_grid(_iq3xxs_grid, blocks[:, 2:66], sign_bits)
    return AffineBlocks(codes.reshape(n, QK_K), scale, None, 32)


def decode_iq3_s(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    nibbles = low_high_nibbles(blocks[:, 106:110].reshape(n * 4, 1)).reshape(n, 8)
    scale = f16_at(blocks, 0) * (1 + 2 * nibbles).float()
    index = blocks[:, 2:66].long() | (bits_lsb_first(blocks[:, 66:74]).reshape(n, 64).long() << 8)
    sign_bits = bits_lsb_first(blocks[:, 74:106]).reshape(n, 64, 4)
    codes = _signed_grid(_iq3s_grid, index, sign_bits)
    return AffineBlocks(codes.reshape(n, QK_K), scale, None, 32)


def _iq1_codes(index: torch.Tensor, negative_delta: torch.Tensor) -> torch.Tensor:
    """IQ1 codes 8 * grid[index] +- 1 (`[..., 8]` int16): the grid values plus a delta of -+1/8, times 8."""
    return lookup(_iq1s_grid, index) * 8 + (1 - 2 * negative_delta.to(torch.int16)).unsqueeze(-1)


def decode_iq1_s(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    high = le_uints(blocks, 34, 8, 2)  # [n, 8]
    scale = f16_at(blocks, 0) * (2 * ((high >> 12) & 7) + 1).float() * 0.125
    index_highs = (high.unsqueeze(-1) >> shifts([0, 3, 6, 9], blocks.device, torch.int64)) & 7  # [n, 8, 4]
    index = blocks[:, 2:34].long() | (index_highs.reshape(n, 32) << 8)
    negative = (high >> 15).unsqueeze(-1).expand(n, 8, 4).reshape(n, 32)
    return AffineBlocks(_iq1_codes(index, negative).reshape(n, QK_K), scale, None, 32)


def decode_iq1_m(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    words = le_uints(blocks, 48, 4, 2)  # [n, 4]
    d_bits = sum(((words[:, i] & 0xF000) >> (12 - 4 * i)) for i in range(4))
    d = f16_from_bits(d_bits).unsqueeze(1)
    scale_bits = (words.unsqueeze(-1) >> shifts([0, 3, 6, 9], blocks.device, torch.int64)) & 7  # [n, 4, 4]
    scale = d * (2 * scale_bits.reshape(n, 16) + 1).float() * 0.125
    nibbles = split_bits(blocks[:, 32:48].unsqueeze(-1), [0, 4], 0x0F).reshape(n, 32)
    index = blocks[:, 0:32].long() | ((nibbles & 0x07).long() << 8)
    return AffineBlocks(_iq1_codes(index, nibbles >> 3).reshape(n, QK_K), scale, None, 16)


def decode_mxfp4(blocks: torch.Tensor) -> AffineBlocks:
    scale = lookup(_e8m0_half, blocks[:, 0:1], torch.float32)
    return AffineBlocks(lookup(_fp4_values, low_high_nibbles(blocks[:, 1:17])), scale, None, 32)


def decode_nvfp4(blocks: torch.Tensor) -> AffineBlocks:
    n = blocks.shape[0]
    scale = lookup(_ue4m3_half, blocks[:, 0:4], torch.float32)
    codes = low_high_nibbles(blocks[:, 4:36].reshape(n * 4, 8)).reshape(n, 64)
    return AffineBlocks(lookup(_fp4_values, codes), scale, None, 16)


IQUANT_TYPES: dict[str, GGMLBlockType] = {
    "IQ4_NL": affine_type("IQ4_NL", 32, 18, decode_iq4_nl, (-127, 113)),
    "IQ4_XS": affine_type("IQ4_XS", QK_K, 136, decode_iq4_xs, (-127, 113)),
    "IQ2_XXS": affine_type("IQ2_XXS", QK_K, 66, decode_iq2_xxs, (-43, 43)),
    "IQ2_XS": affine_type("IQ2_XS", QK_K, 74, decode_iq2_xs, (-43, 43)),
    "IQ2_S": affine_type("IQ2_S", QK_K, 82, decode_iq2_s, (-43, 43)),
    "IQ3_XXS": affine_type("IQ3_XXS", QK_K, 98, decode_iq3_xxs, (-62, 62)),
    "IQ3_S": affine_type("IQ3_S", QK_K, 110, decode_iq3_s, (-15, 15)),
    "IQ1_S": affine_type("IQ1_S", QK_K, 50, decode_iq1_s, (-9, 9)),
    "IQ1_M": affine_type("IQ1_M", QK_K, 56, decode_iq1_m, (-9, 9)),
    # the FP4 scales reach 2^127: bfloat16 copies of 16 x scale would overflow, so no int4 form
    "MXFP4": affine_type("MXFP4", 32, 17, decode_mxfp4, (-12, 12), int4_cpu=False),
    "NVFP4": affine_type("NVFP4", 64, 36, decode_nvfp4, (-12, 12), int4_cpu=False),
}
