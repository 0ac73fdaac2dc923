"""`GGUFLinearMethod` and `GGUFQuantConfig`: fused shards, the fast/plain switch, tied embeddings, and tiny GGUF
models whose logits match the same file loaded with everything dequantized (the reference path).

Tolerances are relative to the output norm: 2**-7 between the fast and the plain bfloat16 path (derived in
tests/quant/test_cpu_int4.py); the float32 and switched-off paths are exact.
"""

from __future__ import annotations

import pytest
import torch

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.quant.cpu_int4 import Int4CpuPairWeight, Int4CpuWeight
from mistralrs.quant.gguf_linear import GGUFLinearMethod, GGUFQuantConfig
from mistralrs.quant.packed import DenseWeight
from tests.quant.test_cpu_int4 import PATHS_TOLERANCE, quantized, relative_error

FAST_TYPES = {"Q4_0": Int4CpuWeight, "Q4_1": Int4CpuWeight, "Q8_0": Int4CpuPairWeight}


def gguf_linear(sizes, in_features, *, dtype=torch.bfloat16, fast=True, bias=False) -> Linear:
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
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    want = dense_linear(sizes, 64, shards, bias=bias)(x)
    assert layer(x).shape == (2, 3, 144)
    assert relative_error(layer(x), want) < PATHS_TOLERANCE


@pytest.mark.parametrize("dtype, fast", [(torch.bfloat16, False), (torch.float32, True), (torch.float16, True)])
def test_plain_path_is_dense_and_equals_unquantized_linear(dtype, fast):
    """The switch off, or activations other than bfloat16: dequantized once at load, then F.linear."""
    sizes = [32, 32]
    shards = [quantized("Q4_1", 32, 64, 5), quantized("Q4_1", 32, 64, 6)]
    bias = torch.randn(64)
    layer = gguf_linear(sizes, 64, dtype=dtype, fast=fast, bias=True)
    for index, shard in enumerate(shards):
        layer.load_weight("weight", shard, index)
        layer.load_weight("bias", bias.split(sizes)[index], index)
    assert [type(w) for w in layer.quant_method.weights] == [DenseWeight]
    assert layer.quant_method.dense_weight(layer).dtype == dtype
    x = torch.randn(4, 64).to(dtype)
    assert torch.equal(layer(x), dense_linear(sizes, 64, shards, dtype=dtype, bias=bias)(x))


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


@pytest.mark.parametrize("fast", [True, False])
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
