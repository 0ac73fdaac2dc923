"""FP8 (E4M3, one per-tensor scale) ISQ as mistral.rs v0.5.0's FP8Linear computes it, and `Fp8Weight`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistralrs.quant.fp8 import Fp8Weight, fp8_dequantize, fp8_quantize, scaled_mm_supported

E4M3_MANTISSA_BITS = 3


def weight(rows: int = 64, cols: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.03
    w[5, 9] = -0.7  # the absmax, negative
    return w


def test_scales_follow_the_reference_formula():
    w = weight() * 50  # absmax 35: scale 448 / 35 (a weight with absmax < 1 gets the clamped 448)
    params = fp8_quantize(w, torch.bfloat16)
    absmax = w.to(torch.bfloat16).float().abs().max()
    expected_scale = torch.tensor(448.0) / absmax  # float32 division
    assert params.quant_scale == expected_scale.item()
    assert params.dequant_w_scale == torch.reciprocal(expected_scale).item()
    assert params.dequant_x_scale == params.dequant_w_scale
    assert params.layer_dtype == torch.bfloat16
    assert params.weight.dtype == torch.float8_e4m3fn and params.weight.shape == w.shape
    assert params.weight[5, 9].float().item() == -448.0  # the absmax lands on the format's largest value


def test_round_trip_within_e4m3_precision():
    w = weight(seed=1)
    params = fp8_quantize(w, torch.float32)
    restored = fp8_dequantize(params, torch.float32)
    # e4m3 rounding (half an ulp: 2^-4 relative) after bf16 rounding (2^-8 twice), plus the subnormal floor 2^-10
    relative = 2.0 ** -(E4M3_MANTISSA_BITS + 1) + 2 * 2.0 ** -8
    bound = relative * w.abs() + 2.0 ** -10 * params.dequant_w_scale
    assert ((restored - w).abs() <= bound).all()
    assert (restored - w).abs().max() > 0  # it did quantize


def test_zero_and_tiny_weights_clamp_the_scale():
    params = fp8_quantize(torch.zeros(16, 16), torch.float16)
    assert params.quant_scale == 448.0
    assert torch.equal(params.weight.float(), torch.zeros(16, 16))
    small = fp8_quantize(weight(), torch.float16)  # absmax 0.7: 448 / 0.7 is clamped to the F8E4M3 range
    assert small.quant_scale == 448.0 and small.dequant_w_scale == torch.tensor(1 / 448.0).item()


def test_reference_rounding_is_done_in_bfloat16():
    """The product weight * scale is rounded to bfloat16 before the cast to F8 (the reference's order)."""
    w = weight(seed=2)
    params = fp8_quantize(w, torch.bfloat16)
    scale = torch.tensor(params.quant_scale).to(torch.bfloat16)
    expected = (w.to(torch.bfloat16) * scale).to(torch.float8_e4m3fn)
    assert torch.equal(params.weight.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_weight_matmul_matches_the_dequantized_product(dtype):
    params = fp8_quantize(weight(rows=80), dtype)
    x = torch.randn(3, 4, 96).to(dtype)
    expected = F.linear(x, fp8_dequantize(params, dtype))
    for tile_elements in (96, 96 * 7, 1 << 22):  # one row per tile, uneven tiles, one tile
        packed = Fp8Weight(params, tile_elements=tile_elements)
        out = packed.matmul(x)
        assert out.shape == (3, 4, 80) and out.dtype == dtype
        torch.testing.assert_close(out, expected, atol=1e-5 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert packed.nbytes() == 80 * 96


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        fp8_quantize(torch.ones(4, 4, dtype=torch.int32), torch.bfloat16)
    params = fp8_quantize(weight(), torch.bfloat16)
    params.weight = params.weight.float()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Weight(params)


@pytest.mark.skipif(not (torch.cuda.is_available() and scaled_mm_supported(torch.device("cuda"))),
                    reason="needs a CUDA device with FP8 tensor cores (compute capability >= 8.9)")
def test_scaled_mm_fast_path_agrees_with_the_plain_path():
    params = fp8_quantize(weight(rows=256, cols=512).cuda(), torch.bfloat16)
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    fast, plain = Fp8Weight(params), Fp8Weight(params, use_scaled_mm=False)
    assert fast.use_scaled_mm and not plain.use_scaled_mm
    expected = plain.matmul(x).float()
    out = fast.matmul(x).float()
    # the fast path also rounds the activations to e4m3: relative error of a dot product ~ 2^-4
    assert ((out - expected).norm() / expected.norm()).item() < 0.05
