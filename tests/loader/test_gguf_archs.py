"""Every GGUF architecture: a tiny random transformers model, written in llama.cpp's layout by a converter that
follows convert_hf_to_gguf.py with gguf-py's own tensor names (tests/loader/gguf_fixtures.py), loads through the
GGUF loader and gives the logits of its safetensors twin (the same weights loaded from the HF checkpoint, which
tests/models checks against transformers). F32 files match to float rounding; Q8_0 files within the
quantization error."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers

from mistralrs.layers.moe import FusedMoE
from mistralrs.loader.gguf_loader import GGUF_ARCHITECTURES, open_gguf
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.models.registry import model_class_for_gguf, supported_gguf_architectures
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.gguf_moe import GGUFModelQuantConfig, GGUFMoEMethod
from mistralrs.quant.packed import DenseWeight
from tests.loader.gguf_fixtures import converted_tensors, write_converted_gguf
from tests.models import family_harness as harness

V = harness.VOCAB_SIZE
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
                 short_factor=[1.0 + 0.2 * i for i in range(8)], long_factor=[1.5 + 1.5 * i for i in range(8)])
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=0.707,
             mscale_all_dim=0.707, beta_fast=32, beta_slow=1)
_DEEPSEEK = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
                 rope_parameters=_YARN, q_lora_rank=24, attn_implementation="eager")
_COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, attn_implementation="eager")

# name → (config class, model class, config overrides, converter options, norm center for `sharpen`)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_COMMON, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2, rope_theta=1e6), {}, 1.0),
    "mixtral_per_expert_names": ("MixtralConfig", "MixtralForCausalLM",
                                 dict(_COMMON, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2), {"per_expert_names": True}, 1.0),
    "phi2": ("PhiConfig", "PhiForCausalLM", dict(_COMMON, intermediate_size=256, partial_rotary_factor=0.5), {}, 1.0),
    "phi2_fused_qkv": ("PhiConfig", "PhiForCausalLM", dict(_COMMON, intermediate_size=256, partial_rotary_factor=0.5),
                       {"fuse_qkv": True}, 1.0),
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM",
                      dict(_COMMON, intermediate_size=128, num_key_value_heads=2, original_max_position_embeddings=16,
                           rope_parameters=_LONGROPE, pad_token_id=2), {}, 1.0),
    "phi3_sliding": ("Phi3Config", "Phi3ForCausalLM",
                     dict(_COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=8, pad_token_id=2),
                     {}, 1.0),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(_COMMON, intermediate_size=128, num_key_value_heads=2, rope_theta=5000.0), {}, 1.0),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=24), {}, 0.0),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_COMMON, intermediate_size=96, num_hidden_layers=3, num_key_value_heads=2, head_dim=24,
                    sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=0.5,
                    query_pre_attn_scalar=24), {}, 0.0),
    "deepseek_v2_kv_b": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                         dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
                         {"split_kv_b": False}, 1.0),
    "deepseek_v3_k_b_v_b": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                            dict(_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True), {}, 1.0),
}
PROMPT = harness.prompt(3, 20)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _sharpen_routers(hf) -> None:
    """Peaked routing (a wrong expert choice shows in the logits); a random V3 correction bias."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.mul_(3.0)
            elif name.endswith("e_score_correction_bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))


def _checkpoint(name: str, path) -> tuple[dict, dict]:
    """A tiny random transformers model of case `name`, saved under `path` as an HF checkpoint:
    (config.json dict, tensors as saved)."""
    config_name, model_name, overrides, _, norm_center = CASES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(getattr(transformers, config_name)(**overrides)).eval()
    harness.sharpen(hf, seed=1, norm_center=norm_center, embed_std=0.15 if norm_center else 0.02)
    _sharpen_routers(hf)
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return config, dict(iter_safetensors(sorted(glob.glob(os.path.join(path, "*.safetensors"))), None))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, config.json dict, checkpoint tensors, safetensors twin, twin logits)."""
    name = request.param
    config, checkpoint = _checkpoint(name, str(tmp_path_factory.mktemp(name)))
    twin = load_model(config, checkpoint.items(), dtype=torch.float32, device="cpu")
    (logits,) = harness.TinyRunner(twin).step([(0, PROMPT)])
    return name, config, checkpoint, twin, logits


def _load_gguf(path: str, dtype: torch.dtype = torch.float32, use_fast_kernels: bool = False,
               keep_quantized: bool = True):
    gguf = open_gguf(path)
    quant_config = GGUFModelQuantConfig(use_fast_kernels=use_fast_kernels) if keep_quantized else None
    model = load_model(gguf.config, gguf.iter_weights(dtype, keep_quantized=keep_quantized), dtype=dtype,
                       device="cpu", quant_config=quant_config)
    return gguf, model


def _q8_0_round_trip(checkpoint: dict) -> dict:
    """The checkpoint as a Q8_0 GGUF stores it: every matrix whose rows are whole 32-wide blocks quantized and
    dequantized with gguf-py's reference code (llama.cpp keeps routers and 1-D tensors F32). Merging experts,
    fusing q/k/v and permuting rows move whole rows, so the blocks are the same in either layout."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    out = {}
    for name, tensor in checkpoint.items():
        values = tensor.float().numpy()
        if values.ndim >= 2 and values.shape[-1] % 32 == 0 and not name.endswith(".gate.weight"):
            blocks = quantize(values, GGMLQuantizationType.Q8_0)
            values = dequantize(blocks, GGMLQuantizationType.Q8_0).reshape(values.shape)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out


