"""Llama / Mistral / Qwen2 over packed tokens and a paged KV cache against `transformers` (fp32, tiny random)."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
import transformers

from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from mistralrs.models.registry import model_class_for, model_class_for_gguf, register
from mistralrs.worker.forward_batch import allocate_kv_caches
from tests.models.family_harness import TinyRunner, check_reference_backend

ATOL = 1e-4
BLOCK_SIZE = 4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    # Llama with llama3 rope scaling (original context short enough that the scaling matters).
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Mistral: window 8 < prompt 20, linear rope scaling.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=8, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    # Qwen2: q/k/v bias, tied embeddings, window 6 on layer 1 only.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True)),
}
OUR_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise with larger weights than HF's 0.02 so attention is peaked and masking errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                std = 0.15 if param.dim() == 2 else 0.1
                param.copy_(std * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF reference model, our model loaded from the HF checkpoint on disk)."""
    name = request.param
    config_cls, model_cls, overrides = FAMILIES[name]
    torch.manual_seed(0)
    config = config_cls(**TINY, **overrides, attn_implementation="eager")
    hf = model_cls(config).eval()
    _sharpen(hf, seed=1)
    path = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    ours = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu")
    assert type(ours) is OUR_CLASSES[name]
    return name, hf, ours


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([token_ids])).logits[0].float()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_whole_prompt_one_chunk(family):
    _, hf, ours = family
    prompt = _prompt(1, 20)
    (logits,) = TinyRunner(ours).step([(0, prompt)])
    _assert_close(logits, _hf_logits(hf, prompt))


def test_chunked_prefill_then_decode(family):
    _, hf, ours = family
    prompt = _prompt(2, 23)
    runner = TinyRunner(ours, seed=3)
    parts = [runner.step([(0, prompt[a:b])])[0] for a, b in ((0, 7), (7, 12), (12, 19))]
    parts += [runner.step([(0, [t])])[0] for t in prompt[19:]]  # token-by-token decode
    _assert_close(torch.cat(parts), _hf_logits(hf, prompt))


def test_packed_sequences_and_mixed_steps(family):
    _, hf, ours = family
    prompts = [_prompt(10 + i, n) for i, n in enumerate((20, 7, 13))]
    runner = TinyRunner(ours, seed=4)
    # step 1: three sequences of different lengths packed; step 2: two decodes and a prefill chunk together.
    first = runner.step([(0, prompts[0][:16]), (1, prompts[1]), (2, prompts[2][:9])])
    second = runner.step([(1, [5]), (0, prompts[0][16:17]), (2, prompts[2][9:])])
    _assert_close(first[0], _hf_logits(hf, prompts[0][:16]))
    _assert_close(first[1], _hf_logits(hf, prompts[1]))
    _assert_close(first[2], _hf_logits(hf, prompts[2][:9]))
    _assert_close(second[0], _hf_logits(hf, prompts[1] + [5])[-1:])
    _assert_close(second[1], _hf_logits(hf, prompts[0][:17])[-1:])
    _assert_close(second[2], _hf_logits(hf, prompts[2])[9:])


def test_reference_backend_matches_sdpa(family):
    _, _, ours = family
    check_reference_backend(ours)


def test_greedy_decode_matches_generate(family):
    _, hf, ours = family
    prompts = [_prompt(40, 9), _prompt(41, 4)]
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None,
                                               pad_token_id=0)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        expected = [hf.generate(torch.tensor([p]), generation_config=gen_config)[0, len(p):].tolist()
                    for p in prompts]
    runner = TinyRunner(ours, seed=6)
    generated: list[list[int]] = [[], []]
    logits = runner.step([(i, p) for i, p in enumerate(prompts)])
    for _ in range(32):
        next_ids = [int(chunk[-1].argmax()) for chunk in logits]
        for out, token in zip(generated, next_ids):
            out.append(token)
        logits = runner.step([(i, [t]) for i, t in enumerate(next_ids)])  # both sequences decode together
    assert generated == expected


