"""The torch GGML dequantizers against the `gguf` package's reference (bit for bit), and `GGMLTensor`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs.quant import ggml_tensor
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES, block_type, dequantize_rows

TYPES = list(BLOCK_TYPES)


def random_blocks(ggml_type: str, num_rows: int, num_cols: int, seed: int = 0) -> np.ndarray:
    """uint8 `[num_rows, row_bytes]`: every code byte uniformly random, f16 scales finite of both signs over many
    magnitudes (subnormal, zero and large included)."""
    fmt = block_type(ggml_type)
    rng = np.random.default_rng(seed)
    num_blocks = num_rows * num_cols // fmt.block_size
    blocks = rng.integers(0, 256, size=(num_blocks, fmt.type_size), dtype=np.uint8)
    num_scales = 2 if ggml_type == "Q4_1" else 1  # Q4_1 has d and m
    scales = (rng.standard_normal((num_blocks, num_scales)) * 10.0 ** rng.integers(-8, 4, (num_blocks, num_scales)))
    scales = scales.astype(np.float16)
    scales[:3] = np.array([0.0, -0.0, 6e-8], dtype=np.float16)[:, None]  # zero, negative zero, subnormal
    assert np.isfinite(scales).all()
    blocks[:, :2 * num_scales] = scales.view(np.uint8).reshape(num_blocks, 2 * num_scales)
    return blocks.reshape(num_rows, -1)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_equals_gguf_bit_for_bit(ggml_type):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = random_blocks(ggml_type, 48, 128)
    want = dequantize(raw, GGMLQuantizationType[ggml_type]).astype(np.float32)
    got = dequantize_rows(torch.from_numpy(raw), ggml_type).numpy()
    assert got.shape == want.shape == (48, 128)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # also tells -0.0 from 0.0


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_matches_values_quantized_by_gguf(ggml_type):
    """Blocks written by gguf's quantizer (codes in their real range) decode to the same values as gguf's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    values = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType[ggml_type])
    want = dequantize(raw, GGMLQuantizationType[ggml_type])
    assert np.array_equal(dequantize_rows(torch.from_numpy(raw), ggml_type).numpy(), want)
    assert np.abs(want - values).max() < 0.5  # a real round trip, not two identical wrong decoders


def test_unknown_type_and_bad_rows_are_errors():
    with pytest.raises(ValueError, match="Q4_K.*supported: Q4_0, Q4_1, Q8_0"):
        block_type("Q4_K")
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize_rows(torch.zeros(2, 35, dtype=torch.uint8), "Q8_0")


@pytest.mark.parametrize("ggml_type", TYPES)
def test_ggml_tensor_rows(ggml_type, monkeypatch):
    raw = torch.from_numpy(random_blocks(ggml_type, 40, 64, seed=2))
    tensor = GGMLTensor(raw, ggml_type, (40, 64))
    dense = dequantize_rows(raw, ggml_type)
    monkeypatch.setattr(ggml_tensor, "_DEQUANTIZE_ROWS_PER_CHUNK", 16)  # several chunks, the last one short
    assert torch.equal(tensor.dequantize(), dense)
    assert torch.equal(tensor.dequantize(torch.bfloat16), dense.to(torch.bfloat16))
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(tensor.dequantize_selected_rows(ids, torch.float32), dense[ids])
    assert (tensor.num_rows, tensor.num_cols) == (40, 64)
    reversed_rows = tensor.map_rows(lambda rows: rows.flip(0))
    assert torch.equal(reversed_rows.dequantize(), dense.flip(0))
    joined = GGMLTensor.cat_rows([tensor, reversed_rows.with_rows(reversed_rows.data[:8])])
    assert joined.shape == (48, 64)
    assert torch.equal(joined.dequantize(), torch.cat([dense, dense.flip(0)[:8]]))


def test_ggml_tensor_validates_shapes_and_types():
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size 32"):
        GGMLTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 30))
    with pytest.raises(ValueError, match=r"uint8 \[2, 36\]"):
        GGMLTensor(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="cannot concatenate"):
        GGMLTensor.cat_rows([GGMLTensor(torch.zeros(1, 18, dtype=torch.uint8), "Q4_0", (1, 32)),
                             GGMLTensor(torch.zeros(1, 34, dtype=torch.uint8), "Q8_0", (1, 32))])
