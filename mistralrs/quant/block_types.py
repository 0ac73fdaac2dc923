"""The shape of a GGML block format, and the byte-level helpers the per-type decoders share.

Every quantized GGML type decodes to the same affine form, per group of `group_size` consecutive weights:
`weight = scale * code + bias`, with small integer codes, a float32 scale per group and an optional float32
bias per group (`AffineBlocks`). The dequantizers are that product (in the order of `gguf.quants`, so the two
agree bit for bit), and the CPU int4 kernel repacks the same codes and scales (mistralrs/quant/cpu_int4.py).
Types whose gguf decoder multiplies by a sign or adds a fractional delta still fit: a product by +-1 is exact,
and IQ1's `dl * (grid + delta)` with delta = +-1/8 equals `(dl / 8) * (8 * grid +- 1)` exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256  # weights per K-quant / IQ super-block


@dataclass(frozen=True)
class AffineBlocks:
    """Blocks decoded to integer codes with a scale (and bias) per group: weight = scale * code + bias."""

    codes: torch.Tensor  # int16 [n, block_size], small integers (exact in float32 and bfloat16)
    scale: torch.Tensor  # float32 [n, block_size // group_size]
    bias: torch.Tensor | None  # float32 [n, block_size // group_size], or None for no bias
    group_size: int  # consecutive weights sharing one scale (16, 32 or 256)

    def dequantize(self) -> torch.Tensor:
        """float32 `[n, block_size]`: `scale * code (+ bias)`, one rounding per operation as in gguf."""
        n = self.codes.shape[0]
        values = self.scale.unsqueeze(-1) * self.codes.reshape(n, -1, self.group_size).float()
        if self.bias is not None:
            values = values + self.bias.unsqueeze(-1)
        return values.reshape(n, -1)


@dataclass(frozen=True)
class GGMLBlockType:
    """One GGML block format: its sizes, its decoder to `AffineBlocks` and its dequantizer."""

    name: str  # GGML type name, e.g. "Q4_K"
    block_size: int  # weights per block
    type_size: int  # bytes per block
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, type_size] -> float32 [n, block_size]
    decode: Callable[[torch.Tensor], AffineBlocks] | None = None  # None for the float types
    code_range: tuple[int, int] = (0, 0)  # smallest and largest code `decode` can return
    int4_cpu: bool = False  # repacked for the CPU int4 kernel (bf16 scales cannot overflow)


def affine_type(name: str, block_size: int, type_size: int, decode: Callable[[torch.Tensor], AffineBlocks],
                code_range: tuple[int, int], int4_cpu: bool = True) -> GGMLBlockType:
    """A quantized type whose dequantizer is its affine decoding."""
    return GGMLBlockType(name, block_size, type_size, lambda blocks: decode(blocks).dequantize(), decode,
                         code_range, int4_cpu)


def le_uint(blocks: torch.Tensor, offset: int, num_bytes: int) -> torch.Tensor:
    """The little-endian unsigned integer at bytes `[offset, offset + num_bytes)` of each block -> int64 `[n]`
    (assembled byte by byte, so any alignment works)."""
    value = blocks[:, offset].long()
    for i in range(1, num_bytes):
        value = value | (blocks[:, offset + i].long() << (8 * i))
    return value


def le_uints(blocks: torch.Tensor, offset: int, count: int, num_bytes: int) -> torch.Tensor:
    """`count` consecutive little-endian unsigned integers of `num_bytes` bytes from byte `offset` of each block
    -> int64 `[n, count]`."""
    raw = blocks[:, offset:offset + count * num_bytes].reshape(blocks.shape[0], count, num_bytes).long()
    value = raw[..., 0]
    for i in range(1, num_bytes):
        value = value | (raw[..., i] << (8 * i))
    return value


def f16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Integer tensor of IEEE half bit patterns (0..65535) -> float32, the same shape."""
    return bits.to(torch.int32).to(torch.int16).contiguous().view(torch.float16).float()


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 at byte `offset` of each block -> float32 `[n, 1]`."""
    return f16_from_bits(le_uint(blocks, offset, 2)).unsqueeze(1)


def f32_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f32 at byte `offset` of each block -> float32 `[n, 1]`."""
    return le_uint(blocks, offset, 4).to(torch.int32).contiguous().view(torch.float32).unsqueeze(1)


def shifts(values: list[int] | range, device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A 1-D tensor of small constants (shift amounts, powers) on `device`, made once per device and dtype."""
    return _small_constant(tuple(values), torch.device(device), dtype)


@functools.cache
def _small_constant(values: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def split_bits(packed: torch.Tensor, bit_shifts: list[int] | range, mask: int) -> torch.Tensor:
    """`packed` `[..., m]` -> `[..., len(bit_shifts), m]`: `(packed >> s) & mask` for each shift s (the numpy
    `x.reshape(..., 1, m) >> shifts.reshape(k, 1)` pattern of gguf)."""
    s = shifts(bit_shifts, packed.device, packed.dtype).reshape(-1, 1)
    return torch.bitwise_and(packed.unsqueeze(-2) >> s, mask)


def low_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[n, m]` -> uint8 `[n, 2 m]`: the low nibbles of the m bytes, then their high nibbles."""
    return split_bits(packed, [0, 4], 0x0F).reshape(packed.shape[0], -1)


def bits_lsb_first(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., m]` -> uint8 `[..., m, 8]`: bit i of each byte at index i (0 or 1)."""
    s = shifts(range(8), packed.device)
    return torch.bitwise_and(packed.unsqueeze(-1) >> s, 1)


def signs_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 sign bits -> int16 +1/-1."""
    return 1 - 2 * bits.to(torch.int16)


@functools.cache
def constant_table(build: Callable[[], np.ndarray], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The constant table `build()` (a codebook, a sign table) as a `dtype` tensor on `device`, made once per
    device and dtype."""
    return torch.from_numpy(np.array(build(), copy=True)).to(device=device, dtype=dtype)


def lookup(build: Callable[[], np.ndarray], index: torch.Tensor, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """`build()[index]`: rows of a constant table picked by an integer tensor (any shape)."""
    return constant_table(build, dtype, index.device)[index.long()]
