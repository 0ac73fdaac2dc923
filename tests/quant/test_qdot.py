"""The int8-activation dot-product kernels (mistralrs/layers/qdot/, mistralrs/quant/qdot.py) against references
nobody here wrote: the `gguf` package's quantizer and dequantizer.

- Packing: the packed layout dequantizes to gguf's values bit for bit (every row, in any order: the tied
  embedding's lookup), takes the file's bytes, and lays Q5_0 / Q5_1 out as legacy.h describes.
- Activations: the kernel's int8 blocks equal `quantize_activations` (plain PyTorch) bit for bit.
- Products: every path within float32 accumulation rounding of `qdot_reference` (exact integer sums), and within
  the derived activation-rounding bound (`activation_error_bound`) of gguf's dequantized weight times x in
  float64, on odd shapes (rows not a multiple of 8, 16 or 64, K a multiple of 32 but not of 256, M = 1..16), and
  the vector paths (AVX2, 256- and 512-bit VNNI) equal to each other bit for bit;
  from QDOT_DENSE_ROWS rows on, the dequantized tiles times x equal the plain path's `F.linear` bit for bit.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import numpy as np
import pytest
import torch

from mistralrs.layers.fused_decode import EXTENSION
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type
from mistralrs.quant.qdot import (KQUANT_TYPES, LEGACY_TYPES, QDOT_TYPES, QdotWeight, activation_error_bound,
                                  qdot_reference, quantize_activations)
from tests.quant.test_cpu_int4 import quantized

ACCUMULATION_TOLERANCE = 2.0**-20  # kernel vs qdot_reference, relative to sum |x| |w| (float32 sums of ~100 terms)


@pytest.fixture(scope="module")
def extension():
    """The compiled extension; skips only where there is no C++ compiler."""
    module = EXTENSION.get(wait=True)
    if module is None:
        if shutil.which(os.environ.get("CXX", "c++")):
            pytest.fail("a C++ compiler is installed but the extension did not build (see the log)")
        pytest.skip("the extension cannot be built here: no C++ compiler")
    return module


def gguf_dequantized(tensor: GGMLTensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = dequantize(tensor.data.numpy(), GGMLQuantizationType[tensor.ggml_type])
    return torch.from_numpy(np.ascontiguousarray(raw)).reshape(tensor.num_rows, tensor.num_cols)


def test_every_path_is_listed_and_scalar_is_always_there(extension):
    isas = extension.qdot_isas()
    assert isas[0] == 0 and isas == sorted(set(isas)) and set(isas) <= {0, 1, 2, 3, 4}


def test_the_amx_path_is_listed_where_the_cpu_has_amx_int8(extension):
    """Path 4 (AMX tiles for Q8_0) needs the CPU's AMX-INT8 and Linux's permission to use the tile state, which the
    extension asks for: on a CPU that has it, the path must be there (or the products tests would skip it)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "amx_int8" not in flags or "avx512_vnni" not in flags:
        pytest.skip("no AMX-INT8 here")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(158, 0x1023, 18) != 0:  # SYS_arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
        pytest.skip("this kernel does not grant the AMX tile state")
    assert 4 in extension.qdot_isas()


