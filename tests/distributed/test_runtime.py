"""Tensor parallelism end to end on CPU processes (gloo, 2 ranks): the Runner with MISTRALRS_TP_SIZE=2 gives the
single-process tokens and logprobs, a killed rank ends the request with an error, a hung (stopped) rank ends it
within the collective timeout MISTRALRS_TP_TIMEOUT, and no rank outlives its Runner."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from mistralrs.engine.tensor_parallel import check_supported
from mistralrs.loader.default_model import default_model_path
from mistralrs.loader.spec import LoadKind, LoadSpec
from tests.adapters.adapter_fixtures import make_base_and_adapters, write_ordering
from tests.distributed.tp_helpers import is_alive, rank_children
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir

NO_SPECIAL = {i: -1e9 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))}
PROMPTS = ["Hello there, tiny model!", "The quick brown fox jumps over the lazy dog. " * 4, "0123456789"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model_dir(path, "llama")
    return path


def tiny_runner(path, **kwargs) -> Runner:
    return Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32), **kwargs)


def tp_runner(make, monkeypatch) -> Runner:
    """`make()` with MISTRALRS_TP_SIZE=2 (only while the runner starts: the ranks are fixed then)."""
    with monkeypatch.context() as patch:
        patch.setenv("MISTRALRS_TP_SIZE", "2")
        return make()


def chat(runner: Runner, prompt: str, max_tokens: int = 24, **kwargs):
    """Greedy chat reply with the chosen token's logprob and two alternatives per position."""
    return runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": prompt}], model="m", max_tokens=max_tokens, temperature=0.0,
        logprobs=True, top_logprobs=2, **kwargs)).choices[0]


def assert_same_choice(got, want) -> None:
    assert [e.token for e in got.logprobs.content] == [e.token for e in want.logprobs.content]
    assert [e.logprob for e in got.logprobs.content] == pytest.approx(
        [e.logprob for e in want.logprobs.content], abs=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in got.logprobs.content] == \
        [[t.token for t in e.top_logprobs] for e in want.logprobs.content]
    assert got.finish_reason == want.finish_reason


def replies_from_threads(runner: Runner, prompts: list[str]) -> dict[str, object]:
    """Every prompt sent at once from its own thread (batched into the same steps)."""
    replies = {}

    def send(prompt):
        replies[prompt] = chat(runner, prompt, logit_bias=NO_SPECIAL)

    threads = [threading.Thread(target=send, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def test_tiny_llama_tp2_equals_one_process(tiny_dir, monkeypatch):
    alone = tiny_runner(tiny_dir, prompt_chunksize=16)
    want = {p: chat(alone, p, logit_bias=NO_SPECIAL) for p in PROMPTS}
    alone.close()
    runner = tp_runner(lambda: tiny_runner(tiny_dir, prompt_chunksize=16), monkeypatch)
    pids = runner.llm_engine._tp.children.pids
    assert sorted(pids.values()) == sorted(rank_children()) and len(pids) == 1
    with pytest.raises(RuntimeError, match="runs a tensor-parallel model already"):   # one per process
        tp_runner(lambda: tiny_runner(tiny_dir), monkeypatch)
    assert sorted(pids.values()) == sorted(rank_children())
    for prompt in PROMPTS:   # alone, then all at once (several chunks per step, prompts in several chunks)
        assert_same_choice(chat(runner, prompt, logit_bias=NO_SPECIAL), want[prompt])
    for prompt, got in replies_from_threads(runner, PROMPTS).items():
        assert_same_choice(got, want[prompt])
    runner.close()
    assert rank_children() == [] and not any(is_alive(pid) for pid in pids.values())


def test_smollm2_gguf_tp2_equals_one_process(monkeypatch):
    path = default_model_path()

    def make():
        return Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                                 dtype=ModelDType.F32), show_progress=False)

    prompt = "What is the capital of France?"
    alone = make()
    want = chat(alone, prompt, max_tokens=6)
    alone.close()
    runner = tp_runner(make, monkeypatch)
    assert runner.llm_engine._loaded.model.kv_cache_spec().num_kv_heads == 2   # the head holds its shard: 2 of 3
    got = chat(runner, prompt, max_tokens=6)
    runner.close()
    assert_same_choice(got, want)
    assert "Paris" in "".join(e.token for e in got.logprobs.content)
    assert rank_children() == []


def test_killed_rank_ends_the_request_with_an_error_and_a_new_runner_works(tiny_dir, monkeypatch):
    runner = tp_runner(lambda: tiny_runner(tiny_dir), monkeypatch)
    (rank, pid), = runner.llm_engine._tp.children.pids.items()
    stream = runner.send_completion_request(CompletionRequest(
        prompt="ab", model="m", max_tokens=480, temperature=0.0, logit_bias=NO_SPECIAL, stream=True))
    next(stream)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ValueError, match=f"rank {rank} exited with code -9.*create a new one"):
        for _chunk in stream:
            pass
    with pytest.raises(ValueError, match="can no longer serve requests"):
        chat(runner, "abc")
    runner.close()
    assert rank_children() == []
    assert_a_new_runner_answers_as_one_process(tiny_dir, monkeypatch, PROMPTS[0])


