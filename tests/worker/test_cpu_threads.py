"""The CPU thread chooser: under the "auto" policy, large steps on every thread, small (decode) steps on whichever
setting its timed trial found faster; under "fixed", nothing."""

from __future__ import annotations

import time

import pytest
import torch

from mistralrs.worker.cpu_threads import SMALL_STEP_TOKENS, TRIAL_STEPS, WARMUP_STEPS, CpuThreadChooser


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run_trial(chooser: CpuThreadChooser, seconds_on: dict[int, float]) -> list[int]:
    """Small steps until the choice is made; each step's body takes `seconds_on[threads in use]`."""
    seen = []
    for _ in range(WARMUP_STEPS + TRIAL_STEPS):
        with chooser.step(1):
            seen.append(torch.get_num_threads())
            time.sleep(seconds_on[torch.get_num_threads()])
    return seen


@pytest.mark.parametrize("faster", [1, 2])
def test_small_steps_keep_the_faster_setting(faster):
    chooser = CpuThreadChooser(torch.device("cpu"), "auto", max_threads=2)
    seen = _run_trial(chooser, {faster: 0.001, 3 - faster: 0.004})
    assert seen[:WARMUP_STEPS] == [2] * WARMUP_STEPS and sorted(set(seen)) == [1, 2]
    assert chooser.small_step_threads == faster
    with chooser.step(1):
        assert torch.get_num_threads() == faster
    with chooser.step(SMALL_STEP_TOKENS):   # large steps always use every thread
        assert torch.get_num_threads() == 2


def test_disabled_off_the_cpu_and_with_one_thread():
    for chooser in (CpuThreadChooser(torch.device("cuda"), "auto", max_threads=2),
                    CpuThreadChooser(torch.device("cpu"), "auto", max_threads=1)):
        torch.set_num_threads(1)
        with chooser.step(1):
            assert torch.get_num_threads() == 1
        assert not chooser.enabled and chooser.small_step_threads == chooser.max_threads


def test_the_fixed_policy_never_touches_the_thread_count(monkeypatch):
    chooser = CpuThreadChooser(torch.device("cpu"), "fixed", max_threads=2)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    for num_tokens in [1] * (WARMUP_STEPS + TRIAL_STEPS) + [SMALL_STEP_TOKENS]:
        with chooser.step(num_tokens):
            pass
    assert calls == [] and not chooser.enabled


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="cpu_threads='all'"):
        CpuThreadChooser(torch.device("cpu"), "all")


def test_the_trial_runs_again_and_follows_a_changed_machine(monkeypatch):
    import mistralrs.worker.cpu_threads as cpu_threads

    monkeypatch.setattr(cpu_threads, "RECHECK_STEPS", 5)
    chooser = CpuThreadChooser(torch.device("cpu"), "auto", max_threads=2)
    _run_trial(chooser, {1: 0.001, 2: 0.004})   # e.g. another job held the second core
    assert chooser.small_step_threads == 1
    for _ in range(5):
        with chooser.step(1):
            assert torch.get_num_threads() == 1
    assert chooser.small_step_threads is None   # trial again
    _run_trial(chooser, {1: 0.004, 2: 0.001})   # the machine is quiet now
    assert chooser.small_step_threads == 2
