"""DeepSeek-V2 / V2-Lite / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) against `transformers`.

fp32, tiny random configs: 3 layers (the first dense), 8 routed experts in 4 groups, a shared expert, small MLA
dims, YaRN with mscale_all_dim (so the softmax scale is corrected); logits within `family_harness.ATOL` at every
computed position; the compressed latent is what the paged cache holds. The MLA fast path (absorbed) and the
per-step decompression both equal the per-sequence reference twin.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mistralrs.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from mistralrs.models.registry import model_class_for
from mistralrs.worker.forward_batch import KVCacheSpec, allocate_kv_caches
from tests.models import family_harness as harness

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=0.707,
            mscale_all_dim=0.707, beta_fast=32, beta_slow=1)
TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
            rope_parameters=YARN, bos_token_id=0, eos_token_id=1, attn_implementation="eager")

CONFIGS = {
    # DeepSeek-V2: low-rank queries, group-limited greedy softmax routing, routed scaling.
    "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
           dict(q_lora_rank=24, topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    # DeepSeek-V2-Lite: one q_proj (q_lora_rank null), plain greedy routing.
    "v2_lite": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                dict(q_lora_rank=None, topk_method="greedy")),
    # DeepSeek-V3: sigmoid scores with correction bias, grouped top-k, normalized weights, scaling 2.5.
    "v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
           dict(q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # DeepSeek-V3 variant: NeoX (non-interleaved) rope, unnormalized weights.
    "v3_neox_rope": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                     dict(q_lora_rank=24, rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.0)),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    """(name, HF reference model, our model)."""
    name = request.param
    config_cls, model_cls, overrides = CONFIGS[name]
    config = config_cls(**TINY, **overrides)
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    harness.sharpen(hf, seed=1)
    with torch.no_grad():
        for layer in hf.model.layers[config.first_k_dense_replace:]:
            gate = layer.mlp.gate
            gate.weight.mul_(3.0)  # peaked routing: a wrong expert choice shows in the logits
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(0.3 * torch.randn(gate.e_score_correction_bias.shape))
    _, ours = _save_and_load(hf, str(tmp_path_factory.mktemp(name)))
    assert type(ours) is (DeepseekV3ForCausalLM if name.startswith("v3") else DeepseekV2ForCausalLM)
    assert ours.dims.rope_interleave == (name != "v3_neox_rope")
    return name, hf, ours


def _save_and_load(hf, path: str):
    import glob
    import json
    import os

    from mistralrs.loader.safetensors_loader import iter_safetensors, load_model

    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return hf, load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu")


def test_whole_prompt_one_chunk(family):
    _, hf, ours = family
    harness.check_one_chunk(hf, ours)


def test_chunked_prefill_then_decode(family):
    _, hf, ours = family
    harness.check_chunked_prefill_then_decode(hf, ours)


def test_packed_sequences_and_mixed_steps(family):
    _, hf, ours = family
    harness.check_packed_sequences(hf, ours)


def test_absorbed_and_decompressed_match_reference(family):
    """The absorbed fast path (default) and the batched per-step decompression both equal the reference twin."""
    ours = family[2]
    harness.check_reference_backend(ours)
    layers = [layer.self_attn.attn for layer in ours.model.layers]
    try:
        for attn in layers:
            attn.absorb = False
        harness.check_reference_backend(ours)
    finally:
        for attn in layers:
            attn.absorb = True


def test_fused_moe_equals_reference(family):
    """The routed experts are a `FusedMoE`: its grouped path equals its per-token twin."""
    harness.check_moe_backends_agree(family[2])


def test_greedy_decode_matches_transformers(family):
    _, hf, ours = family
    harness.check_greedy_matches_generate(hf, ours)


def test_cache_holds_compressed_latent(family):
    """The paged cache is one latent row of kv_lora_rank + qk_rope_head_dim per token, with no V cache."""
    ours = family[2]
    spec = ours.kv_cache_spec()
    assert (spec.num_kv_heads, spec.head_dim, spec.value_dim) == (1, 16 + 8, 0)
    k, v = allocate_kv_caches(spec, 2, harness.BLOCK_SIZE, torch.float32, "cpu")[0]
    assert k.shape == (8, 1, 24) and v.numel() == 0
    assert spec.bytes_per_block(harness.BLOCK_SIZE, torch.float32) == 3 * harness.BLOCK_SIZE * 24 * 4
    assert KVCacheSpec(2, 4, 8).bytes_per_block(4, torch.float32) == 2 * 2 * 4 * 4 * 8 * 4  # K/V models unchanged


def test_routing_and_yarn_matter(family):
    """The routing choice, the correction bias and YaRN's softmax-scale correction each change the logits."""
    name, _, ours = family

    def uniform_router(model):
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.zero_()

    def plain_scale(model):
        for layer in model.model.layers:
            layer.self_attn.attn.scale = ours.dims.qk_head_dim**-0.5

    assert harness.max_logit_change(ours, uniform_router) > 1e-2
    assert harness.max_logit_change(ours, plain_scale) > 1e-2
    if name.startswith("v3"):
        def no_bias(model):
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.zero_()

        assert harness.max_logit_change(ours, no_bias) > 1e-2


def test_load_rejects_missing_and_unexpected_weights(family, tmp_path):
    """Loading the saved checkpoint (per-expert names) fails loudly on a missing and on an unexpected tensor."""
    import glob

    from mistralrs.loader.safetensors_loader import iter_safetensors, load_model

    _, hf, _ = family
    hf.save_pretrained(str(tmp_path))
    state = dict(iter_safetensors(sorted(glob.glob(f"{tmp_path}/*.safetensors")), torch.float32))
    config_dict = hf.config.to_dict()
    for missing_name in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight",
                         "model.layers.1.mlp.gate.weight"):
        pairs = [(k, v) for k, v in state.items() if k != missing_name]
        with pytest.raises(ValueError, match=f"missing weights: {missing_name.replace('.', '[.]')}$"):
            load_model(config_dict, pairs, dtype=torch.float32, device="cpu")
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(64, 128)}  # V3's multi-token-prediction layer: dropped
    if hf.config.model_type == "deepseek_v3":
        assert hf.config.num_nextn_predict_layers == 1
        load_model(config_dict, dict(state, **mtp).items(), dtype=torch.float32, device="cpu")
    else:
        with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.3\.eh_proj"):
            load_model(config_dict, dict(state, **mtp).items(), dtype=torch.float32, device="cpu")
    extra = dict(state, **{"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.1\.mlp\.experts\.8\.up_proj"):
        load_model(config_dict, extra.items(), dtype=torch.float32, device="cpu")


def test_config_errors():
    base = dict(TINY, architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None)
    from mistralrs.models.config import TextModelConfig

    with pytest.raises(ValueError, match=r"'topk_method' is 'noaux_tc'; accepted values"):
        DeepseekV2ForCausalLM(TextModelConfig.from_hf_dict(dict(base, topk_method="noaux_tc")),
                              dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"'n_group' \(3\)"):
        DeepseekV2ForCausalLM(TextModelConfig.from_hf_dict(dict(base, topk_method="group_limited_greedy", n_group=3)),
                              dtype=torch.float32, device="cpu")


def test_registry_names():
    assert model_class_for(["DeepseekV2ForCausalLM"]) is DeepseekV2ForCausalLM
    assert model_class_for(["DeepseekV3ForCausalLM"]) is DeepseekV3ForCausalLM
    assert model_class_for(None, "DeepseekV2") is DeepseekV2ForCausalLM
    assert model_class_for(None, "DeepseekV3") is DeepseekV3ForCausalLM