def assert_a_new_runner_answers_as_one_process(tiny_dir, monkeypatch, prompt: str) -> None:
    """After a broken runtime was closed: a new tensor-parallel Runner gives the one-process reply, and no rank
    is left once both are closed."""
    again = tp_runner(lambda: tiny_runner(tiny_dir), monkeypatch)
    alone = tiny_runner(tiny_dir)
    assert_same_choice(chat(again, prompt, logit_bias=NO_SPECIAL), chat(alone, prompt, logit_bias=NO_SPECIAL))
    alone.close()
    again.close()
    assert rank_children() == []


def test_a_stopped_rank_ends_the_request_within_the_timeout_and_a_new_runner_works(tiny_dir, monkeypatch):
    timeout = 5
    with monkeypatch.context() as patch:
        patch.setenv("MISTRALRS_TP_TIMEOUT", str(timeout))
        runner = tp_runner(lambda: tiny_runner(tiny_dir), monkeypatch)
    assert runner.llm_engine._engine.model_runner.idle_interval == timeout / 4   # keep-alives within the bound
    (rank, pid), = runner.llm_engine._tp.children.pids.items()
    stream = runner.send_completion_request(CompletionRequest(
        prompt="ab", model="m", max_tokens=480, temperature=0.0, logit_bias=NO_SPECIAL, stream=True))
    next(stream)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with pytest.raises(ValueError, match=r"tensor parallelism: .*failed .*create a new one"):
            for _chunk in stream:
                pass
        waited = time.monotonic() - stopped
    finally:
        if is_alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert waited < 6 * timeout   # the set bound, not the default 60 s, with room for a loaded machine
    runner.close()
    assert rank_children() == [] and not is_alive(pid)
    assert_a_new_runner_answers_as_one_process(tiny_dir, monkeypatch, PROMPTS[2])


def test_unsupported_combinations_are_refused_before_any_rank_starts(tiny_dir, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("MISTRALRS_TP_SIZE", "2")
        with pytest.raises(ValueError, match="which_draft: speculative decoding is not supported with tensor"):
            tiny_runner(tiny_dir, which_draft=Which.Plain(model_id=str(tiny_dir), dtype=ModelDType.F32))
        with pytest.raises(ValueError, match="num_device_layers: a device map does not apply"):
            tiny_runner(tiny_dir, num_device_layers=["1"])
        with pytest.raises(ValueError, match="tensor parallelism .*: Which.DiffusionPlain models are not supported"):
            check_supported(LoadSpec(LoadKind.DIFFUSION, "Which.DiffusionPlain", "unused", arch="Flux"), False)
        check_supported(LoadSpec(LoadKind.VISION, "Which.VisionPlain", "unused"), False)   # vision runs sharded
        patch.setenv("MISTRALRS_TP_SIZE", "0")
        with pytest.raises(ValueError, match="MISTRALRS_TP_SIZE='0'; accepted values: an integer >= 1"):
            tiny_runner(tiny_dir)
    assert rank_children() == []


def test_a_load_error_is_the_single_process_error_and_stops_the_ranks(tmp_path, monkeypatch):
    with pytest.raises(Exception) as alone:
        tiny_runner(tmp_path / "missing")
    with pytest.raises(type(alone.value), match="missing"):
        tp_runner(lambda: tiny_runner(tmp_path / "missing"), monkeypatch)
    assert rank_children() == []


def test_lora_sets_per_request_and_activation_reach_every_rank(tmp_path, monkeypatch):
    """Per-request sets travel with each step, `activate_adapters` as a command every rank applies (the ranks count
    their failures: an unknown name fails everywhere and the runtime goes on)."""
    base, adapters = make_base_and_adapters(tmp_path, ["a1", "a2"])
    preload = [{"name": n, "adapter_model_id": str(adapters)} for n in ("a1", "a2")]
    order = write_ordering(tmp_path / "ordering.json", base, order=["a1"], preload_adapters=preload)

    def make():
        return Runner(Which.Lora(adapters_model_id=str(adapters), order=order, dtype=ModelDType.F32))

    def session(runner: Runner) -> list:
        replies = [chat(runner, PROMPTS[0], max_tokens=8, adapters=names, logit_bias=NO_SPECIAL)
                   for names in (["a1"], ["a2"], None)]
        with pytest.raises(ValueError, match="nope"):   # refused on every rank: they still agree
            runner.activate_adapters(["nope"])
        runner.activate_adapters(["a2"])   # the active set: what a request without `adapters` gets
        replies.append(chat(runner, PROMPTS[0], max_tokens=8, logit_bias=NO_SPECIAL))
        runner.close()
        return replies

    want = session(make())
    assert [e.token for e in want[0].logprobs.content] != [e.token for e in want[1].logprobs.content]
    for got, expected in zip(session(tp_runner(make, monkeypatch)), want):
        assert_same_choice(got, expected)
    assert rank_children() == []