def test_load_rejects_missing_and_unexpected_weights(family):
    _, hf, _ = family
    config_dict = hf.config.to_dict()
    state = dict(hf.state_dict())
    ok = dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    load_model(config_dict, ok.items(), dtype=torch.float32, device="cpu")  # inv_freq ignored
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(config_dict, missing.items(), dtype=torch.float32, device="cpu")
    extra = dict(state, **{"model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.0\.extra\.weight"):
        load_model(config_dict, extra.items(), dtype=torch.float32, device="cpu")
    bad_shape = dict(state, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(config_dict, bad_shape.items(), dtype=torch.float32, device="cpu")


def test_bf16_weights_and_float32_logits(family):
    _, hf, _ = family
    model = load_model(hf.config.to_dict(), hf.state_dict().items(), dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    prompt = _prompt(50, 12)
    runner = TinyRunner(model)
    runner.kv_caches = allocate_kv_caches(model.kv_cache_spec(), 64, BLOCK_SIZE, torch.bfloat16, "cpu")
    (logits,) = runner.step([(0, prompt)])
    assert logits.dtype == torch.float32
    reference = _hf_logits(hf, prompt)
    hf_bf16_error = (_hf_logits(copy.deepcopy(hf).to(torch.bfloat16), prompt) - reference).abs().mean()
    assert (logits - reference).abs().mean() < 1.5 * hf_bf16_error  # bf16 rounding on par with transformers'


def test_registry_keys_and_errors():
    assert model_class_for(["LlamaForCausalLM"], None) is LlamaForCausalLM
    assert model_class_for(["Qwen2ForCausalLM"], None) is Qwen2ForCausalLM
    assert model_class_for(["LlamaForCausalLM"], "Mistral") is MistralForCausalLM  # forced arch wins
    assert model_class_for(None, "qwen2") is Qwen2ForCausalLM
    assert model_class_for(None, type("Enum", (), {"name": "Llama"})()) is LlamaForCausalLM
    assert model_class_for_gguf("llama") is LlamaForCausalLM
    assert model_class_for_gguf("qwen2") is Qwen2ForCausalLM
    with pytest.raises(ValueError, match=r"'BertModel' is not supported.*LlamaForCausalLM"):
        model_class_for(["BertModel"], None)
    with pytest.raises(ValueError, match="exactly one entry"):
        model_class_for(["LlamaForCausalLM", "MistralForCausalLM"], None)
    with pytest.raises(ValueError, match="exactly one entry"):
        model_class_for(None, None)
    with pytest.raises(ValueError, match=r"arch 'Bloom' is not supported.*Llama.*Mistral.*Qwen2"):
        model_class_for(["LlamaForCausalLM"], "Bloom")
    with pytest.raises(ValueError, match="Unsupported architecture.*'mpt'"):
        model_class_for_gguf("mpt")
    with pytest.raises(ValueError, match="already registered"):
        register(MistralForCausalLM, hf_architectures=("LlamaForCausalLM",))


def test_config_validation():
    base = dict(TINY, architectures=["LlamaForCausalLM"])
    config = TextModelConfig.from_hf_dict(base)
    assert (config.head_dim, config.num_key_value_heads, config.rope_scaling) == (16, 2, None)
    legacy = TextModelConfig.from_hf_dict(dict(base, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4}))
    assert (legacy.rope_theta, legacy.rope_type) == (500000.0, "linear")
    with pytest.raises(ValueError, match="hidden_size"):
        TextModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TextModelConfig.from_hf_dict(dict(base, num_key_value_heads=3))
    with pytest.raises(ValueError, match="rope_type='yarn2'.*llama3"):
        TextModelConfig.from_hf_dict(dict(base, rope_scaling={"rope_type": "yarn2", "factor": 2}))
    with pytest.raises(ValueError, match="hidden_act='swiglu9'"):
        TextModelConfig.from_hf_dict(dict(base, hidden_act="swiglu9"))
    with pytest.raises(ValueError, match="sliding_window"):
        TextModelConfig.from_hf_dict(dict(base, sliding_window=0))
