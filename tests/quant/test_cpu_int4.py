"""GGML blocks repacked for torch's CPU int4 kernel agree with the plain path (dequantize, then F.linear).

Tolerances are relative to the output norm. The exact product is taken in float64 from the dequantized
weights. Each bfloat16 path rounds twice (its weights or scales to bfloat16, and its output), each rounding
relative 2**-9, so each stays within 2**-8 of the exact product and the two within 2**-7 of each other, for
every type (Q4_0, Q4_1, Q8_0). A wrong scale/zero convention gives errors of order 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs.quant import cpu_int4
from mistralrs.quant.cpu_int4 import Int4CpuPairWeight, Int4CpuWeight
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.gguf_linear import FAST_CPU_BF16_KERNELS

EXACT_TOLERANCE = 2.0**-8  # each bf16 path against the float64 product
PATHS_TOLERANCE = 2.0**-7  # fast path against the plain bf16 path


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def quantized(ggml_type: str, num_rows: int, num_cols: int, seed: int) -> GGMLTensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

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


@pytest.mark.parametrize("ggml_type", list(FAST_CPU_BF16_KERNELS))
@pytest.mark.parametrize("num_rows, num_cols, seed", [(128, 64, 0), (200, 96, 1), (40, 576, 2)])
def test_fast_path_agrees_with_plain_path(ggml_type, num_rows, num_cols, seed, monkeypatch):
    monkeypatch.setattr(cpu_int4, "_ROWS_PER_CHUNK", 64)  # several chunks; 200 and 40 rows need padding to 16
    tensor = quantized(ggml_type, num_rows, num_cols, seed)
    fast = FAST_CPU_BF16_KERNELS[ggml_type](tensor, torch.bfloat16)
    assert isinstance(fast, Int4CpuPairWeight if ggml_type == "Q8_0" else Int4CpuWeight)
    assert fast.packed.shape[0] % 16 == 0 and fast.out_features == num_rows
    x = torch.randn(2, 5, num_cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got = fast.matmul(x)
    assert got.shape == (2, 5, num_rows) and got.dtype == torch.bfloat16
    plain = torch.nn.functional.linear(x, tensor.dequantize(torch.bfloat16))
    exact = x.double() @ tensor.dequantize().double().t()
    assert relative_error(got, exact) < EXACT_TOLERANCE
    assert relative_error(plain, exact) < EXACT_TOLERANCE
    assert relative_error(got, plain) < PATHS_TOLERANCE


def test_chunked_packing_equals_whole_packing(monkeypatch):
    tensor = quantized("Q4_1", 200, 64, 3)
    whole = FAST_CPU_BF16_KERNELS["Q4_1"](tensor, torch.bfloat16)
    monkeypatch.setattr(cpu_int4, "_ROWS_PER_CHUNK", 64)
    chunked = FAST_CPU_BF16_KERNELS["Q4_1"](tensor, torch.bfloat16)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.scales_and_zeros, chunked.scales_and_zeros)
    assert whole.nbytes() == 208 * 32 + 2 * 208 * 2 * 2  # 4 bits a weight, one bf16 (scale, zero) per 32


def test_non_contiguous_input():
    fast = FAST_CPU_BF16_KERNELS["Q4_0"](quantized("Q4_0", 64, 128, 4), torch.bfloat16)
    x = torch.randn(128, 3).to(torch.bfloat16).t()  # [3, 128], not contiguous
    assert torch.equal(fast.matmul(x), fast.matmul(x.contiguous()))
