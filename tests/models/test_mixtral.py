"""Mixtral (`MixtralForCausalLM`, sparse MoE with top-2 softmax routing) against `transformers`, fp32, tiny random.

Logits within `family_harness.ATOL` at every computed position (one chunk, chunked prefill with token-by-token
decode over shuffled blocks, packed sequences), 32 greedy tokens equal, and the fused MoE path equal to its
per-token reference twin (`layers/moe.py`).
"""

from __future__ import annotations

import glob

import pytest
import torch
import transformers

from mistralrs.layers.moe import FusedMoE, softmax_topk_routing
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.models.mixtral import MixtralForCausalLM
from mistralrs.models.registry import model_class_for
from tests.models import family_harness as harness

TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_local_experts=6,
            num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="eager")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module", params=["full", "window"])
def pair(request, tmp_path_factory):
    """(HF reference model, our model); "window": a sliding window of 8, shorter than the prompts."""
    overrides = dict(sliding_window=8) if request.param == "window" else {}
    config = transformers.MixtralConfig(**TINY, **overrides)
    hf, ours = harness.build_pair(config, transformers.MixtralForCausalLM, str(tmp_path_factory.mktemp("mixtral")))
    assert type(ours) is MixtralForCausalLM
    return hf, ours


def test_whole_prompt_one_chunk(pair):
    harness.check_one_chunk(*pair)


def test_chunked_prefill_then_decode(pair):
    harness.check_chunked_prefill_then_decode(*pair)


def test_packed_sequences_and_mixed_steps(pair):
    harness.check_packed_sequences(*pair)


def test_greedy_matches_generate(pair):
    harness.check_greedy_matches_generate(*pair)


def test_fused_moe_equals_reference(pair):
    _, ours = pair
    harness.check_moe_backends_agree(ours)
    assert ours.model.layers[0].block_sparse_moe.experts.backend == "fused"


def test_fused_moe_layer_against_dense_sum():
    """Routing matches softmax/top-k/renormalise, and the output is the weighted sum of each token's experts."""
    torch.manual_seed(0)
    moe = FusedMoE(5, 2, 16, 24, hidden_act="silu", routing="softmax_renorm", checkpoint_names=("w1", "w3", "w2"),
                   dtype=torch.float32, device="cpu")
    with torch.no_grad():
        moe.w13.normal_()
        moe.w2.normal_()
    x, logits = torch.randn(9, 16), torch.randn(9, 5)
    weights, ids = softmax_topk_routing(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    all_experts = torch.stack([torch.nn.functional.linear(
        torch.nn.functional.silu(x @ moe.w13[e, :24].T) * (x @ moe.w13[e, 24:].T), moe.w2[e]) for e in range(5)], 1)
    dense = torch.zeros(9, 5).scatter(1, ids, weights)  # [tokens, experts], zero off the top-k
    expected = (dense[:, :, None] * all_experts).sum(1)
    torch.testing.assert_close(moe(x, logits), expected, atol=1e-4, rtol=1e-5)
    moe.set_backend("reference")
    torch.testing.assert_close(moe(x, logits), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="moe backend must be one of"):
        moe.set_backend("bmm")


def test_load_errors(pair, tmp_path):
    """A missing expert tensor and an unknown one are both named (checkpoint names as saved on disk)."""
    hf, _ = pair
    hf.save_pretrained(str(tmp_path))
    state = dict(iter_safetensors(sorted(glob.glob(str(tmp_path / "*.safetensors"))), torch.float32))
    missing_name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    config_dict = hf.config.to_dict()
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        load_model(config_dict, [(k, v) for k, v in state.items() if k != missing_name], dtype=torch.float32,
                   device="cpu")
    extra = dict(state, **{"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.0\.block_sparse_moe\.experts\.9"):
        load_model(config_dict, extra.items(), dtype=torch.float32, device="cpu")


def test_registry_names():
    assert model_class_for(["MixtralForCausalLM"]) is MixtralForCausalLM
    assert model_class_for(None, "Mixtral") is MixtralForCausalLM
