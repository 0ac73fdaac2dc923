"""Per-request LoRA adapter sets, isolated inside one batch (beyond the reference, where batching requests with
different sets is not isolated), checked against peft per set; the prefix cache is keyed by the set."""

from __future__ import annotations

import threading

import peft
import pytest

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs.adapters.runtime import adapter_runtime_of
from tests.adapters.adapter_fixtures import (
    assert_close, make_base_and_adapters, packed_logits, peft_greedy, peft_logits, peft_lora_model, write_ordering,
)
from tests.loading import load_which
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS

BANNED = list(range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS)))
SETS = [(), ("a1",), ("a2",), ("a1", "a2")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_request")
    base, adapters = make_base_and_adapters(root, ["a1", "a2"])
    preload = [{"name": n, "adapter_model_id": str(adapters)} for n in ("a1", "a2")]
    order = write_ordering(root / "ordering.json", base, order=["a1"], preload_adapters=preload)
    return base, adapters, Which.Lora(adapters_model_id=str(adapters), order=order, dtype=ModelDType.F32)


def test_packed_batch_gives_each_sequence_its_own_adapters(dirs):
    base, adapters, which = dirs
    loaded = load_which(which, show_progress=False)
    runtime = adapter_runtime_of(loaded.model)
    chunks = [list(range(3, 40, 3)), list(range(5, 30, 2)), list(range(60, 20, -3)), list(range(9, 21))]
    ours = packed_logits(loaded, chunks, lambda b: runtime.forward(loaded.model, b, [None] * 4, SETS))
    for tokens, names, got in zip(chunks, SETS, ours):
        want = peft_logits(peft_lora_model(base, adapters, list(names)), tokens)
        assert_close(got, want)
    assert (ours[0] - ours[1]).abs().max() > 0   # sanity: the sets differ


def _request(prompt: str, adapters) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, model="x", max_tokens=5, temperature=0.0, adapters=adapters,
                             logit_bias={i: -100.0 for i in BANNED})


def test_runner_batches_mixed_sets_like_each_alone(dirs):
    base, adapters, which = dirs
    runner = Runner(which, show_progress=False, pa_blk_size=8)
    try:
        prompt = "Adapters per request, isolated."
        prompt_ids = runner.llm_engine._inputs.completion_prompt_ids(prompt)
        # None: the Runner's active set (order = ["a1"]); the last two repeat a set and hit the prefix cache
        sets = [None, [], ["a2"], ["a1", "a2"], ["a2"], ["a1"]]
        expected = {}
        for names in sets:
            key = tuple(["a1"] if names is None else names)
            if key not in expected:
                model = peft_lora_model(base, adapters, list(key))
                expected[key] = runner.detokenize_text(peft_greedy(model, prompt_ids, 5, BANNED), True)
        results: dict[int, object] = {}
        barrier = threading.Barrier(len(sets))

        def send(i: int) -> None:
            barrier.wait()
            results[i] = runner.send_completion_request(_request(prompt, sets[i]))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sets))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, names in enumerate(sets):
            assert results[i].choices[0].text == expected[tuple(["a1"] if names is None else names)], names
        assert len(set(expected.values())) == 4   # the four sets really generate differently
        alone = runner.send_completion_request(_request(prompt, ["a2"]))
        assert alone.choices[0].text == expected[("a2",)] and alone.usage.cached_prompt_tokens > 0
        runner.activate_adapters(["a2"])   # requests without adapters now use a2
        assert runner.send_completion_request(_request(prompt, None)).choices[0].text == expected[("a2",)]
    finally:
        runner.close()


def test_unknown_adapter_names_it_and_the_loaded_ones(dirs, tmp_path):
    base, adapters, which = dirs
    runner = Runner(which, show_progress=False)
    try:
        with pytest.raises(ValueError, match=r"'nope'.*\['a1', 'a2'\]"):
            runner.send_completion_request(_request("hi", ["a1", "nope"]))
        with pytest.raises(ValueError, match=r"'nope'.*\['a1', 'a2'\]"):
            runner.activate_adapters(["nope"])
        assert runner.send_completion_request(_request("hi", ["a2"])).choices   # the engine is unharmed
    finally:
        runner.close()
    merged = Runner(Which.Lora(adapters_model_id=str(adapters), dtype=ModelDType.F32,
                               order=write_ordering(tmp_path / "o.json", base, order=["a1"])), show_progress=False)
    try:
        with pytest.raises(ValueError, match="no switchable LoRA adapters"):
            merged.send_completion_request(_request("hi", ["a1"]))
        assert merged.send_completion_request(_request("hi", [])).choices   # an empty list asks for nothing
    finally:
        merged.close()
