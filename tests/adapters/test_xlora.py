"""X-LoRA (REFERENCE §6.3) against peft's XLoraModel: same base, same experts, same classifier, same logits."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.adapters.adapter_fixtures import (
    assert_close, hf_base, make_base_and_adapters, packed_logits, peft_greedy, peft_logits, peft_xlora_model, scheduled,
    write_ordering, write_xlora_repo,
)
from tests.loading import load_which
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS

TOKENS = list(range(3, 60, 3))
OTHER = [7, 9, 44, 2, 5, 61, 30, 30, 12]
CASES = {  # name -> (adapters in training order, XLoraConfig arguments)
    "depth1": (["a1", "a2"], dict()),
    "layerwise_depth2": (["a1", "a2"], dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True,
                                            softmax_temperature=0.7, global_scaling_weight=1.5,
                                            scaling_pass_value=0.5)),
    "top_k": (["a1", "a2", "a3"], dict(top_k_lora=1, layerwise_scalings=True, softmax_temperature=2.0)),
}
BANNED = list(range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_base_and_adapters(tmp_path_factory.mktemp("xlora"), ["a1", "a2", "a3"])


def _setup(dirs, tmp_path, case: str, **overrides):
    base, adapters = dirs
    names, kwargs = CASES[case]
    oracle = peft_xlora_model(base, adapters, names, kwargs)
    base_id = overrides.pop("base_model_id", str(base))
    write_xlora_repo(tmp_path / "xlora", oracle, adapters, names, base_id, **overrides)
    order = write_ordering(tmp_path / "ordering.json", base, order=names)
    return oracle, Which.XLora(xlora_model_id=str(tmp_path / "xlora"), order=order, dtype=ModelDType.F32)


def _chunked_logits(loaded, runtime, tokens: list[int], splits: list[int]) -> torch.Tensor:
    """Logits of `tokens` computed in consecutive chunks through the paged KV cache (as the engine runs them)."""
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), 8, 8, loaded.dtype, loaded.device)
    rows, pos = [], 0
    for size in splits:
        batch = ForwardBatch.build([SeqChunk(tokens[pos:pos + size], pos, list(range(8)))], 8, kv, loaded.device)
        with torch.inference_mode():
            hidden = runtime.forward(loaded.model, batch, scheduled([0]), [None])
            rows.append(loaded.model.compute_logits(hidden).cpu())
        pos += size
    return torch.cat(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_peft_packed_and_chunked(dirs, tmp_path, case):
    oracle, which = _setup(dirs, tmp_path, case)
    loaded = load_which(which, show_progress=False)
    runtime = adapter_runtime_of(loaded.model)
    expected = [peft_logits(oracle, TOKENS), peft_logits(oracle, OTHER)]
    assert (expected[0] - peft_logits(hf_base(dirs[0]), TOKENS)).abs().max() > 1e-2   # the experts matter
    ours = packed_logits(loaded, [TOKENS, OTHER], lambda b: runtime.forward(loaded.model, b, scheduled([0, 1]),
                                                                            [None, None]))
    for got, want in zip(ours, expected):
        assert_close(got, want)
    # prefill then decode: the scaling pass keeps its own KV history and never touches the real pass's cache
    chunked = _chunked_logits(loaded, runtime, TOKENS, [7, 1, 1, 5, 1, 4])
    assert_close(chunked, expected[0])


def test_runner_greedy_matches_peft(dirs, tmp_path):
    oracle, which = _setup(dirs, tmp_path, "layerwise_depth2")
    runner = Runner(which, show_progress=False, pa_blk_size=8)
    try:
        prompt = "X-LoRA picks experts per token."
        prompt_ids = runner.llm_engine._inputs.completion_prompt_ids(prompt)
        expected = peft_greedy(oracle, prompt_ids, 6, BANNED)
        bias = {i: -100.0 for i in BANNED}
        for _ in range(2):   # the second run is served from the prefix cache
            response = runner.send_completion_request(CompletionRequest(
                prompt=prompt, model="x", max_tokens=6, temperature=0.0, logit_bias=bias))
            assert response.choices[0].text == runner.detokenize_text(expected, True)
        assert response.usage.cached_prompt_tokens > 0
        with pytest.raises(ValueError, match="X-LoRA"):
            runner.send_completion_request(CompletionRequest(prompt=prompt, model="x", max_tokens=2, adapters=["a1"]))
        with pytest.raises(ValueError, match="X-LoRA"):
            runner.activate_adapters(["a1"])
    finally:
        runner.close()


def test_non_granular_scalings_freeze(dirs, tmp_path):
    _, which = _setup(dirs, tmp_path, "depth1")
    loaded = load_which(dataclasses.replace(which, tgt_non_granular_index=2), show_progress=False)
    runtime = adapter_runtime_of(loaded.model)
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), 8, 8, loaded.dtype, loaded.device)
    weights, pos = [], 0
    for step, size in enumerate([6, 1, 1, 1, 1]):   # step i has i completion tokens (the prompt is 6 tokens)
        batch = ForwardBatch.build([SeqChunk(TOKENS[pos:pos + size], pos, list(range(8)))], 8, kv, loaded.device)
        runtime.forward(loaded.model, batch, scheduled([0], step), [None])
        weights.append(batch.adapter_weights[-1])
        pos += size
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[2], weights[4])
    runner = Runner(dataclasses.replace(which, tgt_non_granular_index=2), show_progress=False)
    try:
        assert runner.llm_engine._engine.scheduler.config.max_num_seqs == 1
        assert not runner.llm_engine._engine.scheduler.config.enable_prefix_caching
        assert runner.send_completion_request(CompletionRequest(prompt="abc", model="x", max_tokens=4)).choices
    finally:
        runner.close()


def test_bad_repos_name_the_offending_value(dirs, tmp_path):
    base = dirs[0]
    _, which = _setup(dirs, tmp_path, "depth1", base_model_id="someone/else")
    with pytest.raises(ValueError, match="base_model_id 'someone/else'"):
        load_which(which, show_progress=False)
    _, which = _setup(dirs, tmp_path, "depth1", enable_softmax_topk=True)
    with pytest.raises(ValueError, match="enable_softmax_topk"):
        load_which(which, show_progress=False)
    _, which = _setup(dirs, tmp_path, "depth1", hidden_size=32)
    with pytest.raises(ValueError, match="hidden_size 32"):
        load_which(which, show_progress=False)
    _, which = _setup(dirs, tmp_path, "depth1", layerwise_scalings=True)   # classifier has 2 outputs, not 2 x 12
    with pytest.raises(ValueError, match=r"'last.bias' has shape \(2,\), expected \(24,\)"):
        load_which(which, show_progress=False)
    _, which = _setup(dirs, tmp_path, "depth1")
    write_ordering(tmp_path / "ordering.json", base, order=["a2", "a3"])
    with pytest.raises(ValueError, match="does not name the adapters"):
        load_which(which, show_progress=False)
    write_ordering(tmp_path / "ordering.json", base, order=["a1", "a2"], layers={"model.layers.0.mlp.w9": 0})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.w9'"):
        load_which(which, show_progress=False)
    write_ordering(tmp_path / "ordering.json", base, order=["a1", "a2"],
                   layers={"model.layers.0.self_attn.q_proj": 0})
    with pytest.raises(ValueError, match="no index for adapter module"):
        load_which(which, show_progress=False)
    (tmp_path / "xlora" / "xlora_classifier.safetensors").unlink()
    write_ordering(tmp_path / "ordering.json", base, order=["a1", "a2"])
    with pytest.raises(ValueError, match="xlora_classifier.safetensors"):
        load_which(which, show_progress=False)


def test_config_defaults_follow_the_reference():
    from mistralrs.adapters.xlora import parse_xlora_config
    config = parse_xlora_config({"hidden_size": 64, "adapters": {"x": "path", "y": "path"}})
    assert config.adapters == ("x", "y")
    assert (config.layerwise_scalings, config.enable_relu_and_dropout, config.xlora_depth) == (False, False, 1)
    assert (config.xlora_dropout_p, config.enable_softmax, config.softmax_temperature) == (0.2, True, 1.0)
    assert (config.scaling_pass_value, config.use_bias, config.global_scaling_weight) == (0.0, True, 1.0)
    assert config.top_k_lora is None and config.enable_softmax_topk is False
    with pytest.raises(ValueError, match="top_k_lora"):
        parse_xlora_config({"hidden_size": 64, "adapters": ["x"], "top_k_lora": 2})


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_families_match_peft(tmp_path, arch):
    family = make_base_and_adapters(tmp_path / "dirs", ["a1", "a2"], arch)
    oracle, which = _setup(family, tmp_path, "layerwise_depth2")
    loaded = load_which(which, show_progress=False)
    runtime = adapter_runtime_of(loaded.model)
    got = packed_logits(loaded, [TOKENS], lambda b: runtime.forward(loaded.model, b, scheduled([0]), [None]))[0]
    assert_close(got, peft_logits(oracle, TOKENS))
