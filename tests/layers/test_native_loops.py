"""The elementwise loops of the native decode step (mistralrs/layers/native_decode.h: bfloat16 rounding and
widening, the KV write, RMSNorm, rotate-half RoPE, the residual add, the gate product, the attention accumulators'
scaling) in their AVX2 forms against their portable forms, bit for bit: the vector forms take the same products and
sums in the same order, with no multiply-add fused. The rounding, the widening and the KV write are also
Tensor.to's bit for bit (NaN aside: a NaN stays a NaN). The int8 activation quantizer of the dot-product kernels
(qdot.h) is the same on every path. On a CPU without AVX2 both runs take the portable loops.
"""

from __future__ import annotations

import pytest
import torch

from tests.layers.test_fused_decode import extension  # noqa: F401


def both_forms(extension, call):
    """`call()` with the portable loops, then with the vector ones."""
    extension.native_portable(True)
    try:
        portable = call()
    finally:
        extension.native_portable(False)
    return portable, call()


def awkward_values(n: int, seed: int = 0) -> torch.Tensor:
    """float32 values over many magnitudes, with exact bfloat16 ties (odd and even), infinities, NaN, zeros of both
    signs and subnormals among them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n).pow(torch.rand(n, generator=gen))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-42, 3.4e38])
    # 1.00390625, 1.01171875 and -1.00390625 halfway between two bfloat16 values; the largest float32 tie (to inf)
    ties = torch.tensor([0x3F808000, 0x3F818000, -0x407F8000, 0x7F7F8000], dtype=torch.int32).view(torch.float32)
    x[:special.numel()] = special
    x[special.numel():special.numel() + ties.numel()] = ties
    return x


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    width = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(a.view(width), b.view(width))


@pytest.mark.parametrize("n", [13, 64, 1027])
def test_rounding_and_kv_write_are_tensor_to_bfloat16(extension, n):
    x = awkward_values(n)
    want = x.to(torch.bfloat16)
    nan = x.isnan()  # c10::BFloat16(NaN) is 0x7FC0; Tensor.to's vector loop may keep another NaN
    rounded = both_forms(extension, lambda: extension.native_round(x))
    stored = both_forms(extension, lambda: extension.native_store_bf16(x))
    for portable, vector in (rounded, stored):
        assert_same_bits(portable, vector)
        assert vector[nan].isnan().all()
    assert_same_bits(rounded[1][~nan], want[~nan].float())
    assert_same_bits(stored[1][~nan], want[~nan])
    for widened in both_forms(extension, lambda: extension.native_widen(want)):
        assert_same_bits(widened, want.float())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("width", [64, 100, 640])  # 100: a tail beyond the last 8 values
def test_elementwise_loops_vector_equal_portable(extension, bf16, width):
    gen = torch.Generator().manual_seed(width)
    rows = torch.randn(3, width, generator=gen) * 4
    other = torch.randn(3, width, generator=gen)
    weight = 1 + torch.randn(width, generator=gen) * 0.1
    for call in (lambda: extension.native_rms_norm(rows, weight, 1e-6, bf16),
                 lambda: extension.native_add_rounded(rows, other, bf16),
                 lambda: extension.native_gate_product(rows, other, bf16),
                 lambda: extension.native_scale(rows, 0.37, False),
                 lambda: extension.native_scale(rows, 3.7, True)):
        portable, vector = both_forms(extension, call)
        assert_same_bits(portable, vector)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (256, 256), (128, 64), (24, 24)])  # 24: halves of 12
def test_rotate_half_vector_equals_portable(extension, table_dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    heads = torch.randn(5, head_dim, generator=gen)
    angles = torch.rand(rotary_dim // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()]).to(table_dtype)
    sin = torch.cat([-angles.sin(), angles.sin()]).to(table_dtype)
    for bf16 in (False, True):
        portable, vector = both_forms(extension, lambda: extension.native_rotate_half(heads, cos, sin, bf16))
        assert_same_bits(portable, vector)
        assert torch.equal(vector[:, rotary_dim:], heads[:, rotary_dim:])


def test_activation_quantization_paths_equal(extension):
    x = torch.randn(7, 640) * torch.logspace(-3, 3, 640)
    x[1, :32] = 0  # an all-zero block
    x[2, 32:64] = torch.arange(32) * 0.5 - 8  # ties at half a step
    x[3, 64:96] = -x[3, 64:96].abs()  # a block whose largest magnitude is negative
    portable = extension.qdot_quantize_activations(x, 0)
    for isa in extension.qdot_isas():
        for a, b in zip(portable, extension.qdot_quantize_activations(x, isa), strict=True):
            assert torch.equal(a, b), isa
