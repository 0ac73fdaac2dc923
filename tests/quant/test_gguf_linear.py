"""`GGUFLinearMethod` and `GGUFQuantConfig`: fused shards, the fast/plain switch, tied embeddings, and tiny GGUF
models whose logits match the same file loaded with everything dequantized (the reference path).

Tolerances are relative to the output norm: 2**-7 between the int4 and the plain bfloat16 path (derived in
tests/quant/test_cpu_int4.py); the switched-off path is exact; the tiled path multiplies the same dequantized
weights as the plain path, tile by tile, so it differs only by the matmul's summation order: 2**-20 in float32
(observed <= 1e-7), 2**-10 in float16/bfloat16 (one output rounding, 2**-9 at most).
"""

from __future__ import annotations

import pytest
import torch

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.quant import packed
from mistralrs.quant.cpu_int4 import Int4CpuPairWeight, Int4CpuWeight
from mistralrs.quant.ggml_types import BLOCK_TYPES, FLOAT_TYPES
from mistralrs.quant.gguf_linear import GGUFLinearMethod, GGUFQuantConfig, build_packed_weight
from mistralrs.quant.packed import BlockTiledWeight, DenseWeight, LinearKind
from tests.quant.test_cpu_int4 import PATHS_TOLERANCE, quantized, relative_error

TILED_TOLERANCE = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-10}

FAST_TYPES = {"Q4_0": Int4CpuWeight, "Q4_1": Int4CpuWeight, "Q8_0": Int4CpuPairWeight}


def gguf_linear(sizes, in_features, *, dtype=torch.bfloat16, fast="int4", bias=False) -> Linear:
    """A GGUF-method Linear; by default on torch's int4 forms (the int8 dot-product form: tests/quant/test_qdot.py)."""
    return Linear(in_features, sizes, bias=bias, dtype=dtype, device="cpu", quant_method=GGUFLinearMethod(fast),
                  prefix="layer")


def dense_linear(sizes, in_features, shards, *, dtype=torch.bfloat16, bias=None) -> Linear:
    """The reference: a dense Linear loaded with the dequantized shards."""
    layer = Linear(in_features, sizes, bias=bias is not None, dtype=dtype, device="cpu", prefix="reference")
    for index, shard in enumerate(shards):
        layer.load_weight("weight", shard, index)  # GGML blocks are dequantized by copy_checked
    if bias is not None:
        for index, part in enumerate(bias.split(sizes)):
            layer.load_weight("bias", part, index)
    return layer


@pytest.mark.parametrize("ggml_type", list(FAST_TYPES))
def test_fused_shards_of_one_type_pack_into_one_weight(ggml_type):
    sizes = [64, 32, 32]
    shards = [quantized(ggml_type, size, 96, seed) for seed, size in enumerate(sizes)]
    layer = gguf_linear(sizes, 96)
    for index in (2, 0, 1):  # any arrival order
        layer.load_weight("weight", shards[index], index)
    method = layer.quant_method
    assert [type(w) for w in method.weights] == [FAST_TYPES[ggml_type]]
    x = torch.randn(3, 96).to(torch.bfloat16)
    assert relative_error(layer(x), dense_linear(sizes, 96, shards)(x)) < PATHS_TOLERANCE


def test_mixed_shard_types_keep_one_weight_per_run_and_add_the_bias():
    sizes = [64, 32, 32, 16]
    shards = [quantized("Q4_0", 64, 64, 0), quantized("Q8_0", 32, 64, 1), quantized("Q8_0", 32, 64, 2),
              torch.randn(16, 64)]
    bias = torch.randn(sum(sizes))
    layer = gguf_linear(sizes, 64, bias=True)
    for index, shard in enumerate(shards):
        layer.load_weight("weight", shard, index)
    for index, part in enumerate(bias.split(sizes)):
        layer.load_weight("bias", part, index)
    assert [type(w) for w in layer.quant_method.weights] == [Int4CpuWeight, Int4CpuPairWeight, DenseWeight]
    parts = layer.quant_method.fused_parts(layer)  # each form's own description for the fused decoder layer
    assert [(p.kind, p.out_features) for p in parts] == [(LinearKind.INT4, 64), (LinearKind.INT4_PAIR, 64),
                                                         (LinearKind.DENSE, 16)]
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    want = dense_linear(sizes, 64, shards, bias=bias)(x)
    assert layer(x).shape == (2, 3, 144)
    assert relative_error(layer(x), want) < PATHS_TOLERANCE


