"""The K-quant int8 dot-product kernels (mistralrs/layers/qdot/kquants.h) against references nobody here wrote:
the `gguf` package's dequantizer, and PyTorch's own GEMM for the large-batch path.

- Block decoding: the codes, scales, mins and factors each instruction-set path reads reproduce gguf's
  dequantization bit for bit (and equal mistralrs's torch decoders).
- Activations: each path's Q8_K blocks equal `quantize_activations(x, 256)` (plain PyTorch) bit for bit, with
  the group sums of 16 codes.
- Products (below QDOT_DENSE_ROWS rows): every path within float32 accumulation rounding of
  `qdot_reference` (exact integer sums), and within the activation-rounding bound of gguf's dequantized weight
  times x in float64, on odd shapes (rows not a multiple of 16 or 64, M = 1, 2, 3, 7, 16, K = 256 n).
- The 512-bit kernel (path 3) equals the 256-bit VNNI one (path 2) bit for bit at M = 1..16.
- Dequantized rows (the large-M tiles and the embedding lookup) equal gguf's values bit for bit on every path,
  so from QDOT_DENSE_ROWS rows on the product is the plain path's `F.linear` bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type
from mistralrs.quant.qdot import (KQUANT_ACTIVATION_BLOCK, KQUANT_TYPES, QdotWeight, activation_error_bound,
                                  qdot_reference, quantize_activations)
from tests.quant.test_cpu_int4 import quantized
from tests.quant.test_ggml_types import random_blocks
from tests.quant.test_qdot import ACCUMULATION_TOLERANCE, extension, gguf_dequantized  # noqa: F401  (fixture)

# code = u - offset in the plain decoding (mistralrs/quant/kquant_types.py); mn = offset * sc where no bias
OFFSET = {"Q2_K": 0, "Q3_K": 4, "Q4_K": 0, "Q5_K": 0, "Q6_K": 32}
HAS_BIAS = {"Q2_K", "Q4_K", "Q5_K"}
K_TYPES = sorted(KQUANT_TYPES)


def wide_blocks(ggml_type: str, num_rows: int, num_cols: int, seed: int) -> GGMLTensor:
    """Random bytes with f16 scales over many magnitudes and both signs (every bit of every field exercised)."""
    raw = random_blocks(ggml_type, num_rows, num_cols, seed, wide_scales=True)
    return GGMLTensor(torch.from_numpy(raw), ggml_type, (num_rows, num_cols))


@pytest.mark.parametrize("ggml_type", K_TYPES)
def test_block_decoding_is_gguf_bit_for_bit(extension, ggml_type):
    tensor = wide_blocks(ggml_type, 24, 512, seed=3)
    fmt = block_type(ggml_type)
    blocks = tensor.data.reshape(-1, fmt.type_size)
    affine = fmt.decode(blocks)
    want = gguf_dequantized(tensor).reshape(-1, 16)  # per group of 16
    for isa in extension.qdot_isas():
        u, sc, mn, d, dmin = extension.qdot_kquant_unpack(blocks, KQUANT_TYPES[ggml_type], isa)
        codes = u.to(torch.int16) - OFFSET[ggml_type]
        assert torch.equal(codes, affine.codes), isa
        scale = d[:, None] * sc.float()  # [n, 16]
        bias = -(dmin[:, None] * mn.float())
        step = affine.group_size // 16  # Q4_K/Q5_K: one scale and min per 32, the same over its two groups
        assert torch.equal(scale[:, ::step], affine.scale) and torch.equal(scale[:, step - 1::step], scale[:, ::step])
        values = scale.reshape(-1, 1) * codes.reshape(-1, 16).float()
        if ggml_type in HAS_BIAS:
            assert torch.equal(bias[:, ::step], affine.bias) and torch.equal(mn[:, step - 1::step], mn[:, ::step])
            values = values + bias.reshape(-1, 1)
        else:
            assert affine.bias is None and torch.equal(mn, sc * OFFSET[ggml_type]) and torch.equal(dmin, d), isa
        assert torch.equal(values.view(torch.int32), want.view(torch.int32)), isa


@pytest.mark.parametrize("ggml_type", K_TYPES)
def test_dequantized_rows_are_gguf_bit_for_bit(extension, ggml_type):
    tensor = wide_blocks(ggml_type, 19, 768, seed=4)
    number = KQUANT_TYPES[ggml_type]
    packed = extension.qdot_pack(tensor.data, number)
    assert torch.equal(packed, tensor.data)  # the blocks as they are
    assert extension.qdot_packed_shape(number, 19, 768) == list(packed.shape)
    want = gguf_dequantized(tensor)
    rows = torch.arange(19).flip(0).repeat(2)
    got = extension.qdot_dequantize(packed, number, rows, 768)
    assert torch.equal(got.view(torch.int32), want[rows].view(torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        extension.qdot_dequantize(packed, number, torch.tensor([19]), 768)
    x = torch.randn(3, 768)
    for isa in extension.qdot_isas():  # the large-M tiles of every path
        tiles = extension.qdot_matmul(x, packed, number, 19, isa, dense=1)
        assert torch.equal(tiles, F.linear(x, want)), isa


def test_activation_quantization_is_the_reference_bit_for_bit(extension):
    torch.manual_seed(0)
    x = torch.randn(5, 768) * torch.logspace(-3, 3, 768)
    x[1, :256] = 0  # an all-zero block: scale 0, codes 0
    x[2, 256:512] = torch.arange(256) * 0.5 - 64  # ties at half a step, rounded to even
    x[3, 512:] = 1e-30
    codes, scale, _, _ = quantize_activations(x, KQUANT_ACTIVATION_BLOCK)
    sums = codes.reshape(5, -1, 16).sum(-1, dtype=torch.int16)
    for isa in extension.qdot_isas():
        got = extension.qdot_kquant_quantize_activations(x, isa)
        for a, b in zip(got, (codes, scale, sums), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), isa
    assert not codes[1, :256].any() and not scale[1, 0]


@pytest.mark.parametrize("ggml_type", K_TYPES)
@pytest.mark.parametrize("num_rows, num_cols", [(1, 256), (17, 512), (70, 768)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16])
def test_products_match_the_exact_int8_arithmetic_and_gguf(extension, ggml_type, num_rows, num_cols, m):
    tensor = quantized(ggml_type, num_rows, num_cols, seed=num_rows + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, num_cols, generator=gen) * torch.rand(1, num_cols, generator=gen) * 4
    reference = qdot_reference(x, tensor)
    dequantized = gguf_dequantized(tensor)
    magnitude = x.double().abs() @ dequantized.double().abs().T
    exact = x.double() @ dequantized.double().T
    bound = activation_error_bound(x, dequantized, KQUANT_ACTIVATION_BLOCK)
    assert ((reference - exact).abs() <= bound + 1e-12 * magnitude).all()
    for isa in extension.qdot_isas():
        got = extension.qdot_matmul(x, tensor.data, KQUANT_TYPES[ggml_type], num_rows, isa, dense=0)
        assert got.dtype == torch.float32 and got.shape == (m, num_rows)
        assert ((got.double() - reference).abs() <= ACCUMULATION_TOLERANCE * magnitude + 1e-30).all(), isa
        assert ((got.double() - exact).abs() <= bound + ACCUMULATION_TOLERANCE * magnitude).all(), isa


@pytest.mark.parametrize("ggml_type", K_TYPES)
@pytest.mark.parametrize("num_rows", [1, 17, 40])
def test_the_512_bit_path_is_the_256_bit_path_bit_for_bit(extension, ggml_type, num_rows):
    """Path 3 (two weight rows per zmm, the accumulators of up to 8 activation rows in registers) against path 2
    (256-bit VNNI): the same integer sums and float32 operations per lane, so equal bit for bit at every M."""
    if 3 not in extension.qdot_isas():
        pytest.skip("no AVX512-VNNI on this CPU")
    tensor = wide_blocks(ggml_type, num_rows, 768, seed=num_rows)
    gen = torch.Generator().manual_seed(num_rows)
    for m in range(1, 17):
        x = torch.randn(m, 768, generator=gen) * torch.rand(1, 768, generator=gen) * 4
        wide = extension.qdot_matmul(x, tensor.data, KQUANT_TYPES[ggml_type], num_rows, 3, dense=0)
        narrow = extension.qdot_matmul(x, tensor.data, KQUANT_TYPES[ggml_type], num_rows, 2, dense=0)
        assert torch.equal(wide.view(torch.int32), narrow.view(torch.int32)), m


def test_the_error_bound_is_tight_enough_to_mean_something():
    """On random data the activation rounding error is a sizeable fraction of the bound (the bound is not vacuous)."""
    tensor = quantized("Q6_K", 64, 512, seed=1)
    x = torch.randn(4, 512)
    dequantized = gguf_dequantized(tensor)
    error = (qdot_reference(x, tensor) - x.double() @ dequantized.double().T).abs()
    assert error.max() > 0.05 * activation_error_bound(x, dequantized, KQUANT_ACTIVATION_BLOCK).max()


@pytest.mark.parametrize("ggml_type", K_TYPES)
def test_large_batches_are_the_plain_path_bit_for_bit(extension, ggml_type):
    tensor = quantized(ggml_type, 45, 512, seed=7)
    plain = tensor.dequantize(torch.bfloat16)
    weight = QdotWeight(tensor)
    for rows in (extension.QDOT_DENSE_ROWS, extension.QDOT_DENSE_ROWS + 7):
        x = torch.randn(rows, 512).to(torch.bfloat16)
        assert torch.equal(weight.matmul(x), F.linear(x, plain)), rows


def test_embedding_rows_are_the_dequantized_table(extension):
    tensor = quantized("Q6_K", 50, 512, seed=7)
    ids = torch.tensor([[3, 49], [0, 3]])
    got = QdotWeight(tensor).embedding_rows(ids, torch.bfloat16)
    assert torch.equal(got, tensor.dequantize_selected_rows(ids, torch.bfloat16))


def test_bad_input_names_the_field(extension):
    tensor = quantized("Q4_K", 8, 512, seed=0)
    with pytest.raises(RuntimeError, match="in_features=320 is not a multiple of 256"):
        extension.qdot_matmul(torch.randn(1, 320), tensor.data, KQUANT_TYPES["Q4_K"], 8)
    with pytest.raises(RuntimeError, match="do not hold in_features=256"):
        extension.qdot_matmul(torch.randn(1, 256), tensor.data, KQUANT_TYPES["Q4_K"], 8)
    with pytest.raises(RuntimeError, match="GGML type 8 is not a K-quant type"):
        extension.qdot_kquant_unpack(tensor.data.reshape(-1, 144), 8)
