"""GGML blocks repacked for torch's CPU int4 kernel agree with the plain path (dequantize, then F.linear).

Tolerances are relative to the output norm, the same for every type. The exact product is taken in float64
from the dequantized weights. Each bfloat16 path rounds twice (its weights or scales and zeros to bfloat16, and
its output), each rounding relative 2**-9, so each stays within 2**-8 of the exact product and the two within
2**-7 of each other (observed: 1.5e-3 to 2.9e-3 against the exact product, at most 3.6e-3 between the paths,
on 200x512 random blocks). A wrong scale/zero convention, plane order or code offset gives errors of order 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs.quant import cpu_int4
from mistralrs.quant.cpu_int4 import Int4CpuPairWeight, Int4CpuWeight, int4_cpu_from_ggml
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES, block_type
from mistralrs.quant.gguf_linear import FAST_CPU_BF16_KERNELS
from tests.quant.test_ggml_types import random_blocks

EXACT_TOLERANCE = 2.0**-8  # each bf16 path against the float64 product
PATHS_TOLERANCE = 2.0**-7  # fast path against the plain bf16 path
# the int4 form of each type (see mistralrs/quant/cpu_int4.py); the float types and MXFP4/NVFP4 have none
# with the kernel group size: one plane per scale group; two planes of a 16/32/128-weight sub-block per group
FORMS = {
    **dict.fromkeys(["Q4_0", "Q4_1", "Q4_K"], (Int4CpuWeight, 32)),
    **dict.fromkeys(["TQ1_0", "TQ2_0"], (Int4CpuWeight, 256)),
    **dict.fromkeys(["Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q5_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_XXS", "IQ3_S",
                     "IQ1_S"],
                    (Int4CpuPairWeight, 64)),
    "Q8_K": (Int4CpuPairWeight, 256),
    **dict.fromkeys(["Q2_K", "Q3_K", "Q6_K", "IQ2_XS", "IQ2_S", "IQ1_M"], (Int4CpuPairWeight, 32)),
}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def quantized(ggml_type: str, num_rows: int, num_cols: int, seed: int) -> GGMLTensor:
    """Real-looking blocks: gguf's quantizer where it has one, else random codes with scales near 2^-6."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if ggml_type not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"):
        raw = random_blocks(ggml_type, num_rows, num_cols, seed, wide_scales=False)
        return GGMLTensor(torch.from_numpy(raw), ggml_type, (num_rows, num_cols))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((num_rows, num_cols)) * rng.uniform(0.01, 1.0) + rng.uniform(-0.2, 0.2)
    raw = quantize(values.astype(np.float32), GGMLQuantizationType[ggml_type])
    return GGMLTensor(torch.from_numpy(raw), ggml_type, (num_rows, num_cols))


def test_kernel_convention_is_code_minus_8_times_scale_plus_zero():
    torch.manual_seed(0)
    num_rows, num_cols = 64, 128
    codes = torch.randint(0, 16, (num_rows, num_cols), dtype=torch.int32)
    scale = torch.rand(num_cols // 32, num_rows).to(torch.bfloat16)
    zero = torch.randn(num_cols // 32, num_rows).to(torch.bfloat16)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    x = torch.randn(3, num_cols).to(torch.bfloat16)
    got = torch._weight_int4pack_mm_for_cpu(x, packed, 32, torch.stack([scale, zero], -1))
    weight = ((codes.double() - 8) * scale.double().t().repeat_interleave(32, 1)
              + zero.double().t().repeat_interleave(32, 1))
    assert relative_error(got, x.double() @ weight.t()) < 2.0**-8


def test_every_quantized_type_but_fp4_has_its_int4_form():
    assert {name: type(None) for name in BLOCK_TYPES if name not in FORMS} == {
        name: type(None) for name in ["F32", "F16", "BF16", "MXFP4", "NVFP4"]}
    assert set(FAST_CPU_BF16_KERNELS) == set(FORMS)
    for name in ["F16", "MXFP4"]:
        with pytest.raises(ValueError, match=f"{name}.*no CPU int4 form"):
            int4_cpu_from_ggml(GGMLTensor(torch.zeros(1, block_type(name).type_size * 8, dtype=torch.uint8), name,
                                          (1, block_type(name).block_size * 8)), torch.bfloat16)


@pytest.mark.parametrize("ggml_type", list(FORMS))
@pytest.mark.parametrize("num_rows, num_cols, seed", [(128, 256, 0), (200, 512, 1), (40, 768, 2)])
def test_fast_path_agrees_with_plain_path(ggml_type, num_rows, num_cols, seed, monkeypatch):
    monkeypatch.setattr(cpu_int4, "_ROWS_PER_CHUNK", 64)  # several chunks; 200 and 40 rows need padding to 16
    tensor = quantized(ggml_type, num_rows, num_cols, seed)
    fast = FAST_CPU_BF16_KERNELS[ggml_type](tensor, torch.bfloat16)
    assert (type(fast), fast.group_size) == FORMS[ggml_type]
    assert fast.packed.shape[0] % 16 == 0 and fast.out_features == num_rows
    x = torch.randn(2, 5, num_cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got = fast.matmul(x)
    assert got.shape == (2, 5, num_rows) and got.dtype == torch.bfloat16
    plain = torch.nn.functional.linear(x, tensor.dequantize(torch.bfloat16))
    exact = x.double() @ tensor.dequantize().double().t()
    assert relative_error(got, exact) < EXACT_TOLERANCE
    assert relative_error(plain, exact) < EXACT_TOLERANCE
    assert relative_error(got, plain) < PATHS_TOLERANCE


# bytes of the packed [208, 256] weight: 4 bits a weight (8 with two planes), one bf16 (scale, zero) per group
@pytest.mark.parametrize("ggml_type, nbytes", [("Q4_1", 208 * 128 + 8 * 208 * 4), ("Q6_K", 208 * 256 + 16 * 208 * 4)])
def test_chunked_packing_equals_whole_packing(monkeypatch, ggml_type, nbytes):
    tensor = quantized(ggml_type, 200, 256, 3)
    whole = FAST_CPU_BF16_KERNELS[ggml_type](tensor, torch.bfloat16)
    monkeypatch.setattr(cpu_int4, "_ROWS_PER_CHUNK", 64)
    chunked = FAST_CPU_BF16_KERNELS[ggml_type](tensor, torch.bfloat16)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.scales_and_zeros, chunked.scales_and_zeros)
    assert whole.nbytes() == nbytes


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q6_K"])
def test_non_contiguous_input(ggml_type):
    fast = FAST_CPU_BF16_KERNELS[ggml_type](quantized(ggml_type, 64, 256, 4), torch.bfloat16)
    x = torch.randn(256, 3).to(torch.bfloat16).t()  # [3, 256], not contiguous
    assert torch.equal(fast.matmul(x), fast.matmul(x.contiguous()))
