"""How many CPU threads each step runs on: a measured choice per step size, set on the engine thread alone.

Whether a step gains from more threads depends on the process and on the machine, not on the model. On the 2-core
development machine SmolLM2 decodes at about 75 tok/s on two threads and 50 on one when the machine is quiet, but
when other processes compete for the cores a step on two threads waits at every parallel region for a worker
that is not running: one stream then decoded at 1.6-5.4 tok/s on two threads against 13-57 on one. So the chooser
times real steps: steps are grouped by size (`size_class`: 1, 2-3, 4-7, ... tokens, 512 and more together), and
for each size the first steps run alternately on one thread and on all threads (`TRIAL_SAMPLES` timed steps each,
fewer when one setting is clearly slower), and the faster setting is kept. A new trial runs when the steps on the
chosen setting drift `DRIFT_FACTOR` times away from the trial's median (the machine got busier, or quieter), and
otherwise `RETRIAL_SECONDS` after the choice, an interval that doubles (up to `MAX_RETRIAL_SECONDS`) each time a
trial keeps the choice. Thread counts do not change results: the kernels split work by output element, never a
reduction.

The count is set for the engine thread only. With ATen's OpenMP backend a parallel region runs on the calling
thread's own OpenMP count (`omp_get_max_threads()`, which is also what `torch.get_num_threads()` reports on that
thread), and MKL on the thread's own MKL count; `torch.set_num_threads` sets both for its caller but also the
process-wide value every thread takes when it first uses torch, so it would hand the engine's choice to every
thread the host program starts afterwards. The chooser instead calls `omp_set_num_threads` and
`MKL_Set_Num_Threads_Local` of the runtime torch itself loaded (resolved through torch's own library, so the same
instance). Measured on the 2-core machine: after the engine thread set one thread, a thread started by the host
reported `torch.get_num_threads() == 2` and its 1024x1024 matmul and `exp` kept both cores busy (per-thread CPU
time: 0.38 s on each of two threads), while the same ops on the engine thread ran on one (0.75 s on one thread),
also after the host had called `torch.set_num_threads(2)` itself. So "auto" is the default for a library `Runner`
too. Where torch has no OpenMP backend, or its runtime does not export `omp_set_num_threads`, no per-thread count
can be set and the chooser leaves the count alone (a log line says so).

OpenMP's wait policy is left as the runtime's default (threads spin a while, then sleep). `OMP_WAIT_POLICY=PASSIVE`
(sleep at once) was measured with bench/bench_busy.py: on a quiet machine it cost 23-31% of decode throughput
(futex wake-ups at every parallel region), and on a busy one it gained nothing over the chooser, which moves the
steps to one thread there (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

CPU_THREAD_POLICIES = ("auto", "fixed")  # the chooser sets the engine thread's count / it is never touched
LARGEST_CLASS = 9  # steps of 2**9 = 512 tokens and more share one size class
TRIAL_SAMPLES = 3  # timed steps per setting in a trial, unless one setting is clearly slower:
CLEARLY_SLOWER = 1.5  # ... its fastest step took this many times the other's slowest,
EARLY_SAMPLES = 2  # ... of which there were at least this many (a re-trial starts with the last steps chosen)
DRIFT_WINDOW = 4  # the last steps on the chosen setting whose median is compared with the trial's
DRIFT_FACTOR = 2.0  # a median this many times away from the trial's, towards the other setting, starts a trial
RETRIAL_SECONDS = 5.0  # a new trial this long after a choice; the interval doubles while trials keep the choice
MAX_RETRIAL_SECONDS = 80.0
TRIAL_COST_RATIO = 50.0  # no trial sooner than this many times what the last one lost on the slower setting


def size_class(num_tokens: int) -> int:
    """The size class of a step of `num_tokens` packed tokens: its power of two, up to `LARGEST_CLASS`."""
    return min(max(num_tokens, 1).bit_length() - 1, LARGEST_CLASS)


class EngineThreadCount:
    """Sets the calling thread's own OpenMP and MKL thread counts, in the OpenMP runtime torch loaded.

    `setter()` is None where that is not possible (no OpenMP backend, no `omp_set_num_threads` exported).
    """

    def __init__(self, omp_set: Callable[[int], object], mkl_set: Callable[[int], object] | None) -> None:
        self._omp_set = omp_set  # omp_set_num_threads of torch's OpenMP runtime (the caller's count only)
        self._mkl_set = mkl_set  # MKL_Set_Num_Threads_Local (the caller's MKL count), None without MKL

    @classmethod
    def setter(cls) -> EngineThreadCount | None:
        """The setter for this process's torch, or None when torch runs parallel regions otherwise."""
        if not torch.backends.openmp.is_available() or "backend: OpenMP" not in torch.__config__.parallel_info():
            return None
        library = ctypes.CDLL(torch._C.__file__)  # symbols are looked up in it and the libraries it loaded
        omp_set = getattr(library, "omp_set_num_threads", None)
        return None if omp_set is None else cls(omp_set, getattr(library, "MKL_Set_Num_Threads_Local", None))

    def set(self, threads: int) -> None:
        """Runs the calling thread's later parallel regions (ATen's and MKL's) on `threads` threads."""
        torch.get_num_threads()  # torch's first use on a thread sets its count: let that happen before ours
        self._omp_set(threads)
        if self._mkl_set is not None:
            self._mkl_set(threads)


