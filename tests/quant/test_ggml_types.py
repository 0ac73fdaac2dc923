"""The torch GGML dequantizers against the `gguf` package's reference (bit for bit), and `GGMLTensor`.

Blocks are random bytes with their scale fields overwritten by finite values (f16 scales of both signs over
many magnitudes, zero and subnormal included), so every code path of every decoder is exercised. Q8_K and Q8_1,
which gguf cannot dequantize, are checked against numpy decoders written here from ggml's block structs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs.quant import ggml_tensor
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES, FLOAT_TYPES, block_type, dequantize_rows

TYPES = list(BLOCK_TYPES)
QUANTIZED_TYPES = [name for name in TYPES if name not in FLOAT_TYPES]
# byte offsets of the f16 scale fields in each block (from ggml's block structs); IQ1_M and Q8_K are special
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q8_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "TQ1_0": [52], "TQ2_0": [64],
    "IQ4_NL": [0], "IQ4_XS": [0], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0],
    "IQ1_S": [0], "IQ1_M": [], "MXFP4": [], "NVFP4": [], "Q8_K": [],
}
# the sign/exponent-high bit of each float type's elements cleared keeps them finite
FLOAT_EXPONENT_TOP_BIT = {"F32": (4, 1 << 30), "F16": (2, 1 << 14), "BF16": (2, 1 << 14)}


def _scales(rng: np.random.Generator, shape: tuple[int, ...], wide: bool) -> np.ndarray:
    if not wide:
        return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape) * 2.0**-6).astype(np.float16)
    scales = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 4, shape)).astype(np.float16)
    scales.reshape(-1)[:3] = np.array([0.0, -0.0, 6e-8], dtype=np.float16)  # zero, negative zero, subnormal
    return scales


def random_blocks(ggml_type: str, num_rows: int, num_cols: int, seed: int = 0, wide_scales: bool = True) -> np.ndarray:
    """uint8 `[num_rows, row_bytes]`: every code byte uniformly random, scale fields finite (`wide_scales`: over
    many magnitudes and both signs; else about +-2^-6, as in a real weight)."""
    fmt = block_type(ggml_type)
    rng = np.random.default_rng(seed)
    num_blocks = num_rows * num_cols // fmt.block_size
    blocks = rng.integers(0, 256, size=(num_blocks, fmt.type_size), dtype=np.uint8)
    if ggml_type in FLOAT_EXPONENT_TOP_BIT:
        size, bit = FLOAT_EXPONENT_TOP_BIT[ggml_type]
        values = blocks.view({4: np.uint32, 2: np.uint16}[size])
        values &= ~np.array(bit, dtype=values.dtype)
        return blocks.reshape(num_rows, -1)
    for offset in F16_FIELDS[ggml_type]:
        blocks[:, offset:offset + 2] = _scales(rng, (num_blocks,), wide_scales).view(np.uint8).reshape(-1, 2)
    if ggml_type == "IQ1_M":  # the f16 d is the top nibbles of the four uint16 scale words
        d_bits = _scales(rng, (num_blocks,), wide_scales).view(np.uint16)
        words = blocks[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((d_bits >> (4 * i)) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
    if ggml_type == "Q8_K":
        blocks[:, 0:4] = _scales(rng, (num_blocks,), wide_scales).astype(np.float32).view(np.uint8).reshape(-1, 4)
    if ggml_type == "MXFP4" and not wide_scales:
        blocks[:, 0] = rng.integers(118, 124, num_blocks)  # 2^-10 .. 2^-5
    return blocks.reshape(num_rows, -1)


def reference_dequantize(raw: np.ndarray, ggml_type: str) -> np.ndarray:
    """gguf's dequantizer; Q8_K (absent from gguf) as ggml's dequantize_row_q8_K: f32 d times 256 signed bytes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if ggml_type == "Q8_K":
        blocks = raw.reshape(-1, 292)
        d = blocks[:, 0:4].copy().view(np.float32)
        return (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(raw.shape[0], -1)
    if ggml_type == "Q8_1":  # ggml's block_q8_1: f16 d, f16 s, 32 signed bytes; d * q
        blocks = raw.reshape(-1, 36)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        return (d * blocks[:, 4:36].view(np.int8).astype(np.float32)).reshape(raw.shape[0], -1)
    return dequantize(raw, GGMLQuantizationType[ggml_type]).astype(np.float32)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_equals_gguf_bit_for_bit(ggml_type):
    num_cols = 512 if block_type(ggml_type).block_size > 32 else 128
    raw = random_blocks(ggml_type, 24, num_cols)
    want = reference_dequantize(raw, ggml_type)
    got = dequantize_rows(torch.from_numpy(raw), ggml_type).numpy()
    assert got.shape == want.shape == (24, num_cols)
    assert np.isfinite(want).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # also tells -0.0 from 0.0


@pytest.mark.parametrize("ggml_type", QUANTIZED_TYPES)
def test_codes_stay_in_the_declared_range(ggml_type):
    """The int4 packer relies on `code_range`; random bytes reach every code the layout can express."""
    fmt = block_type(ggml_type)
    raw = torch.from_numpy(random_blocks(ggml_type, 64, 4 * fmt.block_size, seed=3))
    affine = fmt.decode(raw.reshape(-1, fmt.type_size))
    assert (int(affine.codes.min()), int(affine.codes.max())) == fmt.code_range
    assert affine.scale.shape == (raw.numel() // fmt.type_size, fmt.block_size // affine.group_size)


@pytest.mark.parametrize("ggml_type", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0",
                                       "MXFP4"])
def test_dequantize_matches_values_quantized_by_gguf(ggml_type):
    """Blocks written by gguf's quantizer (codes in their real range) decode to the same values as gguf's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    values = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType[ggml_type])
    want = dequantize(raw.view(np.uint8).reshape(16, -1), GGMLQuantizationType[ggml_type])
    assert np.array_equal(dequantize_rows(torch.from_numpy(raw.view(np.uint8).reshape(16, -1)), ggml_type).numpy(),
                          want)
    assert np.abs(want - values).max() < 2.0  # a real round trip (ternary types keep only the sign), not garbage


def test_unknown_type_and_bad_rows_are_errors():
    with pytest.raises(ValueError, match="Q1_0.*supported: F32, F16, BF16, Q4_0"):
        block_type("Q1_0")
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize_rows(torch.zeros(2, 35, dtype=torch.uint8), "Q8_0")


@pytest.mark.parametrize("ggml_type", TYPES)
def test_ggml_tensor_rows(ggml_type, monkeypatch):
    num_cols = 256 if block_type(ggml_type).block_size > 32 else 64
    raw = torch.from_numpy(random_blocks(ggml_type, 40, num_cols, seed=2))
    tensor = GGMLTensor(raw, ggml_type, (40, num_cols))
    dense = dequantize_rows(raw, ggml_type)
    monkeypatch.setattr(ggml_tensor, "_DEQUANTIZE_ROWS_PER_CHUNK", 16)  # several chunks, the last one short
    assert torch.equal(tensor.dequantize(), dense)
    assert torch.equal(tensor.dequantize(torch.bfloat16), dense.to(torch.bfloat16))
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(tensor.dequantize_selected_rows(ids, torch.float32), dense[ids])  # embedding lookups
    assert (tensor.num_rows, tensor.num_cols) == (40, num_cols)
    reversed_rows = tensor.map_rows(lambda rows: rows.flip(0))
    assert torch.equal(reversed_rows.dequantize(), dense.flip(0))
    released = []
    over_file = GGMLTensor(raw, ggml_type, (40, num_cols), release_pages=lambda *rows: released.append(rows))
    assert over_file.map_rows(lambda rows: rows.flip(0)).release_pages is None  # a derived tensor has its own rows
    joined = GGMLTensor.cat_rows([over_file, reversed_rows.with_rows(reversed_rows.data[:8])])
    assert joined.shape == (48, num_cols)
    assert torch.equal(joined.dequantize(), torch.cat([dense, dense.flip(0)[:8]]))
    assert released == [(0, 40)]  # a source over the file has its pages released once copied


def test_ggml_tensor_validates_shapes_and_types():
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size 32"):
        GGMLTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 30))
    with pytest.raises(ValueError, match=r"uint8 \[2, 36\]"):
        GGMLTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="cannot concatenate"):
        GGMLTensor.cat_rows([GGMLTensor(torch.zeros(1, 18, dtype=torch.uint8), "Q4_0", (1, 32)),
                             GGMLTensor(torch.zeros(1, 34, dtype=torch.uint8), "Q8_0", (1, 32))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_on_cuda_equals_cpu(ggml_type):
    raw = torch.from_numpy(random_blocks(ggml_type, 16, 512, seed=4))
    got = dequantize_rows(raw.cuda(), ggml_type).cpu()
    assert torch.equal(got.view(torch.int32), dequantize_rows(raw, ggml_type).view(torch.int32))
