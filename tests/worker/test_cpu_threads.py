"""The CPU thread chooser (mistralrs/worker/cpu_threads.py): its decisions on fake step times (trial, early
choice, scheduled re-trials, drift), one choice per step size, and the engine-thread-only thread count."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from mistralrs.worker.cpu_threads import (DRIFT_FACTOR, DRIFT_WINDOW, EARLY_SAMPLES, MAX_RETRIAL_SECONDS,
                                          RETRIAL_SECONDS, TRIAL_COST_RATIO, TRIAL_SAMPLES, CpuThreadChooser,
                                          EngineThreadCount, SizeClassChoice, size_class)
from tests.models.family_harness import torch_threads

SETTER = EngineThreadCount.setter()
mkl_max_threads = getattr(ctypes.CDLL(torch._C.__file__), "MKL_Get_Max_Threads", None)  # the caller's MKL count
needs_openmp = pytest.mark.skipif(SETTER is None, reason="torch has no OpenMP backend: no per-thread count")


def on_thread(fn):
    """`fn()` run on a new thread (as the engine's steps are); its result."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


def run_trial(choice: SizeClassChoice, seconds_on: dict[int, float], now: float = 0.0) -> list[int]:
    """Steps until `choice` has chosen; each takes `seconds_on[threads]`. The counts the steps ran on."""
    seen = []
    while choice.chosen is None:
        threads = choice.threads()
        seen.append(threads)
        choice.record(threads, seconds_on[threads], now)
    return seen


def test_size_classes_are_powers_of_two_up_to_512():
    assert [size_class(n) for n in (1, 2, 3, 4, 15, 16, 31, 511, 512, 4096)] == [0, 1, 1, 2, 3, 4, 4, 8, 9, 9]


@pytest.mark.parametrize("faster", [1, 2])
def test_a_trial_alternates_and_keeps_the_faster_setting(faster):
    choice = SizeClassChoice(candidates=(2, 1))
    seen = run_trial(choice, {faster: 0.010, 3 - faster: 0.012})   # close: every sample is taken
    assert seen == [2, 1] * TRIAL_SAMPLES
    assert choice.chosen == faster and choice.baseline == 0.010 and choice.threads() == faster


def test_a_clearly_slower_setting_ends_the_trial_early():
    choice = SizeClassChoice(candidates=(2, 1))
    seen = run_trial(choice, {1: 0.010, 2: 0.100})
    assert seen == [2, 1] * EARLY_SAMPLES and choice.chosen == 1


def test_the_median_ignores_one_slow_step():
    choice = SizeClassChoice(candidates=(2, 1))
    for threads, seconds in [(2, 0.010), (1, 0.012), (2, 0.500), (1, 0.012), (2, 0.010), (1, 0.012)]:
        assert choice.threads() == threads
        choice.record(threads, seconds, 0.0)
    assert choice.chosen == 2


def test_a_scheduled_trial_runs_after_the_interval_which_doubles_while_the_choice_holds():
    choice = SizeClassChoice(candidates=(2, 1))
    slightly_faster_on_one = {1: 0.010, 2: 0.012}   # a trial loses little: the interval alone sets the next
    run_trial(choice, slightly_faster_on_one, now=0.0)
    assert (choice.chosen, choice.retrial_at) == (1, RETRIAL_SECONDS)
    choice.record(1, 0.010, RETRIAL_SECONDS - 0.1)
    assert choice.chosen == 1
    choice.record(1, 0.010, RETRIAL_SECONDS)
    assert choice.chosen is None   # trial again
    now, intervals = RETRIAL_SECONDS, []
    for _ in range(6):
        run_trial(choice, slightly_faster_on_one, now)
        intervals.append(choice.interval)
        now = choice.retrial_at
        choice.record(1, 0.010, now)
    assert intervals == [min(RETRIAL_SECONDS * 2 ** k, MAX_RETRIAL_SECONDS) for k in range(1, 7)]
    run_trial(choice, {1: 0.012, 2: 0.010}, now)   # the machine changed: the interval starts over
    assert (choice.chosen, choice.interval) == (2, RETRIAL_SECONDS)


def test_a_trial_starts_from_the_last_chosen_steps_so_a_clearly_slower_setting_costs_one_step():
    choice = SizeClassChoice(candidates=(2, 1))
    run_trial(choice, {1: 0.010, 2: 0.030})
    for now in [1.0] * (DRIFT_WINDOW - 1) + [choice.retrial_at]:
        choice.record(1, 0.010, now)
    assert choice.chosen is None and choice.trial == {1: [0.010] * EARLY_SAMPLES}
    assert run_trial(choice, {1: 0.010, 2: 0.030}) == [2] and choice.chosen == 1
    choice.record(1, 0.010, choice.retrial_at)
    assert run_trial(choice, {1: 0.100, 2: 0.010}) == [2, 2, 1, 2, 1] and choice.chosen == 2   # a full trial


def test_a_costly_trial_puts_the_next_one_off():
    """Two steps on the slower setting lost a second each: no trial, scheduled or not, for 50 times that."""
    choice = SizeClassChoice(candidates=(2, 1))
    run_trial(choice, {1: 0.010, 2: 1.010}, now=0.0)
    assert choice.not_before == choice.retrial_at == pytest.approx(TRIAL_COST_RATIO * 2.0)
    for _ in range(2 * DRIFT_WINDOW):   # one thread got much faster, which would start a trial (see below)
        choice.record(1, 0.001, choice.not_before - 1.0)
    assert choice.chosen == 1
    choice.record(1, 0.001, choice.not_before)
    assert choice.chosen is None


@pytest.mark.parametrize("chosen, towards_other", [(1, 1 / (DRIFT_FACTOR * 1.5)), (2, DRIFT_FACTOR * 1.5)])
def test_steps_drifting_towards_the_other_setting_start_a_trial_at_once(chosen, towards_other):
    """One thread getting faster (the other work left), or all threads getting slower (other work came)."""
    choice = SizeClassChoice(candidates=(2, 1))
    run_trial(choice, {chosen: 0.010, 3 - chosen: 0.030})
    now = choice.not_before
    assert now < choice.retrial_at
    for _ in range(2 * DRIFT_WINDOW):   # the other way: nothing happens before the scheduled trial
        choice.record(chosen, 0.010 / towards_other, now)
    assert choice.chosen == chosen
    steps = 0
    while choice.chosen is not None:
        choice.record(chosen, 0.010 * towards_other, now)
        steps += 1
    assert steps <= DRIFT_WINDOW   # a median of the window, long before the scheduled trial
    run_trial(choice, {chosen: 0.010, 3 - chosen: 0.030}, now=now)
    assert choice.interval == RETRIAL_SECONDS   # after a drift the next trial comes soon


class FakeClock:
    """A clock the step bodies advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@needs_openmp
def test_each_step_size_gets_its_own_choice_on_the_engine_thread_only():
    """Decode steps (1 and 8 tokens) faster on one thread, large steps (64 tokens, batched) on two: each size
    class runs on its own choice, set on the engine thread; a thread started afterwards keeps the default."""
    clock = FakeClock()
    chooser = CpuThreadChooser(torch.device("cpu"), "auto", max_threads=2, clock=clock)

    def engine() -> dict[int, set[int]]:
        used: dict[int, set[int]] = {1: set(), 8: set(), 64: set()}
        for _ in range(3 * TRIAL_SAMPLES * 2):
            for num_tokens in used:
                with chooser.step(num_tokens):
                    threads = torch.get_num_threads()
                    clock.now += {1: 0.010, 2: 0.030}[threads] if num_tokens < 16 else {1: 0.2, 2: 0.1}[threads]
                used[num_tokens].add(threads)
        return {n: {chooser.choice(n).chosen} for n in used}

    with torch_threads(2):
        assert on_thread(engine) == {1: {1}, 8: {1}, 64: {2}}
        assert on_thread(torch.get_num_threads) == 2 and torch.get_num_threads() == 2


def test_disabled_off_the_cpu_with_one_thread_and_under_fixed():
    calls = []

    class Recording(EngineThreadCount):
        def set(self, threads: int) -> None:
            calls.append(threads)

    setter = Recording(lambda n: None, None)
    for device, policy, max_threads in (("cuda", "auto", 2), ("cpu", "auto", 1), ("cpu", "fixed", 2)):
        chooser = CpuThreadChooser(torch.device(device), policy, max_threads=max_threads, setter=setter)
        for num_tokens in [1] * 10 + [64] * 10:
            with chooser.step(num_tokens):
                pass
        assert not chooser.enabled and chooser.classes == {}
    assert calls == []


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="cpu_threads='all'"):
        CpuThreadChooser(torch.device("cpu"), "all")


@needs_openmp
def test_the_setter_changes_the_calling_thread_only():
    """Also when the host program set torch's count itself (which sets MKL's per-thread count on every thread)."""
    with torch_threads(2):
        before, main_before = on_thread(torch.get_num_threads), torch.get_num_threads()

        def counts() -> tuple[int, int]:
            return torch.get_num_threads(), mkl_max_threads() if mkl_max_threads else 1

        def engine() -> tuple[int, int]:
            SETTER.set(1)
            return counts()

        assert on_thread(engine) == (1, 1)
        assert on_thread(counts)[0] == before and torch.get_num_threads() == main_before