def _loaded(sizes, shards, bias, dtype, fast) -> Linear:
    layer = gguf_linear(sizes, shards[0].shape[1], dtype=dtype, fast=fast, bias=True)
    for index, shard in enumerate(shards):
        layer.load_weight("weight", shard, index)
        layer.load_weight("bias", bias.split(sizes)[index], index)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_switched_off_path_is_dense_and_equals_unquantized_linear(dtype):
    """The switch off: dequantized once at load, then F.linear, whatever the dtype."""
    sizes = [32, 32]
    shards = [quantized("Q4_K", 32, 256, 5), quantized("Q4_K", 32, 256, 6)]
    bias = torch.randn(64)
    layer = _loaded(sizes, shards, bias, dtype, fast=False)
    assert [type(w) for w in layer.quant_method.weights] == [DenseWeight]
    assert layer.quant_method.dense_weight(layer).dtype == dtype
    x = torch.randn(4, 256).to(dtype)
    assert torch.equal(layer(x), dense_linear(sizes, 256, shards, dtype=dtype, bias=bias)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_activation_dtypes_keep_the_blocks_and_match_the_plain_path(dtype, monkeypatch):
    monkeypatch.setitem(packed.TILE_ELEMENTS, "cpu", 256 * 24)  # tiles of 24 rows: two whole, one short
    sizes = [32, 32]
    shards = [quantized("Q4_1", 32, 256, 5), quantized("Q4_1", 32, 256, 6)]
    bias = torch.randn(64)
    layer = _loaded(sizes, shards, bias, dtype, fast=True)
    [weight] = layer.quant_method.weights
    assert isinstance(weight, BlockTiledWeight) and weight.tile_rows == 24
    assert layer.quant_method.dense_weight(layer) is None
    assert layer.quant_method.fused_parts(layer) is None  # the fused decoder layer has no tiled kernel
    assert weight.tensor.data.data_ptr() != shards[0].data.data_ptr()  # owns its bytes, not the file's
    x = torch.randn(4, 256).to(dtype)
    want = dense_linear(sizes, 256, shards, dtype=dtype, bias=bias)(x)
    assert relative_error(layer(x), want) < TILED_TOLERANCE[dtype]


@pytest.mark.parametrize("ggml_type", [name for name in BLOCK_TYPES if name not in FLOAT_TYPES])
def test_tiled_path_matches_plain_path_for_every_type(ggml_type):
    tensor = quantized(ggml_type, 40, 256, 9)
    x = torch.randn(3, 256)
    tiled = BlockTiledWeight(tensor, tile_rows=16)
    assert tiled.nbytes() == tensor.data.numel()
    assert relative_error(tiled.matmul(x), torch.nn.functional.linear(x, tensor.dequantize())) < 2.0**-20


@pytest.mark.parametrize("ggml_type", ["MXFP4", "NVFP4"])
def test_types_without_int4_form_are_tiled_on_bfloat16(ggml_type):
    tensor = quantized(ggml_type, 40, 256, 10)
    weight = build_packed_weight(tensor, torch.bfloat16, torch.device("cpu"), use_fast_kernels=True)
    assert isinstance(weight, BlockTiledWeight)
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, tensor.dequantize(torch.bfloat16))
    assert relative_error(weight.matmul(x), want) < TILED_TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16"])
def test_float_ggml_tensors_are_dense(ggml_type):
    tensor = quantized(ggml_type, 8, 32, 11)
    for fast in (True, False):
        weight = build_packed_weight(tensor, torch.float32, torch.device("cpu"), use_fast_kernels=fast)
        assert isinstance(weight, DenseWeight) and torch.equal(weight.weight, tensor.dequantize())


def test_a_whole_fused_weight_loads_in_one_piece():
    """A checkpoint that stores a fused projection whole (Phi-3's qkv_proj) gives it with shard_index None."""
    sizes = [64, 32, 32]
    whole = quantized("Q4_K", 128, 256, 12)
    bias = torch.randn(128)
    layer = gguf_linear(sizes, 256, bias=True)
    layer.load_weight("weight", whole, None)
    layer.load_weight("bias", bias, None)
    assert [type(w) for w in layer.quant_method.weights] == [Int4CpuWeight]
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, whole.dequantize(torch.bfloat16), bias.to(torch.bfloat16))
    assert relative_error(layer(x), want) < PATHS_TOLERANCE
    with pytest.raises(ValueError, match=r"layer.weight'.*\(64, 256\).*\(128, 256\)"):
        gguf_linear(sizes, 256).load_weight("weight", quantized("Q4_K", 64, 256, 13), None)


