"""Gemma, Gemma 2 and Gemma 3 (text) over packed tokens and a paged KV cache against `transformers`.

fp32, tiny random configs; logits within `family_harness.ATOL` (1e-4) at every computed position.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.loader.safetensors_loader import load_model
from mistralrs.models.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    GemmaForCausalLM,
)
from mistralrs.models.registry import model_class_for, model_class_for_gguf
from tests.models import family_harness as harness

# head_dim 24 is independent of hidden_size / heads (= 16).
TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
            attn_implementation="eager")
FAMILIES = {
    # Gemma: untied LM head to also cover the untied path; legacy hidden_act "gelu" (means tanh gelu).
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, GemmaForCausalLM,
              dict(hidden_act="gelu", tie_word_embeddings=False)),
    # Gemma 2: window 6 < prompt on layers 0 and 2, soft-caps small enough to bind, scalar != head_dim.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, Gemma2ForCausalLM,
               dict(sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=0.5,
                    query_pre_attn_scalar=20)),
    # Gemma 3: layers [sliding, global, sliding] (pattern 2), window 5, local base 100, global 10000 with
    # linear scaling; q/k norms.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, Gemma3ForCausalLM,
               dict(sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=24, rope_parameters={
                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF reference model, our model loaded from the HF checkpoint on disk)."""
    name = request.param
    config_cls, hf_cls, our_cls, overrides = FAMILIES[name]
    config = config_cls(**TINY, **overrides)
    hf, ours = harness.build_pair(config, hf_cls, str(tmp_path_factory.mktemp(name)), norm_center=0.0,
                                  embed_std=0.15 / TINY["hidden_size"] ** 0.5)  # the model scales it by sqrt(64)
    assert type(ours) is our_cls
    return name, hf, ours


def test_whole_prompt_one_chunk(family):
    _, hf, ours = family
    harness.check_one_chunk(hf, ours)


def test_chunked_prefill_then_decode(family):
    _, hf, ours = family
    harness.check_chunked_prefill_then_decode(hf, ours)


def test_packed_sequences_and_mixed_steps(family):
    _, hf, ours = family
    harness.check_packed_sequences(hf, ours)


def test_reference_backend_matches_sdpa(family):
    _, _, ours = family
    harness.check_reference_backend(ours)


def test_greedy_decode_matches_generate(family):
    _, hf, ours = family
    harness.check_greedy_matches_generate(hf, ours)


def test_load_rejects_missing_and_unexpected_weights(family):
    name, hf, _ = family
    missing = "model.layers.1.self_attn.k_norm.weight" if name == "gemma3" else "model.layers.1.mlp.up_proj.weight"
    harness.check_load_errors(hf, missing)


def test_the_family_features_change_the_logits(family):
    """Each particular of the tiny configs is active: removing it moves the logits far beyond the tolerance."""
    name, _, ours = family
    scale_off = 1e-2  # a change this size fails the 1e-4 comparison against transformers

    def drop_embed_scale(model):
        model.model.embed_scale.fill_(1.0)

    assert harness.max_logit_change(ours, drop_embed_scale) > scale_off
    if name == "gemma2":
        def no_attn_cap(model):
            for layer in model.model.layers:
                layer.self_attn.attn.logit_softcap = None

        def no_final_cap(model):
            model.final_logit_softcap = None

        assert harness.max_logit_change(ours, no_attn_cap) > scale_off
        assert harness.max_logit_change(ours, no_final_cap) > scale_off
    if name in ("gemma2", "gemma3"):
        def no_window(model):
            for layer in model.model.layers:
                layer.self_attn.attn.sliding_window = None

        assert harness.max_logit_change(ours, no_window) > scale_off
    if name == "gemma3":
        def global_rope_everywhere(model):
            model.model.rotary_emb_local = model.model.rotary_emb

        assert harness.max_logit_change(ours, global_rope_everywhere) > scale_off


