"""Gemma, Gemma 2, Gemma 3, Phi-2, Phi-3 and Starcoder2 through the whole engine (`Runner`, `Which.Plain`).

Each tiny random model is saved by `transformers` with a character tokenizer; 32 greedy tokens must equal
`transformers`' greedy decoding alone, batched with other requests, with chunked prefill, and after a
prefix-cache hit. The architecture is detected from `config.json`, or forced through its `Architecture` name.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import transformers

from mistralrs import Architecture, CompletionRequest, ModelDType, Runner, Which
from tests.models import family_harness as harness
from tests.tiny_models import (
    CHARACTERS,
    CHATML,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    char_tokenizer,
)

NUM_TOKENS = 32
PROMPTS = ["Hello there, tiny model!", "abc", "The quick brown fox jumps over the lazy dog. " * 2]
SPECIAL_IDS = list(range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS)))
COMMON = dict(vocab_size=len(CHARACTERS) + len(SPECIAL_TOKENS), hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=EOS_TOKEN_ID, pad_token_id=0)
# name -> (config class, overrides, Architecture forced in Which.Plain or None to detect, norm weight center)
FAMILIES = {
    "gemma": (transformers.GemmaConfig, dict(head_dim=24), Architecture.Gemma, 0.0),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=24, sliding_window=6, attn_logit_softcapping=5.0,
                                               final_logit_softcapping=2.0, query_pre_attn_scalar=20), None, 0.0),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=24, num_hidden_layers=3, sliding_window=5,
                                                   sliding_window_pattern=2, rope_local_base_freq=100.0), None, 0.0),
    "phi2": (transformers.PhiConfig, dict(num_key_value_heads=4, partial_rotary_factor=0.5), Architecture.Phi2, 1.0),
    "phi3": (transformers.Phi3Config, dict(sliding_window=7, partial_rotary_factor=0.75), None, 1.0),
    "starcoder2": (transformers.Starcoder2Config, dict(sliding_window=6), Architecture.Starcoder2, 1.0),
}



pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(Runner over the saved model, HF reference model)."""
    config_cls, overrides, arch, norm_center = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_cls(**dict(COMMON, **overrides))).eval()
    embed_std = 0.15 / 8 if request.param.startswith("gemma") else 0.05  # Gemma scales its embedding by 8
    harness.sharpen(hf, seed=1, norm_center=norm_center, embed_std=embed_std)
    hf.save_pretrained(path)
    char_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "chat_template": CHATML}))
    return path, arch, hf


def _runner(tiny, **kw) -> Runner:
    path, arch, _ = tiny
    return Runner(Which.Plain(model_id=str(path), arch=arch, dtype=ModelDType.F32), **kw)


def _reference_greedy(hf, runner: Runner, prompt: str) -> list[int]:
    """`transformers` greedy decoding by whole-sequence forward passes (special tokens banned)."""
    ids = runner.tokenize_text(prompt, add_special_tokens=False)
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(NUM_TOKENS):
            logits = hf(torch.tensor([ids + generated])).logits[0, -1]
            logits[SPECIAL_IDS] = float("-inf")
            generated.append(int(logits.argmax()))
    return generated


def _greedy(runner: Runner, prompt: str) -> tuple[list[int], int]:
    """(generated token ids, cached prompt tokens) of one greedy completion with special tokens banned."""
    response = runner.send_completion_request(CompletionRequest(
        prompt=prompt, model="tiny", max_tokens=NUM_TOKENS, temperature=0.0,
        logit_bias={i: -1e9 for i in SPECIAL_IDS}))
    return runner.tokenize_text(response.choices[0].text, False), response.usage.cached_prompt_tokens


def test_greedy_alone_batched_chunked_and_prefix_cached(tiny):
    _, _, hf = tiny
    runner = _runner(tiny, prompt_chunksize=5, pa_blk_size=8)
    try:
        expected = {p: _reference_greedy(hf, runner, p) for p in PROMPTS}
        alone = {p: _greedy(runner, p)[0] for p in PROMPTS}
        batched: dict[str, list[int]] = {}

        def worker(p: str) -> None:
            batched[p] = _greedy(runner, p)[0]

        threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        again, cached = _greedy(runner, PROMPTS[2])  # its prompt blocks are in the prefix cache by now
    finally:
        runner.close()
    assert alone == expected
    assert batched == expected
    assert cached >= 8 and again == expected[PROMPTS[2]]
    assert len(set(expected[PROMPTS[0]])) > 1