@dataclass
class SizeClassChoice:
    """The thread choice for the steps of one size class, and the trial that makes it."""

    candidates: tuple[int, ...]  # the thread counts tried, most first (all of them, one)
    chosen: int | None = None  # the count steps run on; None while a trial runs
    trial: dict[int, list[float]] = field(default_factory=dict)  # candidate -> its timed trial steps (seconds)
    baseline: float = 0.0  # the chosen candidate's median trial step (seconds)
    recent: deque = field(default_factory=lambda: deque(maxlen=DRIFT_WINDOW))  # last steps on the chosen count
    interval: float = RETRIAL_SECONDS  # seconds from a choice to the next trial
    retrial_at: float = 0.0  # clock time of the next trial
    not_before: float = 0.0  # clock time before which no trial starts (see TRIAL_COST_RATIO)
    last_choice: int | None = None  # the count the previous trial chose

    def threads(self) -> int:
        """The count the next step of this class runs on (during a trial: the candidate with the fewest steps)."""
        if self.chosen is not None:
            return self.chosen
        return min(self.candidates, key=lambda c: len(self.trial.get(c, ())))

    def record(self, threads: int, seconds: float, now: float) -> bool:
        """Takes the time of a step run on `threads`; True when this made a choice other than the last one."""
        if self.chosen is None:
            self.trial.setdefault(threads, []).append(seconds)
            return self._decide(now)
        self.recent.append(seconds)
        if now >= self.not_before and self._drifted():
            self.last_choice = None  # the machine changed: the next choice is kept for `RETRIAL_SECONDS` only
            self._start_trial()
        elif now >= self.retrial_at:
            self._start_trial()
        return False

    def _drifted(self) -> bool:
        """The chosen setting's steps moved as when the other would now be faster: the most threads slower (other
        work came), one thread faster (it left)."""
        if len(self.recent) < DRIFT_WINDOW:
            return False
        median = statistics.median(self.recent)
        if self.chosen == max(self.candidates):
            return median > DRIFT_FACTOR * self.baseline
        return DRIFT_FACTOR * median < self.baseline

    def _start_trial(self) -> None:
        """A new trial, which starts from the last steps on the chosen count (a clearly slower other count then
        costs a single step)."""
        self.trial = {self.chosen: list(self.recent)[-EARLY_SAMPLES:]}
        self.chosen = None
        self.recent.clear()

    def _decide(self, now: float) -> bool:
        samples = [self.trial.get(c, []) for c in self.candidates]
        if min(len(s) for s in samples) < TRIAL_SAMPLES:
            winner = self._clear_winner(samples)
            if winner is None:
                return False
            medians = [statistics.median(s) if s else float("inf") for s in samples]
        else:
            medians = [statistics.median(s) for s in samples]
            winner = min(range(len(medians)), key=medians.__getitem__)
        self.chosen, self.baseline = self.candidates[winner], medians[winner]
        kept = self.chosen == self.last_choice
        self.interval = min(2 * self.interval, MAX_RETRIAL_SECONDS) if kept else RETRIAL_SECONDS
        lost = sum(max(t - self.baseline, 0.0) for i, steps in enumerate(samples) if i != winner for t in steps)
        self.not_before = now + TRIAL_COST_RATIO * lost
        self.retrial_at, self.last_choice = max(now + self.interval, self.not_before), self.chosen
        return not kept

    @staticmethod
    def _clear_winner(samples: list[list[float]]) -> int | None:
        """The index of the candidate with `EARLY_SAMPLES` steps that every other candidate's steps (one at
        least) took `CLEARLY_SLOWER` times longer than; None when there is none yet."""
        for i, fast in enumerate(samples):
            if len(fast) >= EARLY_SAMPLES and all(
                    slow and min(slow) > CLEARLY_SLOWER * max(fast) for j, slow in enumerate(samples) if j != i):
                return i
        return None


class CpuThreadChooser:
    """Runs each step on the thread count measured fastest for its size, under the "auto" policy (CPU only; a
    no-op elsewhere, with one thread, under "fixed", or where the engine thread's own count cannot be set)."""

    def __init__(self, device: torch.device, policy: str, max_threads: int | None = None,
                 setter: EngineThreadCount | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if policy not in CPU_THREAD_POLICIES:
            raise ValueError(f"cpu_threads={policy!r}; accepted values: {list(CPU_THREAD_POLICIES)}")
        self.max_threads = max_threads or torch.get_num_threads()  # the process's setting when the engine starts
        wanted = policy == "auto" and device.type == "cpu" and self.max_threads > 1
        self._setter = (setter or EngineThreadCount.setter()) if wanted else None
        if wanted and self._setter is None:
            logger.info("cpu_threads='auto' needs torch's OpenMP backend: every step runs on %d threads",
                        self.max_threads)
        self.enabled = self._setter is not None
        self._clock = clock
        self.classes: dict[int, SizeClassChoice] = {}  # size class -> its choice (see `size_class`)

    def choice(self, num_tokens: int) -> SizeClassChoice:
        """The choice for steps of `num_tokens` tokens (made on first use)."""
        key = size_class(num_tokens)
        if key not in self.classes:
            self.classes[key] = SizeClassChoice(candidates=(self.max_threads, 1))
        return self.classes[key]

    @contextmanager
    def step(self, num_tokens: int):
        """Runs the body of one step of `num_tokens` packed tokens on the chosen number of threads."""
        if not self.enabled:
            yield
            return
        choice = self.choice(num_tokens)
        threads = choice.threads()
        if torch.get_num_threads() != threads:
            self._setter.set(threads)
        start = self._clock()
        yield
        end = self._clock()
        if choice.record(threads, end - start, end):
            logger.info("steps of %d+ tokens on %d CPU thread(s) (median step %s)", 1 << size_class(num_tokens),
                        choice.chosen, ", ".join(f"{statistics.median(s) * 1e3:.1f} ms on {t}"
                                                 for t, s in sorted(choice.trial.items())))
