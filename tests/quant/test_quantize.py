"""GGML block quantization (`quantize_ggml`) against independent references.

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (everything `gguf.quants.quantize` can produce): byte for byte equal.
- K-quants: dequantized by `gguf.quants.dequantize` (the independent oracle), the round-trip error stays under
  the bounds of llama.cpp's tests/test-quantize-fns.cpp on its own synthetic data
  (`0.1 + 2 cos(i + offset)`, 4096 values, error = sqrt(sum diff^2) / n):
  MAX_QUANTIZATION_TOTAL_ERROR = 0.002 (Q4_K, Q5_K, Q6_K, Q8_K), _3BITS = 0.004 (Q3_K), _2BITS = 0.0075 (Q2_K).
- Q8_1 and Q8_K, which gguf cannot handle, are decoded here from ggml's block layout (d * q).
- An importance matrix lowers the importance-weighted error of every type that takes one.
- Errors as small as llama.cpp's own: the values in LLAMA_CPP_* below were measured on the same data with
  llama.cpp's C quantizers (ggml/src/ggml-quants.c, ggml commit d99724f2, called through ctypes): the mean
  relative row error without an imatrix, and the importance-weighted squared error with one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from mistralrs.quant.ggml_types import BLOCK_TYPES
from mistralrs.quant.quantize import QUANTIZERS, quantize_ggml, quantize_ggml_rows

GGUF_QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IMATRIX_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *K_QUANTS]
# llama.cpp tests/test-quantize-fns.cpp thresholds (MAX_QUANTIZATION_TOTAL_ERROR*)
LLAMA_CPP_MAX_ERROR = {"Q2_K": 0.0075, "Q3_K": 0.0040, "Q4_K": 0.002, "Q5_K": 0.002, "Q6_K": 0.002, "Q8_K": 0.002,
                       "Q4_0": 0.002, "Q4_1": 0.002, "Q5_0": 0.002, "Q5_1": 0.002, "Q8_0": 0.002, "Q8_1": 0.002}

# mean relative row error of hard_weights() (rows 0, 4, 5, 7-23) after llama.cpp's quantize_q*_K without imatrix
LLAMA_CPP_MEAN_ROW_ERROR = {"Q2_K": 0.26672, "Q3_K": 0.14196, "Q4_K": 0.06495, "Q5_K": 0.03171, "Q6_K": 0.01577}
# sum of importance * (w - restored)^2 after llama.cpp's quantize_* with the imatrix of the imatrix tests
LLAMA_CPP_IMATRIX_ERROR = {"Q4_0": 364.87, "Q4_1": 160.43, "Q5_0": 95.96, "Q5_1": 37.44, "Q2_K": 2088.95,
                           "Q3_K": 908.46, "Q4_K": 176.88, "Q5_K": 55.00, "Q6_K": 13.36}


def hard_weights(num_cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Random normal rows plus the awkward cases: an all-zero row, outliers, a constant block, a block whose
    largest magnitudes tie with both signs, f16-subnormal scales, huge values."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, num_cols, generator=gen) * 0.05
    w[1] = 0.0
    w[2, 5] = 40.0
    w[3, 100] = -250.0
    w[4, :32] = -3.0
    w[5, :32] = torch.tensor([1.0, -1.0] * 16)
    w[6] *= 1e-3
    w[7, :256] = 0.0
    w[8] *= 1e3
    w[9, 32:64] = torch.linspace(-1, 1, 32)
    return w


def llama_cpp_test_data(offset: float = 0.0, size: int = 32 * 128) -> torch.Tensor:
    """test-quantize-fns.cpp's generate_data: 0.1 + 2 cos(i + offset), as one row."""
    i = torch.arange(size, dtype=torch.float64)
    return (0.1 + 2 * torch.cos(i + offset)).float().reshape(1, size)


def decode_q8(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """Q8_1 (f16 d, f16 s, 32 int8) and Q8_K (f32 d, 256 int8, 16 int16 sums) decoded from ggml's layout."""
    if ggml_type == "Q8_1":
        blocks = data.reshape(-1, 36)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        return (d * blocks[:, 4:].copy().view(np.int8)).reshape(data.shape[0], -1)
    blocks = data.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    return (d * blocks[:, 4:260].copy().view(np.int8)).reshape(data.shape[0], -1)


def dequantize(data: torch.Tensor, ggml_type: str) -> np.ndarray:
    """The independent decoders: gguf's numpy reference, or `decode_q8`."""
    if ggml_type in ("Q8_1", "Q8_K"):
        return decode_q8(data.numpy(), ggml_type)
    return quants.dequantize(data.numpy(), GGMLQuantizationType[ggml_type])


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZABLE)
def test_legacy_types_match_gguf_bytes(ggml_type):
    w = hard_weights()
    expected = quants.quantize(w.numpy(), GGMLQuantizationType[ggml_type])
    np.testing.assert_array_equal(quantize_ggml_rows(w, ggml_type).numpy(), expected)


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZABLE)
def test_legacy_types_match_gguf_bytes_from_bf16(ggml_type):
    w = hard_weights(seed=1).to(torch.bfloat16)
    expected = quants.quantize(w.float().numpy(), GGMLQuantizationType[ggml_type])
    np.testing.assert_array_equal(quantize_ggml_rows(w, ggml_type).numpy(), expected)