@pytest.mark.parametrize("ggml_type", ["F32", "Q8_0"])
def test_gguf_matches_safetensors_twin(case, ggml_type, tmp_path):
    """F32: the twin itself. Q8_0: the twin loaded from the checkpoint's Q8_0 round trip (the file's values),
    so that any loader error, not quantization noise, is what shows."""
    name, config, checkpoint, twin, expected = case
    path = write_converted_gguf(checkpoint, config, tmp_path / f"{name}.gguf", ggml_type, **CASES[name][3])
    gguf, model = _load_gguf(path)
    assert type(model) is type(twin)
    assert any(t == ggml_type for t in gguf.tensor_types.values())
    if ggml_type == "Q8_0":
        rounded = load_model(config, _q8_0_round_trip(checkpoint).items(), dtype=torch.float32, device="cpu")
        (expected,) = harness.TinyRunner(rounded).step([(0, PROMPT)])
    (logits,) = harness.TinyRunner(model).step([(0, PROMPT)])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def _close(got, want) -> bool:
    """Equal, numbers (and lists of numbers) within float32 rounding."""
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want))
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-6)
    return got == want


def test_config_matches_the_checkpoint(case, tmp_path):
    """The config rebuilt from the metadata agrees with the HF config on every field the model reads."""
    name, config, checkpoint, twin, _ = case
    path = write_converted_gguf(checkpoint, config, tmp_path / f"{name}.gguf", **CASES[name][3])
    _, model = _load_gguf(path)
    assert model.config.num_hidden_layers == twin.config.num_hidden_layers
    assert model.config.hidden_size == twin.config.hidden_size
    assert model.config.tie_word_embeddings == twin.config.tie_word_embeddings
    if hasattr(twin, "dims"):  # DeepSeek: every dimension and routing field (llama.cpp drops V3's MTP layers)
        assert model.dims == dataclasses.replace(twin.dims, num_nextn_predict_layers=0)
    for key in ("rope_scaling", "sliding_window", "rms_norm_eps", "rope_theta", "partial_rotary_factor"):
        want, got = getattr(twin.config, key), getattr(model.config, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), key
        elif isinstance(want, dict):
            shared = sorted(set(want) & set(got))
            assert shared and all(_close(got[k], want[k]) for k in shared), (key, got, want)
        else:
            assert got == want, key


