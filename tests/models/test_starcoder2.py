"""Starcoder2 over packed tokens and a paged KV cache against `transformers`.

fp32, tiny random config (LayerNorms and projections with biases, GELU MLP, tied LM head, sliding window 6
smaller than the prompts); logits within `family_harness.ATOL` (1e-4) at every computed position.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.models.config import TextModelConfig
from mistralrs.models.registry import model_class_for
from mistralrs.models.starcoder2 import Starcoder2ForCausalLM
from tests.models import family_harness as harness

TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
            norm_epsilon=1e-5, bos_token_id=0, eos_token_id=1, attn_implementation="eager")



pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF reference model, our model loaded from the HF checkpoint on disk)."""
    hf, ours = harness.build_pair(transformers.Starcoder2Config(**TINY), transformers.Starcoder2ForCausalLM,
                                  str(tmp_path_factory.mktemp("starcoder2")), embed_std=0.05)
    assert type(ours) is Starcoder2ForCausalLM
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied by default
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
    harness.check_load_errors(pair[0], "model.layers.0.mlp.c_fc.bias")
    harness.check_load_errors(pair[0], "model.norm.bias")


def test_sliding_window_matters(pair):
    def no_window(model):
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = None

    assert harness.max_logit_change(pair[1], no_window) > 1e-2


def test_sparse_config_and_no_bias():
    """Defaults as in transformers (gelu tanh, tied head); `use_bias: false` drops every projection bias."""
    sparse = {k: v for k, v in TINY.items() if k != "attn_implementation"}
    model = Starcoder2ForCausalLM(TextModelConfig.from_hf_dict(dict(sparse, use_bias=False)), dtype=torch.float32,
                                  device="cpu")
    assert model.config.hidden_act == transformers.Starcoder2Config().hidden_act == "gelu_pytorch_tanh"
    assert model.config.tie_word_embeddings
    assert not any(name.endswith(("proj.bias", "c_fc.bias")) for name in model.expected_weight_names())
    assert "model.layers.0.input_layernorm.bias" in model.expected_weight_names()


def test_registry_names():
    assert model_class_for(["Starcoder2ForCausalLM"]) is Starcoder2ForCausalLM
    assert model_class_for(None, "starcoder2") is Starcoder2ForCausalLM
