"""The whole engine through the public API on tiny random models, checked against `transformers`."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir

NUM_TOKENS = 32
PROMPTS = ["Hello there, tiny model!", "abc", "The quick brown fox jumps over the lazy dog. " * 3,
           "0123456789"]


# Special tokens are banned so that the random model generates exactly the requested number of visible tokens.
SPECIAL_IDS = list(range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS)))


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_model_dir(path, request.param)
    return path, hf_model


def reference_greedy(hf_model, runner: Runner, prompt: str, max_tokens: int = NUM_TOKENS) -> list[int]:
    """Greedy decoding by `transformers` forward passes over the whole sequence (special tokens banned)."""
    ids = runner.tokenize_text(prompt, add_special_tokens=False)
    generated = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf_model(torch.tensor([ids + generated])).logits[0, -1]
            logits[SPECIAL_IDS] = float("-inf")
            generated.append(int(logits.argmax()))
    return generated


def greedy(runner: Runner, prompt: str, max_tokens: int = NUM_TOKENS, **kw):
    return runner.send_completion_request(CompletionRequest(prompt=prompt, model="tiny", max_tokens=max_tokens,
                                                            temperature=0.0, **kw))


def no_eos(runner: Runner) -> dict[int, float]:
    return {i: -1e9 for i in SPECIAL_IDS}


def make_runner(path, **kw) -> Runner:
    return Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32), **kw)


def test_greedy_matches_transformers_alone_and_batched(tiny):
    path, hf_model = tiny
    runner = make_runner(path)
    bias = no_eos(runner)
    expected = {p: reference_greedy(hf_model, runner, p) for p in PROMPTS}
    alone = {}
    for p in PROMPTS:
        alone[p] = runner.tokenize_text(greedy(runner, p, logit_bias=bias).choices[0].text, False)
    # all prompts at once from several threads: batched in the same engine steps
    batched = {}

    def worker(p):
        batched[p] = runner.tokenize_text(greedy(runner, p, logit_bias=bias).choices[0].text, False)

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner.close()
    for p in PROMPTS:
        assert alone[p] == expected[p], p
        assert batched[p] == expected[p], p


@pytest.mark.parametrize("kw", [dict(prompt_chunksize=5), dict(no_kv_cache=True), dict(pa_ctxt_len=160, pa_blk_size=8),
                                dict(prefix_cache_n=0)])
def test_engine_modes_give_the_same_tokens(tiny, kw):
    """Chunked prefill, no KV cache, a KV cache small enough to force preemption, no prefix cache."""
    path, hf_model = tiny
    runner = make_runner(path, **kw)
    bias = no_eos(runner)
    prompts = PROMPTS[:3]
    expected = {p: reference_greedy(hf_model, runner, p, 16) for p in prompts}
    results = {}

    def worker(p):
        results[p] = runner.tokenize_text(greedy(runner, p, 16, logit_bias=bias).choices[0].text, False)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner.close()
    assert results == expected


def test_prefix_cache_hit_is_visible_in_usage(tiny):
    path, hf_model = tiny
    runner = make_runner(path, pa_blk_size=8)
    prompt = "A shared system prompt that is long enough to fill several blocks. " * 2
    first = greedy(runner, prompt + "First question?", 8)
    second = greedy(runner, prompt + "Second question?", 8)
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens >= 64
    again = greedy(runner, prompt + "First question?", 8)
    assert again.choices[0].text == first.choices[0].text
    runner.close()


def test_streaming_equals_whole_response_and_cancel(tiny):
    path, _ = tiny
    runner = make_runner(path)
    bias = no_eos(runner)
    messages = [{"role": "user", "content": "Say something"}]
    whole = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="tiny", max_tokens=20, temperature=0.0, logit_bias=bias))
    chunks = list(runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="tiny", max_tokens=20, temperature=0.0, logit_bias=bias, stream=True)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="tiny", max_tokens=400, temperature=0.0, logit_bias=bias, stream=True))
    next(stream)
    stream.close()    # cancels the request within one engine step and frees its blocks
    deadline = time.monotonic() + 10
    while runner.llm_engine._engine.scheduler.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not runner.llm_engine._engine.scheduler.has_unfinished()
    manager = runner.llm_engine._engine.scheduler.kv_cache_manager
    assert manager.num_free_blocks == runner.llm_engine._engine.scheduler.config.num_blocks
    again = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="tiny", max_tokens=20, temperature=0.0, logit_bias=bias))
    assert again.choices[0].message.content == whole.choices[0].message.content
    runner.close()


def test_sampling_seed_n_choices_best_of_and_stop(tiny):
    path, _ = tiny
    runner = make_runner(path)

    def sample(seed, n=1, **kw):
        return runner.send_completion_request(CompletionRequest(
            prompt="Once", model="tiny", max_tokens=12, temperature=1.0, n_choices=n, seed=seed, **kw))

    a, b, c = sample(7), sample(7), sample(8, n=3)
    assert a.choices[0].text == b.choices[0].text
    assert len(c.choices) == 3 and [ch.index for ch in c.choices] == [0, 1, 2]
    best = sample(3, n=1, best_of=3)
    assert len(best.choices) == 1
    full = greedy(runner, "Stop test", 24, logit_bias=no_eos(runner)).choices[0].text
    stop = full[5:8]
    cut = greedy(runner, "Stop test", 24, logit_bias=no_eos(runner), stop_seqs=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(runner.send_completion_request(CompletionRequest(
        prompt="Stop test", model="tiny", max_tokens=24, temperature=0.0, logit_bias=no_eos(runner),
        stop_seqs=[stop], stream=True)))
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == full[:full.index(stop)]  # no partial stop
    echo = greedy(runner, "Echo", 4, echo_prompt=True, suffix="<END>")
    assert echo.choices[0].text.startswith("Echo") and echo.choices[0].text.endswith("<END>")
    runner.close()


def test_best_of_keeps_the_sequence_of_highest_summed_logprob(tiny):
    # best_of=4 generates the 4 sequences that n=4 does (same seed): it must keep the one whose chosen tokens'
    # logprobs (reported when n=4 asks for them) sum highest, so the sampler computes them for a ranked request
    path, _ = tiny
    runner = make_runner(path)
    engine = runner.llm_engine

    def complete(n, best_of, logprobs):
        request = CompletionRequest(prompt="Once", model="tiny", max_tokens=10, temperature=1.5, n_choices=n,
                                    best_of=best_of, seed=5, logit_bias=no_eos(runner))
        return engine.wait(engine.submit_completion(request, logprobs=logprobs))

    every = complete(4, 1, 0).choices
    sums = [sum(entry.logprob for entry in choice.logprobs.content) for choice in every]
    assert len({choice.text for choice in every}) > 1
    assert complete(1, 4, None).choices[0].text == every[sums.index(max(sums))].text
    runner.close()


def test_bad_requests_fail_alone(tiny):
    path, _ = tiny
    runner = make_runner(path)
    with pytest.raises(ValueError, match="empty prompt"):
        greedy(runner, "", 4)
    with pytest.raises(ValueError, match="Prompt sequence length"):
        greedy(runner, "x" * 600, 4)
    with pytest.raises(ValueError, match="logit_bias"):
        greedy(runner, "ok", 4, logit_bias={10_000: 1.0})
    huge_seed = runner.send_completion_request(CompletionRequest(prompt="ok", model="t", max_tokens=2, seed=2**70))
    assert huge_seed.usage.completion_tokens >= 1
    assert greedy(runner, "still serving", 4).usage.completion_tokens >= 1
    runner.close()