def test_missing_shard_and_bad_shape_are_errors():
    layer = gguf_linear([32, 32], 64)
    layer.load_weight("weight", quantized("Q4_0", 32, 64, 0), 0)
    with pytest.raises(ValueError, match="not loaded"):
        layer(torch.randn(1, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"layer.weight\[shard 1\].*\(16, 64\).*\(32, 64\)"):
        layer.load_weight("weight", quantized("Q4_0", 16, 64, 1), 1)
    with pytest.raises(ValueError, match="built without"):
        layer.load_weight("bias", torch.zeros(32), 0)


def test_embedding_looks_up_quantized_rows():
    table = quantized("Q8_0", 48, 64, 7)
    embedding = VocabEmbedding(48, 64, dtype=torch.bfloat16, device="cpu")
    embedding.load_weight("weight", table)  # without a quant config: dequantized into the dense table
    assert embedding.quantized is None and torch.equal(embedding.weight, table.dequantize(torch.bfloat16))
    embedding.keep_quantized = True
    embedding.load_weight("weight", table)
    assert embedding.weight is None and embedding.quantized is table
    ids = torch.tensor([5, 0, 47, 5])
    assert torch.equal(embedding(ids), table.dequantize(torch.bfloat16)[ids])
    assert "quantized=Q8_0" in repr(embedding)


@pytest.mark.parametrize("fast", ["int4", False])
def test_tied_head_loads_from_the_embedding_tensor(fast):
    """prepare() keeps a tied head tied: the head packs the table; the embedding shares a dense head weight."""
    model = torch.nn.Module()
    model.embed = VocabEmbedding(48, 64, dtype=torch.bfloat16, device="cpu")
    model.head = Linear(64, 48, bias=False, dtype=torch.bfloat16, device="cpu", prefix="head")
    model.head.weight = model.embed.weight
    GGUFQuantConfig(use_fast_kernels=fast).prepare(model)
    assert model.embed.tied_heads == [model.head] and "head" in dict(model.named_modules())
    table = quantized("Q4_0", 48, 64, 8)
    model.embed.load_weight("weight", table)
    if fast:
        assert isinstance(model.head.quant_method.weights[0], Int4CpuWeight)
        assert model.embed.quantized is table
    else:
        assert model.embed.weight is model.head.quant_method.dense_weight(model.head)
        assert model.embed.quantized is None
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(model.embed(ids), table.dequantize(torch.bfloat16)[ids])
    x = torch.randn(2, 64).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, table.dequantize(torch.bfloat16))
    assert relative_error(model.head(x), want) < PATHS_TOLERANCE


@pytest.mark.parametrize("fast", [True, "int4", False])
def test_float_output_is_the_kernels_float32_sums(fast):
    """`float_output` (the LM head's logits): the int8 dot-product form returns its float32 sums unrounded (the
    product of the float32 activations, which quantize as the bfloat16 ones do); other forms round to the model
    dtype first, as `forward(x).float()`."""
    from mistralrs.quant.qdot import QdotWeight, qdot_available

    if fast is True and not qdot_available():
        pytest.skip("the int8 dot-product extension is not built")
    layer = gguf_linear([80], 64, fast=fast, bias=True)
    layer.load_weight("weight", quantized("Q8_0", 80, 64, 3))
    layer.load_weight("bias", torch.randn(80).to(torch.bfloat16))
    x = torch.randn(5, 64).to(torch.bfloat16)
    rounded = layer(x)
    layer.float_output = True
    y = layer(x)
    assert y.dtype == torch.float32
    if fast is True:
        assert isinstance(layer.quant_method.weights[0], QdotWeight)
        assert torch.equal(y, layer.quant_method.weights[0].matmul(x.float()) + layer.bias.float())
        assert not torch.equal(y, rounded.float())  # the bfloat16 form rounds the product and the sum
        assert relative_error(y, rounded.float()) < 2.0**-7
    else:
        assert torch.equal(y, rounded.float())
