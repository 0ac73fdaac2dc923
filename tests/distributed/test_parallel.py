"""The shard arithmetic of mistralrs/distributed/parallel.py (no processes): balanced splits, heads, vocabulary,
GGML, HQQ and FP8 slices (in their own encoding, or the dequantized fallback), LoRA factors, and the plain case without
a group."""

from __future__ import annotations

import pytest
import torch

from mistralrs.distributed.group import TPGroup, building_for, current_group
from mistralrs.distributed.parallel import (
    HeadShard, LinearShard, aligned_range, balanced_ranges, head_shard, narrow_columns, narrow_rows, vocab_ranges,
)
from mistralrs.layers.linear import Linear
from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import dequantize_rows
from mistralrs.quant.hqq import hqq_quantize
from mistralrs.quant.fp8 import fp8_quantize
from mistralrs.quant.isq import local_importances
from mistralrs.quant.isq_state import Fp8Params, HqqParams, IsqLayerState
from tests.quant.test_ggml_types import random_blocks


def groups(world_size: int) -> list[TPGroup]:
    return [TPGroup(rank, world_size) for rank in range(world_size)]


def test_balanced_and_aligned_splits():
    assert balanced_ranges(5, 2) == [(0, 3), (3, 2)]
    assert balanced_ranges(96, 2, 32) == [(0, 64), (64, 32)]
    assert [aligned_range(1536, g) for g in groups(2)] == [(0, 768), (768, 768)]  # whole 256-column blocks
    assert [aligned_range(96, g) for g in groups(2)] == [(0, 64), (64, 32)]  # whole 32-column blocks
    # fewer 256-column blocks than ranks: 32-column blocks
    assert [aligned_range(512, g) for g in groups(4)] == [(0, 128), (128, 128), (256, 128), (384, 128)]
    assert [aligned_range(33, g) for g in groups(2)] == [(0, 17), (17, 16)]  # no block divides: columns
    assert aligned_range(33, None) == (0, 33)
    with pytest.raises(ValueError, match="cannot split a width of 1 over 2"):
        aligned_range(1, TPGroup(1, 2))


def test_heads_follow_kv_groups_and_replicate_below_the_rank_count():
    # SmolLM2: 9 query heads in 3 KV groups over 2 ranks -> 2 + 1 groups
    assert [head_shard(9, 3, g) for g in groups(2)] == [HeadShard(0, 6, 0, 2), HeadShard(6, 3, 2, 1)]
    # one KV head: each rank keeps it, with half the query heads
    assert [head_shard(4, 1, g) for g in groups(2)] == [HeadShard(0, 2, 0, 1), HeadShard(2, 2, 0, 1)]
    # 2 KV heads over 4 ranks: two ranks per KV head, the query heads of its group split between them
    assert [head_shard(8, 2, g) for g in groups(4)] == [
        HeadShard(0, 2, 0, 1), HeadShard(2, 2, 0, 1), HeadShard(4, 2, 1, 1), HeadShard(6, 2, 1, 1)]
    assert head_shard(8, 2, None) == HeadShard(0, 8, 0, 2)
    with pytest.raises(ValueError, match="'num_key_value_heads' \\(3\\) must be at least the tensor-parallel size 4"):
        head_shard(6, 3, TPGroup(0, 4))
    with pytest.raises(ValueError, match="'num_attention_heads' \\(2\\) must be at least the tensor-parallel size 4"):
        head_shard(2, 1, TPGroup(0, 4))


def test_vocab_ranges_cover_the_vocabulary_once():
    assert vocab_ranges(129, TPGroup(0, 2)) == [(0, 65), (65, 64)]
    assert vocab_ranges(129, None) == [(0, 129)]
    with pytest.raises(ValueError, match="'vocab_size' \\(1\\)"):
        vocab_ranges(1, TPGroup(0, 2))


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0", "Q4_K"])
def test_ggml_column_slices(ggml_type):
    num_cols = 512
    raw = torch.from_numpy(random_blocks(ggml_type, 6, num_cols, seed=3))
    tensor = GGMLTensor(raw, ggml_type, (6, num_cols))
    dense = dequantize_rows(raw, ggml_type)
    whole = narrow_columns(tensor, 256, 256, torch.float32)  # whole blocks of every type here
    assert isinstance(whole, GGMLTensor) and torch.equal(whole.dequantize(), dense[:, 256:])
    split = narrow_columns(tensor, 96, 64, torch.float32)  # inside a 256-column block for Q4_K
    if ggml_type == "Q4_K":
        assert isinstance(split, torch.Tensor) and torch.equal(split, dense[:, 96:160])
    else:
        assert isinstance(split, GGMLTensor) and torch.equal(split.dequantize(), dense[:, 96:160])
    rows = narrow_rows(tensor, 2, 3)
    assert torch.equal(rows.dequantize(), dense[2:5])


@pytest.mark.parametrize(("bits", "rows"), [(4, 128), (8, 64), (4, 96)])
def test_hqq_slices(bits, rows):
    """Columns keep whole HQQ groups when the rows are whole bands of `rows / 64` (else dequantized); rows never do."""
    params = hqq_quantize(torch.randn(rows, 96), bits)
    dense = params.dequantize(torch.float32)
    columns = narrow_columns(params, 32, 48, torch.float32)
    assert isinstance(columns, HqqParams) == (rows % 64 == 0)
    restored = columns.dequantize(torch.float32) if isinstance(columns, HqqParams) else columns
    assert torch.equal(restored, dense[:, 32:80])
    assert torch.equal(narrow_rows(params, 5, 40), dense[5:45])


