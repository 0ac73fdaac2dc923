"""Phi-2 (`PhiForCausalLM`) over packed tokens and a paged KV cache against `transformers`.

fp32, tiny random config (parallel attention/MLP, partial rotary 0.4, LayerNorm and projection biases, biased
LM head); logits within `family_harness.ATOL` (1e-4) at every computed position.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.models.config import TextModelConfig
from mistralrs.models.phi2 import PhiForCausalLM
from mistralrs.models.registry import model_class_for
from tests.models import family_harness as harness

# head_dim 20, rotary_dim int(20 * 0.4) = 8.
TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=80, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.4, layer_norm_eps=1e-5,
            attn_implementation="eager")



pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF reference model, our model loaded from the HF checkpoint on disk)."""
    hf, ours = harness.build_pair(transformers.PhiConfig(**TINY), transformers.PhiForCausalLM,
                                  str(tmp_path_factory.mktemp("phi2")))
    assert type(ours) is PhiForCausalLM
    assert ours.model.rotary_emb.rotary_dim == 8
    return hf, ours


def test_whole_prompt_one_chunk(pair):
    harness.check_one_chunk(*pair)


def test_chunked_prefill_then_decode(pair):
    harness.check_chunked_prefill_then_decode(*pair)


def test_packed_sequences_and_mixed_steps(pair):
    harness.check_packed_sequences(*pair)


def test_reference_backend_matches_sdpa(pair):
    harness.check_reference_backend(pair[1])


def test_greedy_decode_matches_generate(pair):
    harness.check_greedy_matches_generate(*pair)


def test_load_rejects_missing_and_unexpected_weights(pair):
    harness.check_load_errors(pair[0], "model.layers.1.self_attn.dense.bias")
    harness.check_load_errors(pair[0], "lm_head.bias")


def test_partial_rotary_matters(pair):
    def full_rotary(model):
        model.model.rotary_emb = type(model.model.rotary_emb)(20, 10000.0, None, 256, device="cpu")

    assert harness.max_logit_change(pair[1], full_rotary) > 1e-2


def test_sparse_config_takes_phi_defaults():
    """A config.json without hidden_act / partial_rotary_factor means gelu_new and half-rotary, as in transformers."""
    sparse = {k: v for k, v in TINY.items() if k not in ("partial_rotary_factor", "attn_implementation")}
    model = PhiForCausalLM(TextModelConfig.from_hf_dict(dict(sparse, architectures=["PhiForCausalLM"])),
                           dtype=torch.float32, device="cpu")
    hf_config = transformers.PhiConfig(**sparse)
    assert model.config.hidden_act == hf_config.hidden_act == "gelu_new"
    assert model.model.rotary_emb.rotary_dim == int(20 * hf_config.rope_parameters["partial_rotary_factor"]) == 10
    with pytest.raises(ValueError, match="qk_layernorm"):
        PhiForCausalLM(TextModelConfig.from_hf_dict(dict(sparse, qk_layernorm=True)), dtype=torch.float32,
                       device="cpu")


def test_registry_names():
    assert model_class_for(["PhiForCausalLM"]) is PhiForCausalLM
    assert model_class_for(None, "phi2") is PhiForCausalLM