@pytest.mark.parametrize("ggml_type", sorted(LEGACY_TYPES))
@pytest.mark.parametrize("num_rows", [1, 8, 37])
def test_packed_blocks_dequantize_to_gguf_bit_for_bit(extension, ggml_type, num_rows):
    """Packing (rows interleaved by 8, codes re-laid) loses nothing: every row, looked up in any order, is gguf's."""
    tensor = quantized(ggml_type, num_rows, 96, seed=num_rows)
    number = QDOT_TYPES[ggml_type]
    packed = extension.qdot_pack(tensor.data, number)
    assert packed.dtype == torch.uint8 and packed.shape[0] == -(-num_rows // 8)
    want = gguf_dequantized(tensor)
    rows = torch.arange(num_rows).flip(0).repeat(2)
    got = extension.qdot_dequantize(packed, number, rows, 96)
    assert torch.equal(got.view(torch.int32), want[rows].view(torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        extension.qdot_dequantize(packed, number, torch.tensor([-(-num_rows // 8) * 8]), 96)


@pytest.mark.parametrize("ggml_type", sorted(LEGACY_TYPES))
def test_packing_in_chunks_is_the_whole_packing_and_releases_each_chunk_once_packed(extension, ggml_type,
                                                                                     monkeypatch):
    """A legacy-type weight is packed a few rows at a time (chunks of whole groups of 8): the same bytes as one
    `qdot_pack` of all its rows, and the source's pages of each chunk are released right after it is packed."""
    from dataclasses import replace

    import mistralrs.quant.qdot as qdot

    tensor = quantized(ggml_type, 61, 96, seed=5)
    monkeypatch.setattr(qdot, "PACK_CHUNK_BYTES", 3 * 8 * tensor.data.shape[1])  # 24 rows a chunk
    events = []
    real_pack = extension.qdot_pack
    monkeypatch.setattr(extension, "qdot_pack", lambda blocks, number: events.append(("pack", blocks.shape[0]))
                        or real_pack(blocks, number))
    weight = QdotWeight(replace(tensor, release_pages=lambda start, stop: events.append(("release", start, stop))))
    assert events == [("pack", 24), ("release", 0, 24), ("pack", 24), ("release", 24, 48), ("pack", 13),
                      ("release", 48, 61)]
    assert torch.equal(weight.packed, real_pack(tensor.data, QDOT_TYPES[ggml_type]))


@pytest.mark.parametrize("ggml_type", sorted(LEGACY_TYPES))
def test_packing_keeps_the_size_of_the_blocks(extension, ggml_type):
    tensor = quantized(ggml_type, 64, 256, seed=0)
    assert QdotWeight(tensor).nbytes() == tensor.data.numel()


@pytest.mark.parametrize("ggml_type", ["Q5_0", "Q5_1"])
def test_5_bit_codes_pack_as_the_4_bit_type_and_a_plane_of_fifth_bits(extension, ggml_type):
    """legacy.h's layout of Q5_0 / Q5_1, written out here from its description: a group's block is the 4-bit type's
    packed block of the same scales (and biases) and low nibbles, then 8 little-endian 32-bit words, bit 4 r + j
    of word k the fifth bit of code 4 k + j of row r (rows past the last zero)."""
    from tests.quant.test_ggml_types import random_blocks

    rows, cols, head = 21, 96, {"Q5_0": 2, "Q5_1": 4}[ggml_type]  # head: the bytes of d (and m)
    blocks = random_blocks(ggml_type, rows, cols, seed=8).reshape(rows, cols // 32, -1)
    nibbles = np.concatenate([blocks[..., :head], blocks[..., head + 4:]], -1).reshape(rows, -1)
    four_bit = {"Q5_0": "Q4_0", "Q5_1": "Q4_1"}[ggml_type]
    want_head = extension.qdot_pack(torch.from_numpy(nibbles), QDOT_TYPES[four_bit]).reshape(3, cols // 32, -1)
    high = np.ascontiguousarray(blocks[..., head:head + 4]).view("<u4")[..., 0].astype(np.int64)  # [rows, blocks]
    fifth = (high[..., None] >> np.arange(32)) & 1  # [rows, blocks, code]
    fifth = np.concatenate([fifth, np.zeros((3 * 8 - rows, *fifth.shape[1:]), np.int64)])
    fifth = fifth.reshape(3, 8, cols // 32, 8, 4)  # [group, r, block, k, j]
    words = (fifth << (4 * np.arange(8)[:, None, None, None] + np.arange(4))).sum((1, 4))  # [group, block, k]
    want_plane = torch.from_numpy(words.astype("<u4").view(np.uint8).reshape(3, cols // 32, 32))
    packed = extension.qdot_pack(torch.from_numpy(blocks.reshape(rows, -1)), QDOT_TYPES[ggml_type])
    got = packed.reshape(3, cols // 32, -1)
    assert torch.equal(got[..., :-32], want_head) and torch.equal(got[..., -32:], want_plane)


def test_activation_quantization_is_the_reference_bit_for_bit(extension):
    torch.manual_seed(0)
    x = torch.randn(5, 96) * torch.logspace(-3, 3, 96)
    x[1, :32] = 0  # an all-zero block: scale 0, codes 0
    x[2, 32:64] = torch.arange(32) * 0.5 - 8  # ties at half a step, rounded to even
    x[3, 64:] = 1e-30
    got = extension.qdot_quantize_activations(x)
    want = quantize_activations(x)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert not got[0][1, :32].any() and not got[1][1, 0] and not got[2][1, 0]


@pytest.mark.parametrize("ggml_type", sorted(LEGACY_TYPES))
# (203, 1024): beyond 4 activation rows the kernels take a few row groups a pass (legacy_simd.inc kPassBytes):
# here several passes for every type, the last one partial. The 512-bit path takes groups in pairs: at 17 rows a
# pair and a last, partial group alone; at 203 a last pair whose second group is partial; at 16 one whole pair; at
# 40 two pairs and a last, whole group alone
@pytest.mark.parametrize("num_rows, num_cols", [(1, 32), (16, 64), (17, 96), (40, 160), (70, 288), (203, 1024)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16])
def test_products_match_the_exact_int8_arithmetic_and_gguf(extension, ggml_type, num_rows, num_cols, m):
    tensor = quantized(ggml_type, num_rows, num_cols, seed=num_rows + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, num_cols, generator=gen) * torch.rand(1, num_cols, generator=gen) * 4
    reference = qdot_reference(x, tensor)
    dequantized = gguf_dequantized(tensor)
    magnitude = x.double().abs() @ dequantized.double().abs().T
    exact = x.double() @ dequantized.double().T
    bound = activation_error_bound(x, dequantized)
    assert ((reference - exact).abs() <= bound + 1e-12 * magnitude).all()
    packed = extension.qdot_pack(tensor.data, QDOT_TYPES[ggml_type])
    products = {}
    for isa in extension.qdot_isas():
        got = products[isa] = extension.qdot_matmul(x, packed, QDOT_TYPES[ggml_type], num_rows, isa, dense=0)
        assert got.dtype == torch.float32 and got.shape == (m, num_rows)
        assert ((got.double() - reference).abs() <= ACCUMULATION_TOLERANCE * magnitude + 1e-30).all(), isa
        assert ((got.double() - exact).abs() <= bound + ACCUMULATION_TOLERANCE * magnitude).all(), isa
    if 3 in products:  # 512-bit vectors, two groups of 8 rows a vector: the 256-bit VNNI path's floats bit for bit
        assert torch.equal(products[3].view(torch.int32), products[2].view(torch.int32))
    if 2 in products:  # AVX2 and VNNI: the same integer sums (codes rebuilt each its own way), the same float order
        assert torch.equal(products[2].view(torch.int32), products[1].view(torch.int32))
    if 4 in products:  # AMX tiles (Q8_0, 2..16 rows): the same integer sums, then the 512-bit path's float work
        assert torch.equal(products[4].view(torch.int32), products[3].view(torch.int32))


# 1100 rows: 138 groups of 8, 69 a thread at 2 threads (above legacy_amx.h kAmxGroups), an odd last group each; 1, 3
# and 9 blocks a row (the tile loop's block parities); 4..16 rows take the tiles on path 4
@pytest.mark.parametrize("num_cols", [32, 96, 288])
@pytest.mark.parametrize("m", [4, 7, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_tiles_give_the_512_bit_path_bit_for_bit(extension, num_cols, m, threads):
    if 4 not in extension.qdot_isas():
        pytest.skip("no AMX-INT8 here")
    tensor = quantized("Q8_0", 1100, num_cols, seed=m + num_cols)
    x = torch.randn(m, num_cols, generator=torch.Generator().manual_seed(m)) * 3
    packed = extension.qdot_pack(tensor.data, QDOT_TYPES["Q8_0"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        tiles = extension.qdot_matmul(x, packed, QDOT_TYPES["Q8_0"], 1100, 4, dense=0)
        vectors = extension.qdot_matmul(x, packed, QDOT_TYPES["Q8_0"], 1100, 3, dense=0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(tiles.view(torch.int32), vectors.view(torch.int32))
    magnitude = x.double().abs() @ gguf_dequantized(tensor).double().abs().T
    assert ((tiles.double() - qdot_reference(x, tensor)).abs() <= ACCUMULATION_TOLERANCE * magnitude + 1e-30).all()


def test_the_error_bound_is_tight_enough_to_mean_something():
    """On random data the activation rounding error is a sizeable fraction of the bound (the bound is not vacuous)."""
    tensor = quantized("Q8_0", 64, 256, seed=1)
    x = torch.randn(4, 256)
    dequantized = gguf_dequantized(tensor)
    error = (qdot_reference(x, tensor) - x.double() @ dequantized.double().T).abs()
    assert error.max() > 0.05 * activation_error_bound(x, dequantized).max()


@pytest.mark.parametrize("ggml_type", [*sorted(LEGACY_TYPES), *sorted(KQUANT_TYPES)])
def test_bfloat16_activations_give_the_float32_result_rounded(extension, ggml_type):
    tensor = quantized(ggml_type, 33, 512, seed=5)   # 512 inputs: whole blocks of every type, legacy and K
    x = torch.randn(3, 512).to(torch.bfloat16)
    weight = QdotWeight(tensor)
    got = weight.matmul(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, weight.matmul(x.float()).to(torch.bfloat16))
    assert torch.equal(weight.matmul(x.reshape(3, 1, 512)), got.reshape(3, 1, 33))


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q6_K"])
def test_the_thread_count_does_not_change_the_result(extension, ggml_type):
    tensor = quantized(ggml_type, 300, 512, seed=2)
    x = torch.randn(5, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = QdotWeight(tensor).matmul(x)
        torch.set_num_threads(max(2, before))
        assert torch.equal(QdotWeight(tensor).matmul(x), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q6_K"])
def test_a_large_output_block_is_handed_out_again_only_once_released(extension, ggml_type):
    """Outputs from 1 MiB on (an LM head's logits) reuse the previous one's block when nothing holds it."""
    weight = QdotWeight(quantized(ggml_type, 36864, 256, seed=4))  # 8 rows x 36864 float32: 1.1 MiB
    x, other = torch.randn(8, 256), torch.randn(8, 256)
    held = weight.matmul(x)
    kept = held.clone()
    second = weight.matmul(other)
    assert second.data_ptr() != held.data_ptr() and torch.equal(held, kept)
    view = second[2:]
    del second
    address = weight.matmul(x).data_ptr()  # a new block: a view still holds the old one; this one is free again
    assert address != view.data_ptr() - 2 * 36864 * 4
    del view, held
    third = weight.matmul(x[:7])  # 7 rows: 1008 KiB, below the threshold
    assert third.data_ptr() != address and torch.equal(third, kept[:7])
    fourth = weight.matmul(x)
    assert fourth.data_ptr() == address and torch.equal(fourth, kept)
    small = weight.matmul(x[:1])  # an allocation of its own
    assert small.data_ptr() != fourth.data_ptr()


@pytest.mark.parametrize("ggml_type", sorted(LEGACY_TYPES))
def test_many_rows_multiply_dequantized_tiles_as_the_plain_path(extension, ggml_type):
    """From QDOT_DENSE_ROWS activation rows on (prefill) the product is F.linear of the dequantized weight: the
    plain path's."""
    tensor = quantized(ggml_type, 40, 64, seed=4)
    weight = QdotWeight(tensor)
    x = torch.randn(extension.QDOT_DENSE_ROWS, 64).to(torch.bfloat16)
    assert not torch.equal(weight.matmul(x[:-1]), torch.nn.functional.linear(x[:-1], tensor.dequantize(torch.bfloat16)))
    plain = torch.nn.functional.linear(x, tensor.dequantize(torch.bfloat16))
    assert torch.equal(weight.matmul(x), plain)
    tiles = extension.qdot_matmul(x, weight.packed, weight.type_number, 40, dense=1)
    assert torch.equal(tiles, plain)
    exact = x.double() @ gguf_dequantized(tensor).double().T
    kernels = extension.qdot_matmul(x, weight.packed, weight.type_number, 40, dense=0)
    assert ((kernels.double() - exact).abs() <= activation_error_bound(x.float(), gguf_dequantized(tensor)) +
            2.0**-8 * exact.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ggml_type", sorted(QDOT_TYPES))
def test_every_path_dequantizes_tiles_to_the_plain_weight_bit_for_bit(extension, ggml_type, dtype):
    """The tiles are the plain path's weight in x's dtype (bfloat16: rounded group by group to nearest even, as
    Tensor.to rounds) on every instruction-set path, including the last, partial group of 8 rows: one-hot
    activations pick each weight out of the product exactly. f16 scales over many magnitudes and random codes give
    values with every low bit pattern, ties included."""
    from tests.quant.test_ggml_types import random_blocks

    tensor = GGMLTensor(torch.from_numpy(random_blocks(ggml_type, 45, 512, seed=3)), ggml_type, (45, 512))
    packed = extension.qdot_pack(tensor.data, QDOT_TYPES[ggml_type])
    plain = gguf_dequantized(tensor).to(dtype)
    one_hot = torch.eye(512, dtype=dtype)
    for isa in extension.qdot_isas():
        tiles = extension.qdot_matmul(one_hot, packed, QDOT_TYPES[ggml_type], 45, isa=isa, dense=1)
        assert tiles.dtype == dtype and torch.equal(tiles, plain.T), isa


def test_tiles_cover_a_weight_larger_than_one_tile(extension):
    tensor = quantized("Q8_0", 8200, 512, seed=6)  # 4096 bfloat16 rows a tile at K = 512: three, the last one short
    weight = QdotWeight(tensor)
    x = torch.randn(extension.QDOT_DENSE_ROWS, 512).to(torch.bfloat16)
    dense = tensor.dequantize(torch.bfloat16)
    want = torch.cat([torch.nn.functional.linear(x, dense[start:start + 4096]) for start in range(0, 8200, 4096)], 1)
    assert torch.equal(weight.matmul(x), want)


def test_embedding_rows_are_the_dequantized_table(extension):
    tensor = quantized("Q8_0", 50, 64, seed=7)
    ids = torch.tensor([[3, 49], [0, 3]])
    got = QdotWeight(tensor).embedding_rows(ids, torch.bfloat16)
    assert torch.equal(got, tensor.dequantize_selected_rows(ids, torch.bfloat16))


def test_bad_input_names_the_field(extension):
    tensor = quantized("Q4_0", 8, 64, seed=0)
    packed = extension.qdot_pack(tensor.data, QDOT_TYPES["Q4_0"])
    with pytest.raises(RuntimeError, match="in_features=96"):
        extension.qdot_matmul(torch.randn(1, 96), packed, QDOT_TYPES["Q4_0"], 8)
    x = torch.randn(extension.QDOT_DENSE_ROWS, 64)
    with pytest.raises(RuntimeError, match="does not hold out_features=16 rows of in_features=64"):
        extension.qdot_matmul(x, packed, QDOT_TYPES["Q4_0"], 16)
    with pytest.raises(RuntimeError, match="in_features=80 is not a multiple of 32"):
        extension.qdot_matmul(torch.randn(extension.QDOT_DENSE_ROWS, 80), packed, QDOT_TYPES["Q4_0"], 8)
    with pytest.raises(RuntimeError, match="GGML type 15"):
        extension.qdot_pack(tensor.data, 15)
    with pytest.raises(ValueError, match="ggml_type 'IQ4_XS'"):
        QdotWeight(quantized("IQ4_XS", 8, 256, seed=0))


def test_the_execution_option_takes_int4_as_the_third_choice():
    from mistralrs.worker.options import ExecutionOptions

    assert ExecutionOptions(fast_kernels="int4").fast_kernels == "int4"
    with pytest.raises(ValueError, match="fast_kernels must be True, False or 'int4'"):
        ExecutionOptions(fast_kernels="int8")