def test_moe_experts_stay_quantized_per_expert(tmp_path):
    """Mixtral Q8_0: every expert weight reaches the GGUF MoE method as its own block rows, no dense copy
    of the stacked tensor; the fast bfloat16 kernels agree with the plain path."""
    config, checkpoint = _checkpoint("mixtral", str(tmp_path))
    path = write_converted_gguf(checkpoint, config, tmp_path / "moe.gguf", "Q8_0")
    gguf = open_gguf(path)
    experts = [(n, w) for n, w in gguf.iter_weights(torch.float32, keep_quantized=True) if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and all(isinstance(w, GGMLTensor) and w.shape == (64, 64) for _, w in experts)
    assert sorted(gguf.tensor_types)[:1] and gguf.tensor_types["model.layers.1.block_sparse_moe.experts.3.w2.weight"] \
        == "Q8_0"
    _, plain = _load_gguf(path, torch.bfloat16, use_fast_kernels=False)
    _, fast = _load_gguf(path, torch.bfloat16, use_fast_kernels=True)
    methods = [m.quant_method for m in fast.modules() if isinstance(m, FusedMoE)]
    assert len(methods) == 2 and all(isinstance(m, GGUFMoEMethod) for m in methods)
    assert type(methods[0].w2[0]).__name__ != "DenseWeight"  # the int4 kernel form
    (want,) = harness.TinyRunner(plain, dtype=torch.bfloat16).step([(0, PROMPT)])
    (got,) = harness.TinyRunner(fast, dtype=torch.bfloat16).step([(0, PROMPT)])
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_moe_reference_backend_agrees_with_grouped(tmp_path):
    config, checkpoint = _checkpoint("mixtral", str(tmp_path))
    _, model = _load_gguf(write_converted_gguf(checkpoint, config, tmp_path / "moe.gguf", "Q8_0"))
    (grouped,) = harness.TinyRunner(model).step([(0, PROMPT)])
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.set_backend("reference")
    (reference,) = harness.TinyRunner(model).step([(0, PROMPT)])
    torch.testing.assert_close(reference, grouped, atol=1e-4, rtol=0)


def test_converter_writes_llama_cpp_layout(tmp_path):
    """The fixture itself: merged experts are [E, out, in], DeepSeek's k_b is transposed, names are gguf-py's."""
    config, checkpoint = _checkpoint("deepseek_v3_k_b_v_b", str(tmp_path))
    arch, tensors = converted_tensors(checkpoint, config)
    shapes = {name: values.shape for name, values in tensors}
    assert arch == "deepseek2"
    assert shapes["blk.1.ffn_gate_exps.weight"] == (8, 32, 64) and shapes["blk.1.ffn_down_exps.weight"] == (8, 64, 32)
    assert shapes["blk.0.attn_k_b.weight"] == (4, 16, 8) and shapes["blk.0.attn_v_b.weight"] == (4, 12, 16)
    assert "blk.1.exp_probs_b.bias" in shapes and "blk.0.attn_kv_b.weight" not in shapes


def test_phi3_kept_quantized(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused in the file: they arrive whole and stay quantized."""
    config, checkpoint = _checkpoint("phi3_sliding", str(tmp_path))
    _, model = _load_gguf(write_converted_gguf(checkpoint, config, tmp_path / "phi3.gguf", "Q8_0"),
                          use_fast_kernels=True)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
        assert linear.quant_method.weights and not any(isinstance(w, DenseWeight) for w in linear.quant_method.weights)


def test_every_gguf_architecture_has_a_model_class():
    assert sorted(GGUF_ARCHITECTURES) == supported_gguf_architectures()
    expected = {"phi2": "PhiForCausalLM", "phi3": "Phi3ForCausalLM", "starcoder2": "Starcoder2ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "deepseek2": "DeepseekV2ForCausalLM"}
    for name, class_name in expected.items():
        assert model_class_for_gguf(name).__name__ == class_name


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="Unsupported architecture.*falcon") as err:
        open_gguf(str(tmp_path / "falcon.gguf"))
    assert all(name in str(err.value) for name in ("deepseek2", "gemma2", "phi2", "phi3", "starcoder2", "llama"))


def test_missing_merge_part_is_an_error(tmp_path):
    config, checkpoint = _checkpoint("deepseek_v3_k_b_v_b", str(tmp_path))
    path = write_converted_gguf(checkpoint, config, tmp_path / "full.gguf")
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(path)
    writer = GGUFWriter(tmp_path / "cut.gguf", "deepseek2")
    for field_ in reader.fields.values():
        if field_.name.startswith("deepseek2."):
            writer.add_key_value(field_.name, field_.contents(), field_.types[0],
                                 sub_type=field_.types[-1] if len(field_.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name != "blk.0.attn_v_b.weight":
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist()))))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_k_b\.weight.*2 parts"):
        open_gguf(str(tmp_path / "cut.gguf"))