def test_gguf_quantizes_only_the_types_compared_byte_for_byte():
    """If a newer gguf learns to quantize another of our types, it must join the byte-equality tests."""
    w = torch.randn(2, 256, generator=torch.Generator().manual_seed(5)).numpy()
    for ggml_type in QUANTIZERS:
        try:
            quants.quantize(w, GGMLQuantizationType[ggml_type])
        except NotImplementedError:
            assert ggml_type not in GGUF_QUANTIZABLE
        else:
            assert ggml_type in GGUF_QUANTIZABLE, f"gguf can quantize {ggml_type}: compare its bytes"


@pytest.mark.parametrize("ggml_type", list(QUANTIZERS))
def test_round_trip_within_llama_cpp_bounds(ggml_type):
    for offset in (0.0, 1.0):
        x = llama_cpp_test_data(offset)
        restored = dequantize(quantize_ggml_rows(x, ggml_type), ggml_type)
        error = math.sqrt(float(((restored - x.numpy()).astype(np.float64) ** 2).sum())) / x.numel()
        assert error < LLAMA_CPP_MAX_ERROR[ggml_type], (ggml_type, offset, error)


@pytest.mark.parametrize("ggml_type", [*K_QUANTS, "Q8_1", "Q8_K"])
def test_hard_weights_round_trip(ggml_type):
    """Zero rows come back exactly zero, nothing is NaN, and every row's relative error is bounded."""
    w = hard_weights()
    restored = torch.from_numpy(dequantize(quantize_ggml_rows(w, ggml_type), ggml_type).copy())
    assert torch.isfinite(restored).all()
    assert (restored[1] == 0).all() and (restored[7, :256] == 0).all()
    assert abs(restored[2, 5] - 40.0) < 2.0 and abs(restored[3, 100] + 250.0) < 12.5  # outliers within 5%
    rows = [r for r in range(w.shape[0]) if r not in (1, 2, 3, 6)]  # zero, outlier and f16-subnormal rows aside
    rel = (restored[rows] - w[rows]).norm(dim=1) / w[rows].norm(dim=1)
    # a gaussian row within ~30% at 2 bits, ~0.6% at 8 bits (measured: 0.31, 0.16, 0.08, 0.04, 0.02, 0.006, 0.007)
    bound = {"Q2_K": 0.4, "Q3_K": 0.2, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025, "Q8_1": 0.015, "Q8_K": 0.015}
    assert rel.max() < bound[ggml_type], rel
    # row 6 is tiny: its f16 scales are subnormal and coarser (Q8_K's f32 scale is not)
    assert (restored[6] - w[6]).norm() / w[6].norm() < 4 * bound[ggml_type]
    if ggml_type in LLAMA_CPP_MEAN_ROW_ERROR:
        assert rel.mean() < 1.01 * LLAMA_CPP_MEAN_ROW_ERROR[ggml_type], (rel.mean(), LLAMA_CPP_MEAN_ROW_ERROR)


@pytest.mark.parametrize("ggml_type", IMATRIX_TYPES)
def test_imatrix_lowers_the_weighted_error(ggml_type):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 512, generator=gen)
    importance = torch.exp(2.5 * torch.randn(512, generator=gen))
    def weighted_error(data: torch.Tensor) -> float:
        restored = torch.from_numpy(dequantize(data, ggml_type).copy())
        return float((importance * (restored - w) ** 2).sum())
    plain = weighted_error(quantize_ggml_rows(w, ggml_type))
    weighted = weighted_error(quantize_ggml_rows(w, ggml_type, importance))
    assert weighted < 0.9 * plain, (plain, weighted)
    assert weighted < 1.01 * LLAMA_CPP_IMATRIX_ERROR[ggml_type], (weighted, LLAMA_CPP_IMATRIX_ERROR[ggml_type])


@pytest.mark.parametrize("ggml_type", IMATRIX_TYPES)
def test_rows_are_quantized_independently(ggml_type):
    """Chunking never mixes rows: each row's blocks equal those of the row quantized alone."""
    w = hard_weights(num_cols=256)[:8]
    importance = torch.rand(256, generator=torch.Generator().manual_seed(4))
    whole = quantize_ggml_rows(w, ggml_type, importance)
    for row in range(w.shape[0]):
        assert torch.equal(whole[row], quantize_ggml_rows(w[row:row + 1], ggml_type, importance)[0])


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q8_1", "Q8_K"])
def test_imatrix_on_a_type_without_it_is_refused(ggml_type):
    with pytest.raises(ValueError, match=ggml_type):
        quantize_ggml(torch.randn(2, 256), ggml_type, torch.ones(256))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Q4_0, Q4_1, Q5_0.*Q8_K"):
        quantize_ggml(torch.randn(2, 256), "Q4K")
    with pytest.raises(ValueError, match="block size 256"):
        quantize_ggml(torch.randn(2, 96), "Q4_K")
    with pytest.raises(ValueError, match="imatrix"):
        quantize_ggml(torch.randn(2, 256), "Q4_K", torch.ones(255))


@pytest.mark.parametrize("ggml_type", [name for name in QUANTIZERS if name in BLOCK_TYPES])
def test_quantize_ggml_returns_a_ggml_tensor(ggml_type):
    w = hard_weights()[:4]
    tensor = quantize_ggml(w, ggml_type)
    assert (tensor.ggml_type, tensor.shape) == (ggml_type, (4, 512))
    assert torch.equal(tensor.data, quantize_ggml_rows(w, ggml_type))
    np.testing.assert_allclose(tensor.dequantize().numpy(), dequantize(tensor.data, ggml_type), rtol=0, atol=0)
