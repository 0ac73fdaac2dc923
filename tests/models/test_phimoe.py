"""Phi-3.5-MoE (`PhiMoEForCausalLM`, sparsemixer top-2 routing, LayerNorm with bias, attention and LM-head biases)
against `transformers`' `PhimoeForCausalLM`, fp32, tiny random (8 experts).

Logits within `family_harness.ATOL` at every computed position (one chunk, chunked prefill with token-by-token
decode over shuffled blocks, packed sequences), 32 greedy tokens equal, fused MoE equal to its reference twin.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.layers.moe import sparsemixer_routing
from mistralrs.models.config import TextModelConfig
from mistralrs.models.phimoe import PhiMoEForCausalLM
from mistralrs.models.registry import model_class_for
from tests.models import family_harness as harness

TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_local_experts=8,
            num_experts_per_tok=2, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="eager")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module", params=["full", "window"])
def pair(request, tmp_path_factory):
    """(HF reference model, our model); "window": a sliding window of 8, shorter than the prompts.
    `router_jitter_noise` 0.3 makes sparsemixer's masks drop some experts and keep others."""
    overrides = dict(sliding_window=8) if request.param == "window" else {}
    config = transformers.PhimoeConfig(**TINY, **overrides)
    hf, ours = harness.build_pair(config, transformers.PhimoeForCausalLM, str(tmp_path_factory.mktemp("phimoe")))
    assert type(ours) is PhiMoEForCausalLM
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
    harness.check_moe_backends_agree(pair[1])


def test_sparsemixer_matches_transformers():
    """Our inference-time sparsemixer equals `transformers`' on random logits, for several jitter values."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = 2 * torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for eps in (0.0, 0.01, 0.3):
        ref_weights, ref_ids = sparsemixer(logits, jitter_eps=eps, training=False, top_k=2)
        weights, ids = sparsemixer_routing(logits, 2, eps)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights)
    with pytest.raises(ValueError, match="num_experts_per_tok must be 2"):
        sparsemixer_routing(logits, 3, 0.01)


def test_longrope_mscale():
    """LongRoPE's cos/sin scale is the config's mscale; unequal short/long mscales are rejected."""
    half = 8
    rope = dict(rope_type="longrope", short_factor=[1.0] * half, long_factor=[2.0] * half, short_mscale=1.25,
                long_mscale=1.25, original_max_position_embeddings=32)
    config = TextModelConfig.from_hf_dict(dict(TINY, rope_scaling=rope))
    model = PhiMoEForCausalLM(config, dtype=torch.float32, device="cpu")
    assert model.model.rotary_emb.is_longrope and model.model.rotary_emb.attention_factor == 1.25
    with pytest.raises(ValueError, match="long_mscale"):
        PhiMoEForCausalLM(TextModelConfig.from_hf_dict(dict(TINY, rope_scaling=dict(rope, long_mscale=1.5))),
                          dtype=torch.float32, device="cpu")


def test_registry_names():
    assert model_class_for(["PhiMoEForCausalLM"]) is PhiMoEForCausalLM
    assert model_class_for(["PhimoeForCausalLM"]) is PhiMoEForCausalLM
    assert model_class_for(None, "Phi3_5MoE") is PhiMoEForCausalLM
    assert model_class_for(None, "phi3.5moe") is PhiMoEForCausalLM
