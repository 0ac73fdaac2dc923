"""Speculative decoding through the public API on tiny random models: the draft changes speed, never the output.

Greedy output with a draft equals the target alone token for token (a draft that is a perturbed copy of the target,
so drafts are both accepted and rejected, and an unrelated random draft); with sampling, the first generated tokens
over many seeded sequences are distributed as the target alone's (chi-square test of homogeneity); concurrent
requests, penalties, stop strings and max_tokens behave as without a draft; bad input is refused clearly.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import Counter

import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir
from tests.worker.test_speculative import critical_value

SPECIAL_IDS = list(range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS)))
NO_SPECIAL = {i: -1e9 for i in SPECIAL_IDS}
NUM_SAMPLED = 1200  # sequences sampled with and without the draft
PROMPTS = ["Hello there, tiny model!", "abc", "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Target (llama), a perturbed copy of it (drafts accepted often, not always), an unrelated qwen2 draft."""
    root = tmp_path_factory.mktemp("spec")
    target = make_tiny_model_dir(root / "target", "llama", seed=0)
    make_tiny_model_dir(root / "other", "qwen2", seed=1)
    shutil.copytree(root / "target", root / "near")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.5)
    target.save_pretrained(root / "near", safe_serialization=True)
    return root


def plain(path) -> Which:
    return Which.Plain(model_id=str(path), dtype=ModelDType.F32)


@pytest.fixture(scope="module")
def alone(models):
    runner = Runner(plain(models / "target"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def speculative(models):
    runner = Runner(plain(models / "target"), which_draft=plain(models / "near"), speculative_gamma=4)
    yield runner
    runner.close()


def complete(runner: Runner, prompt: str, max_tokens: int = 40, **kw):
    kw.setdefault("logit_bias", NO_SPECIAL)
    kw.setdefault("temperature", 0.0)
    return runner.send_completion_request(CompletionRequest(prompt=prompt, model="tiny", max_tokens=max_tokens,
                                                            **kw)).choices[0]


def test_greedy_output_equals_the_target_alone(alone, speculative):
    before = speculative.llm_engine.speculation_stats.num_proposed
    for prompt in PROMPTS:
        assert complete(speculative, prompt).text == complete(alone, prompt).text
    stats = speculative.llm_engine.speculation_stats
    assert stats.num_proposed > before
    assert 0 < stats.num_accepted < stats.num_proposed   # the perturbed draft is right often, not always


def test_an_unrelated_draft_changes_nothing_either(models, alone):
    runner = Runner(plain(models / "target"), which_draft=plain(models / "other"), speculative_gamma=3)
    try:
        for prompt in PROMPTS[:2]:
            assert complete(runner, prompt).text == complete(alone, prompt).text
    finally:
        runner.close()


def test_concurrent_speculative_requests_each_get_their_lone_result(alone, speculative):
    expected = {prompt: complete(alone, prompt, max_tokens=30).text for prompt in PROMPTS}
    results: dict[int, str] = {}

    def run(index: int) -> None:
        results[index] = complete(speculative, PROMPTS[index % len(PROMPTS)], max_tokens=30).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: results[i] for i in range(6)} == {i: expected[PROMPTS[i % len(PROMPTS)]] for i in range(6)}


def test_penalties_stop_strings_and_max_tokens_apply_to_every_accepted_token(alone, speculative):
    penalties = dict(presence_penalty=0.7, frequency_penalty=0.4)
    assert complete(speculative, PROMPTS[0], **penalties).text == complete(alone, PROMPTS[0], **penalties).text
    full = complete(alone, PROMPTS[1]).text
    stop = full[17:20]
    cut = complete(speculative, PROMPTS[1], stop_seqs=[stop])
    assert (cut.text, cut.finish_reason) == (full[:full.index(stop)], "stop")
    for max_tokens in (1, 2, 7):
        short = speculative.send_completion_request(CompletionRequest(
            prompt=PROMPTS[0], model="tiny", max_tokens=max_tokens, temperature=0.0, logit_bias=NO_SPECIAL))
        assert short.usage.completion_tokens == max_tokens and short.choices[0].finish_reason == "length"


def test_logprobs_are_the_targets(alone, speculative):
    def chat(runner: Runner):
        return runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": PROMPTS[0]}], model="tiny", max_tokens=12, temperature=0.0,
            logit_bias=NO_SPECIAL, logprobs=True, top_logprobs=2)).choices[0].logprobs.content

    with_draft, without = chat(speculative), chat(alone)
    assert [e.token for e in with_draft] == [e.token for e in without]
    assert [e.logprob for e in with_draft] == pytest.approx([e.logprob for e in without], abs=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in with_draft] == \
        [[t.token for t in e.top_logprobs] for e in without]