def test_bf16_weights_on_par_with_transformers_bf16(family):
    _, hf, _ = family
    import copy

    model = load_model(hf.config.to_dict(), hf.state_dict().items(), dtype=torch.bfloat16, device="cpu")
    token_ids = harness.prompt(50, 12)
    (logits,) = harness.TinyRunner(model, dtype=torch.bfloat16).step([(0, token_ids)])
    assert logits.dtype == torch.float32
    reference = harness.hf_logits(hf, token_ids)
    hf_bf16_error = (harness.hf_logits(copy.deepcopy(hf).to(torch.bfloat16), token_ids) - reference).abs().mean()
    assert (logits - reference).abs().mean() < 1.5 * hf_bf16_error


def test_gemma3_legacy_config_keys_mean_the_same(tmp_path):
    """Old Gemma 3 configs: rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern keys and no
    layer_types. They must build the same model as the nested `rope_parameters` + `layer_types` form."""
    config_cls, hf_cls, _, overrides = FAMILIES["gemma3"]
    hf, ours = harness.build_pair(config_cls(**TINY, **overrides), hf_cls, str(tmp_path), norm_center=0.0)
    legacy = {k: v for k, v in hf.config.to_dict().items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=10000.0, rope_local_base_freq=100.0, sliding_window_pattern=2,
                  rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = load_model(legacy, hf.state_dict().items(), dtype=torch.float32, device="cpu")
    token_ids = harness.prompt(60, 14)
    (expected,) = harness.TinyRunner(ours).step([(0, token_ids)])
    (logits,) = harness.TinyRunner(model).step([(0, token_ids)])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_sparse_configs_take_the_transformers_defaults():
    """Keys a config.json leaves out take the family's transformers defaults, not the generic ones."""
    base = {k: v for k, v in TINY.items() if k not in ("attn_implementation", "head_dim")}
    gemma2 = Gemma2ForCausalLM(_config(dict(base, architectures=["Gemma2ForCausalLM"])), dtype=torch.float32,
                               device="cpu")
    hf2 = transformers.Gemma2Config(**base)
    assert gemma2.config.head_dim == hf2.head_dim == 256
    assert gemma2.config.tie_word_embeddings is hf2.tie_word_embeddings is True
    assert gemma2.model.layers[0].self_attn.attn.sliding_window == hf2.sliding_window == 4096
    assert gemma2.model.layers[1].self_attn.attn.sliding_window is None
    assert gemma2.model.layers[0].self_attn.attn.logit_softcap == hf2.attn_logit_softcapping
    assert gemma2.final_logit_softcap == hf2.final_logit_softcapping
    assert gemma2.model.layers[0].self_attn.attn.scale == hf2.query_pre_attn_scalar**-0.5
    gemma3 = Gemma3ForCausalLM(_config(dict(base, architectures=["Gemma3ForCausalLM"], num_hidden_layers=7)),
                               dtype=torch.float32, device="cpu")
    windows = [layer.self_attn.attn.sliding_window for layer in gemma3.model.layers]
    assert windows == [4096] * 5 + [None, 4096]  # every 6th layer global
    assert gemma3.final_logit_softcap is None and gemma3.model.layers[0].self_attn.attn.logit_softcap is None
    inv_freq = {"global": gemma3.model.rotary_emb.inv_freq, "local": gemma3.model.rotary_emb_local.inv_freq}
    assert inv_freq["global"][1].item() == pytest.approx(1e6 ** (-2 / 256))
    assert inv_freq["local"][1].item() == pytest.approx(1e4 ** (-2 / 256))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma3ForCausalLM(_config(dict(base, architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True)),
                          dtype=torch.float32, device="cpu")


def _config(d):
    from mistralrs.models.config import TextModelConfig

    return TextModelConfig.from_hf_dict(d)


def test_registry_names():
    assert model_class_for(["GemmaForCausalLM"]) is GemmaForCausalLM
    assert model_class_for(["Gemma2ForCausalLM"]) is Gemma2ForCausalLM
    assert model_class_for(["Gemma3ForCausalLM"]) is Gemma3ForCausalLM
    assert model_class_for(["LlamaForCausalLM"], "Gemma") is GemmaForCausalLM
    assert model_class_for(None, type("Enum", (), {"name": "Gemma2"})()) is Gemma2ForCausalLM
    assert model_class_for_gguf("gemma3") is Gemma3ForCausalLM