def test_fp8_slices_keep_the_tensor_scale():
    params = fp8_quantize(torch.randn(12, 40), torch.float8_e4m3fn)
    dense = params.dequantize(torch.float32)
    rows, columns = narrow_rows(params, 3, 4), narrow_columns(params, 7, 9, torch.float32)
    assert isinstance(rows, Fp8Params) and isinstance(columns, Fp8Params)
    assert torch.equal(rows.dequantize(torch.float32), dense[3:7])
    assert torch.equal(columns.dequantize(torch.float32), dense[:, 7:16])


def _tensors(weight) -> list[torch.Tensor]:
    return [weight] if isinstance(weight, torch.Tensor) else [t for t in vars(weight).values()
                                                              if isinstance(t, torch.Tensor)]


def test_an_owned_piece_shares_no_storage_with_the_layer():
    ggml = GGMLTensor(torch.from_numpy(random_blocks("Q8_0", 8, 64, seed=1)), "Q8_0", (8, 64))
    for weight in (ggml, fp8_quantize(torch.randn(8, 64), torch.float8_e4m3fn), torch.randn(8, 64)):
        piece = IsqLayerState.of(narrow_rows(weight, 2, 3), torch.randn(3))
        owned = piece.owned()
        assert owned.kind == piece.kind and torch.equal(owned.bias, piece.bias)
        for ours, theirs in zip(_tensors(owned.weight), _tensors(piece.weight), strict=True):
            assert ours.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()
            assert torch.equal(ours.view(torch.uint8), theirs.contiguous().view(torch.uint8))


def test_importances_follow_the_input_columns():
    """An imatrix vector per checkpoint layer: a row-parallel layer's range, an expert down projection's range of the
    intermediate width; column-parallel layers and gate/up see whole inputs."""
    vectors = [torch.arange(64.0), None]
    with building_for(TPGroup(1, 2)):
        moe = FusedMoE(2, 1, 64, 64, hidden_act="silu", routing="softmax_renorm", checkpoint_names=("w1", "w3", "w2"),
                       dtype=torch.float32, device="cpu")
    gate, down, up = torch.randn(64), torch.randn(64), torch.randn(64)
    assert [v is None or v.tolist() for v in local_importances(moe, [gate, down, up, None, None, None])] == [
        gate.tolist(), down[32:].tolist(), up.tolist(), True, True, True]
    row = Linear(64, 8, bias=False, dtype=torch.float32, device="cpu",
                 tp=LinearShard(TPGroup(1, 2), "row", ((40, 24),)))
    assert torch.equal(local_importances(row, vectors)[0], vectors[0][40:])
    column = Linear(64, [4, 4], bias=False, dtype=torch.float32, device="cpu",
                    tp=LinearShard(TPGroup(1, 2), "column", ((2, 2), (2, 2))))
    assert local_importances(column, vectors) == vectors


def test_lora_factors_follow_the_split():
    a, b = torch.randn(2, 8), torch.randn(12, 2)  # a fused [4 + 4 + 4]-row layer stored fused (Phi-3's qkv)
    column = LinearShard(TPGroup(1, 2), "column", ((2, 2), (2, 2), (2, 2)))
    local_a, local_b = column.lora_factors(a, b, None, [4, 4, 4])
    assert torch.equal(local_a, a) and torch.equal(local_b, torch.cat([b[2:4], b[6:8], b[10:12]]))
    assert torch.equal(column.lora_factors(a, b[4:8], 1, [4, 4, 4])[1], b[6:8])
    row = LinearShard(TPGroup(1, 2), "row", ((5, 3),))
    local_a, local_b = row.lora_factors(a, b, None, [12])
    assert torch.equal(local_a, a[:, 5:]) and torch.equal(local_b, b)
    with pytest.raises(ValueError, match="one input-column range"):
        LinearShard(TPGroup(0, 2), "row", ((0, 1), (1, 1)))


def test_a_linear_keeps_its_piece_and_a_row_split_adds_the_bias_once():
    weight, bias = torch.randn(6, 8), torch.randn(6)
    column = Linear(8, [4, 2], bias=True, dtype=torch.float32, device="cpu",
                    tp=LinearShard(TPGroup(1, 2), "column", ((2, 2), (1, 1))))
    column.load_weight("weight", torch.cat([weight[:4], weight[4:]]))  # fused in the checkpoint: split per part
    column.load_weight("bias", bias)
    assert column.output_partition_sizes == [2, 1] and column.checkpoint_partition_sizes == [4, 2]
    assert torch.equal(column.weight, torch.cat([weight[2:4], weight[5:6]]))
    assert torch.equal(column.bias, torch.cat([bias[2:4], bias[5:6]]))
    for rank, expected_bias in ((0, bias), (1, torch.zeros(6))):
        row = Linear(8, 6, bias=True, dtype=torch.float32, device="cpu",
                     tp=LinearShard(TPGroup(rank, 2), "row", ((4 * rank, 4),)))
        row.load_weight("weight", weight)
        row.load_weight("bias", bias)
        assert row.in_features == 4 and torch.equal(row.weight, weight[:, 4 * rank:4 * rank + 4])
        assert torch.equal(row.bias, expected_bias)


def test_outside_building_for_nothing_is_split():
    assert current_group() is None
    with building_for(TPGroup(0, 1)):  # a group of one: whole weights
        assert current_group() is None
    with building_for(TPGroup(0, 2)):
        assert current_group() == TPGroup(0, 2)
    assert current_group() is None
