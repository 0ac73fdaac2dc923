"""A request whose input makes a step fail fails alone: the requests batched with it complete as if alone."""

from __future__ import annotations

import threading

import pytest

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs.engine.output_processor import SeqOutputState
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

POISON = "~"   # a prompt holding this character makes the model raise
NO_SPECIAL = {i: -1e9 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model_dir(path, "llama")
    runner = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32), show_progress=False)
    yield runner
    runner.close()


def request(prompt: str, n: int = 1, max_tokens: int = 12) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, model="t", max_tokens=max_tokens, temperature=0.0, n_choices=n,
                             logit_bias=NO_SPECIAL)


class PoisonedModel:
    """A forward pre-hook on the model: raises for a batch holding the poison token; while `hold` is set, the
    first forward waits until released (so that requests submitted meanwhile enter the engine's next step
    together)."""

    def __init__(self, runner: Runner) -> None:
        self.poison_id = runner.tokenize_text(POISON, False)[0]
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[bool] = []   # per forward: whether it held the poison
        self.handle = runner.llm_engine._loaded.model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.entered.set()
        self.release.wait(timeout=60)
        poisoned = bool((args[0] == self.poison_id).any())
        self.batches.append(poisoned)
        if poisoned:
            raise RuntimeError("poisoned batch")


@pytest.mark.parametrize("n", [1, 2])
def test_only_the_request_that_makes_the_step_fail_fails(runner, n):
    alone = [c.text for c in runner.send_completion_request(request("Hello there", n=n)).choices]
    hook = PoisonedModel(runner)
    try:
        blocker = runner.submit_completion(request("wait", max_tokens=1))
        assert hook.entered.wait(timeout=60)   # the engine is inside a step: the next two enter the next step
        good = runner.submit_completion(request("Hello there", n=n))
        bad = runner.submit_completion(request(f"Hello {POISON} there", n=n))
        hook.release.set()
        runner.llm_engine.wait(blocker)
        with pytest.raises(ValueError, match="poisoned batch"):
            runner.llm_engine.wait(bad)
        assert [c.text for c in runner.llm_engine.wait(good).choices] == alone
    finally:
        hook.handle.remove()
    assert hook.batches.count(True) == 2 and hook.batches[1]   # the shared step failed, then the bad one alone
    assert [c.text for c in runner.send_completion_request(request("Hello there", n=n)).choices] == alone
    scheduler = runner.llm_engine._engine.scheduler
    assert not scheduler.has_unfinished()
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.config.num_blocks


def test_a_request_sharing_prefix_blocks_with_the_failed_one_is_recomputed(runner, monkeypatch):
    shared = "A long shared prefix of several blocks of tokens, " * 2
    alone = runner.send_completion_request(request(shared + "then good.")).choices[0].text
    scheduler = runner.llm_engine._engine.scheduler
    scheduler.reset_prefix_cache()   # the shared prefix is computed in the failing step, not before
    recomputed = []
    recompute = scheduler.recompute_sequence
    monkeypatch.setattr(scheduler, "recompute_sequence", lambda seq_id: (recomputed.append(seq_id),
                                                                         recompute(seq_id)))
    hook = PoisonedModel(runner)
    try:
        blocker = runner.submit_completion(request("wait", max_tokens=1))
        assert hook.entered.wait(timeout=60)
        bad = runner.submit_completion(request(shared + POISON))
        good = runner.submit_completion(request(shared + "then good."))   # shares bad's blocks of that step
        hook.release.set()
        runner.llm_engine.wait(blocker)
        with pytest.raises(ValueError, match="poisoned batch"):
            runner.llm_engine.wait(bad)
        assert runner.llm_engine.wait(good).choices[0].text == alone
    finally:
        hook.handle.remove()
    assert len(recomputed) == 1
    assert not scheduler.has_unfinished()
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.config.num_blocks


def test_a_step_of_one_request_fails_that_request(runner):
    hook = PoisonedModel(runner)
    hook.release.set()
    try:
        with pytest.raises(ValueError, match="poisoned batch"):
            runner.send_completion_request(request(f"only {POISON}"))
    finally:
        hook.handle.remove()
    assert runner.send_completion_request(request("still serving", max_tokens=2)).usage.completion_tokens == 2


def test_a_request_whose_output_cannot_be_processed_fails_alone(runner, monkeypatch):
    alone = runner.send_completion_request(request("Hello there")).choices[0].text
    hook = PoisonedModel(runner)
    hook.poison_id = -1   # the model never raises: turning the poisoned request's token into text does
    poison_id = runner.tokenize_text(POISON, False)[0]
    process = SeqOutputState.process

    def failing_process(self, sampled):
        if poison_id in self.detokenizer._ids:   # the prompt's last tokens give the detokenizer its context
            raise RuntimeError("cannot detokenize")
        return process(self, sampled)

    monkeypatch.setattr(SeqOutputState, "process", failing_process)
    try:
        blocker = runner.submit_completion(request("wait", max_tokens=1))
        assert hook.entered.wait(timeout=60)
        good = runner.submit_completion(request("Hello there"))
        bad = runner.submit_completion(request(f"Hello {POISON}", n=2))
        hook.release.set()
        runner.llm_engine.wait(blocker)
        with pytest.raises(ValueError, match="cannot detokenize"):
            runner.llm_engine.wait(bad)
        assert runner.llm_engine.wait(good).choices[0].text == alone
    finally:
        hook.handle.remove()
    scheduler = runner.llm_engine._engine.scheduler
    assert not scheduler.has_unfinished()
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.config.num_blocks