def first_tokens(runner: Runner, num_seqs: int) -> tuple[Counter, Counter]:
    """Counts of the first and second generated token over `num_seqs` seeded sequences of one request."""
    response = runner.send_completion_request(CompletionRequest(
        prompt="ab", model="tiny", max_tokens=3, temperature=1.0, top_k=8, n_choices=num_seqs, seed=11,
        logit_bias=NO_SPECIAL))
    ids = [runner.tokenize_text(choice.text, False) for choice in response.choices]
    return Counter(i[0] for i in ids), Counter(i[1] for i in ids)


def homogeneity(a: Counter, b: Counter) -> tuple[float, int]:
    """Chi-square statistic of two samples over the same categories, and its degrees of freedom."""
    keys = sorted(set(a) | set(b))
    total_a, total_b = sum(a.values()), sum(b.values())
    statistic = 0.0
    for key in keys:
        pooled = (a[key] + b[key]) / (total_a + total_b)
        for count, total in ((a[key], total_a), (b[key], total_b)):
            statistic += (count - pooled * total) ** 2 / (pooled * total)
    return statistic, len(keys) - 1


def test_sampled_tokens_are_distributed_as_the_target_alone(models, alone):
    """The first token comes from a step that drafts after the prompt, the second from one that drafted after
    an accepted or rejected token; both must match the target alone, which samples them with other draws. With
    this draft (about a quarter of the first drafts accepted), drawing from the target's own distribution instead
    of the residual after a rejection puts the first token's statistic near 95, three times the limit."""
    runner = Runner(plain(models / "target"), which_draft=plain(models / "near"), speculative_gamma=2,
                    max_seqs=128)
    try:
        spec_first, spec_second = first_tokens(runner, NUM_SAMPLED)
        stats = runner.llm_engine.speculation_stats
        assert 0.1 < stats.acceptance_rate < 0.9
    finally:
        runner.close()
    alone_first, alone_second = first_tokens(alone, NUM_SAMPLED)
    for ours, theirs in ((spec_first, alone_first), (spec_second, alone_second)):
        statistic, degrees = homogeneity(ours, theirs)
        assert degrees >= 3 and statistic < critical_value(degrees, 1e-4), (ours, theirs)


def test_bad_speculative_arguments_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="speculative_gamma"):
        Runner(plain(models / "target"), which_draft=plain(models / "near"), speculative_gamma=0)
    with pytest.raises(ValueError, match="no_kv_cache"):
        Runner(plain(models / "target"), which_draft=plain(models / "near"), no_kv_cache=True)
    with pytest.raises(TypeError, match="which_draft"):
        Runner(plain(models / "target"), which_draft="near")
    shutil.copytree(models / "near", tmp_path / "renumbered")
    tokenizer = json.loads((tmp_path / "renumbered" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "renumbered" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"draft model .*renumbered.* target model .*target"):
        Runner(plain(models / "target"), which_draft=plain(tmp_path / "renumbered"))


def test_a_grammar_constrained_request_decodes_without_drafts_beside_speculative_ones(alone, speculative):
    before = speculative.llm_engine.speculation_stats.num_verified
    constrained = complete(speculative, PROMPTS[0], max_tokens=12, grammar="[0-9]{3}-[a-z]{2}", grammar_type="regex")
    assert constrained.text == complete(alone, PROMPTS[0], max_tokens=12, grammar="[0-9]{3}-[a-z]{2}",
                                        grammar_type="regex").text
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", constrained.text)
    assert speculative.llm_engine.speculation_stats.num_verified == before
