"""HQQ quantization in mistral.rs v0.5.0's layout (mistralrs-quant/src/hqq), and `HqqWeight`.

The layout facts checked by hand-built weights: groups are the columns of the flattened weight viewed as
`[64, numel / 64]`; 4-bit `w_q` row i holds code row i in its high nibble and row i + 32 in its low nibble;
`scales` (= 1 / scale) and `zeros` are float32 `[1, numel / 64]`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistralrs.quant.hqq import HqqWeight, hqq_dequantize, hqq_quantize
from mistralrs.quant.isq_state import HqqParams


def gaussian_weight(rows: int = 128, cols: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w[3, 7] = 0.5  # an outlier stretches its group's range
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_params_have_the_reference_shapes_and_dtypes(bits):
    w = gaussian_weight()
    params = hqq_quantize(w, bits)
    groups = w.numel() // 64
    assert params.w_q.dtype == torch.uint8
    assert tuple(params.w_q.shape) == ((32 if bits == 4 else 64), groups)
    assert params.scales.dtype == params.zeros.dtype == torch.float32
    assert tuple(params.scales.shape) == tuple(params.zeros.shape) == (1, groups)
    assert (params.shape, params.bits, params.group_size, params.axis) == ((128, 96), bits, 64, 0)
    assert (params.optimization_steps, params.round_zeros, params.channel_wise) == (10, False, True)


def test_layout_on_a_hand_built_weight():
    """Group j = column j of the [64, N] view; with exact codes the packing is checked byte by byte."""
    view = torch.zeros(64, 2)
    view[:, 0] = torch.arange(64) % 16  # group 0: codes 0..15 exactly (min 0, max 15 -> scale 1, zero 0)
    view[:, 1] = (torch.arange(64) % 16) * 2.0 - 4.0  # group 1: step 2, min -4 -> zero 2
    weight = view.reshape(2, 64)  # the flattened weight, row-major, is the view
    params = hqq_quantize(weight, 4, optimization_steps=0)
    codes = torch.arange(64) % 16
    expected = ((codes[:32] << 4) | codes[32:]).to(torch.uint8)
    assert torch.equal(params.w_q[:, 0], expected) and torch.equal(params.w_q[:, 1], expected)
    assert torch.equal(params.scales, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(params.zeros, torch.tensor([[0.0, 2.0]]))
    assert torch.equal(hqq_dequantize(params), weight)


def test_eight_bit_codes_are_stored_unpacked():
    base = torch.cat([torch.arange(63) * 4.0, torch.tensor([255.0])])  # spans 0..255: scale 1, zero 0, codes = values
    gen = torch.Generator().manual_seed(0)
    view = torch.stack([base[torch.randperm(64, generator=gen)] for _ in range(3)], dim=1)  # [64, 3]
    params = hqq_quantize(view.reshape(3, 64), 8, optimization_steps=0)
    assert torch.equal(params.w_q, view.to(torch.uint8))
    assert torch.equal(hqq_dequantize(params), view.reshape(3, 64))


def _mean_abs_error(w: torch.Tensor, params: HqqParams) -> float:
    return float((hqq_dequantize(params) - w).abs().mean())


def test_error_falls_with_optimization_steps_and_bits():
    w = gaussian_weight(256, 128)
    unoptimized = _mean_abs_error(w, hqq_quantize(w, 4, optimization_steps=0))
    optimized = _mean_abs_error(w, hqq_quantize(w, 4))
    eight_bits = _mean_abs_error(w, hqq_quantize(w, 8))
    assert optimized < 0.97 * unoptimized
    assert eight_bits < optimized / 10
    # each group is within half a quantization step of its min-max grid (plus the zero's shift)
    steps = (w.reshape(64, -1).amax(0) - w.reshape(64, -1).amin(0)) / 15
    assert (hqq_dequantize(hqq_quantize(w, 4, optimization_steps=0)) - w).reshape(64, -1).abs().le(steps * 0.5001).all()


def test_dequantize_dtype_and_constant_groups():
    w = torch.zeros(64, 64)
    w[:32] = 1.5  # groups whose elements are all equal (max == min): scale clamps to 2e4
    out = hqq_dequantize(hqq_quantize(w, 4), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), w, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(128, 96), (96, 64), (320, 64)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hqq_weight_matmul_matches_the_plain_path(shape, bits, dtype):
    w = gaussian_weight(*shape)
    params = hqq_quantize(w, bits)
    x = torch.randn(5, shape[1]).to(dtype)
    expected = F.linear(x, hqq_dequantize(params, dtype))
    for tile_elements in (1, 1000, 1 << 20):  # one group row per tile, a few, everything at once
        packed = HqqWeight(params, tile_elements=tile_elements)
        assert packed.out_features == shape[0]
        torch.testing.assert_close(packed.matmul(x), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert packed.nbytes() == params.w_q.numel() + 8 * params.scales.numel()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 8\)"):
        hqq_quantize(torch.randn(64, 64), 3)
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        hqq_quantize(torch.randn(3, 7), 4)
    params = hqq_quantize(torch.randn(64, 64), 4)
    params.axis = 1
    with pytest.raises(ValueError, match="axis=1"):
        hqq_dequantize(params)
