"""How many CPU threads a step runs on: all of them for large steps, a measured choice for small (decode) steps.

Small steps are a few hundred short kernels; whether the weight-only matmuls gain from a second thread depends on
the process, not on the model. On the 2-core development machine SmolLM2 decodes at about 75 tok/s on two threads
and 50 on one, but at 32 on two threads when another thread of the process (typically the main thread, after
running PyTorch itself) keeps an OpenMP worker pool alive: libgomp then serves the engine thread's parallel regions
far more slowly. The Runner loads models on a short-lived thread to avoid that (engine/builder.py), but user code
can still create such a pool. So the chooser times the first small steps on one thread and on all threads,
alternately, and keeps the faster setting; every `RECHECK_STEPS` small steps it runs the trial again, because a
choice made while something else loaded the machine (the fused-decode extension compiling at first start, another
process) can be the wrong one later. Thread counts do not change results: the kernels split work by output
element, never a reduction.

The chooser runs only under the "auto" policy (`ExecutionOptions.cpu_threads`, mistralrs/worker/options.py), which
the CLI and the server use; a library user's `Runner` gets "fixed": the engine never calls `torch.set_num_threads`
and steps run on the count torch had when the engine thread first used it. The reason is what `torch.set_num_threads`
does beyond its calling thread. With ATen's OpenMP backend, every thread takes its count from one process-wide
value the first time it uses torch, and `set_num_threads` on any thread rewrites that value (the calling thread's
own OpenMP count is per thread; threads that already used torch keep theirs). Measured on the 2-core development
machine (SmolLM2 through a Runner, in a host program that had run torch on its main thread): once the chooser had
settled on one thread for decode (19.3 ms median step on 1, 25.4 ms on 2, the machine being busy), the main thread
still reported 2 threads, but every thread the host started afterwards, also after `Runner.close()`, reported 1
and ran its own matmuls single-threaded, as did a host thread started while the engine decoded. Under "fixed" all
of them report 2. So the choice stays with the program that owns the process, which can still ask for the chooser
(`MISTRALRS_CPU_THREADS=auto`) or set the count itself. It matters on a busy machine: with other jobs holding both
cores, SmolLM2 decoded at 5 tok/s on two threads and 53 on one.
"""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

SMALL_STEP_TOKENS = 16  # steps with fewer tokens are "small" (decode); larger ones always use every thread
TRIAL_STEPS = 12  # small steps timed before choosing (half on one thread, half on all, alternating)
WARMUP_STEPS = 2  # small steps run first and not timed
RECHECK_STEPS = 2048  # small steps on the chosen setting before the trial runs again (it costs ~6 slower steps)
CPU_THREAD_POLICIES = ("auto", "fixed")  # the chooser sets the count per step / torch's count is never touched


class CpuThreadChooser:
    """Sets the thread count around each step under the "auto" policy (CPU only; a no-op elsewhere, with one
    thread, or under "fixed")."""

    def __init__(self, device: torch.device, policy: str, max_threads: int | None = None) -> None:
        if policy not in CPU_THREAD_POLICIES:
            raise ValueError(f"cpu_threads={policy!r}; accepted values: {list(CPU_THREAD_POLICIES)}")
        self.max_threads = max_threads or torch.get_num_threads()  # the process's setting when the engine starts
        self.enabled = policy == "auto" and device.type == "cpu" and self.max_threads > 1
        self.small_step_threads: int | None = None if self.enabled else self.max_threads  # None: not chosen yet
        self._small_steps = 0  # small steps seen while choosing
        self._timings: dict[int, list[float]] = {1: [], self.max_threads: []}  # threads -> small-step seconds
        self._steps_since_choice = 0  # small steps run on the chosen setting since the last trial

    def _threads_for(self, num_tokens: int) -> int:
        if num_tokens >= SMALL_STEP_TOKENS:
            return self.max_threads
        if self.small_step_threads is not None:
            return self.small_step_threads
        trial = self._small_steps - WARMUP_STEPS
        return self.max_threads if trial < 0 or trial % 2 else 1

    @contextmanager
    def step(self, num_tokens: int):
        """Runs the body of one step of `num_tokens` packed tokens on the chosen number of threads."""
        if not self.enabled:
            yield
            return
        threads = self._threads_for(num_tokens)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        small = num_tokens < SMALL_STEP_TOKENS
        choosing = small and self.small_step_threads is None
        start = time.perf_counter()
        yield
        if choosing:
            self._record(threads, time.perf_counter() - start)
        elif small:
            self._steps_since_choice += 1
            if self._steps_since_choice >= RECHECK_STEPS:
                self._start_trial()

    def _start_trial(self) -> None:
        """Forgets the choice; the next small steps time both settings again."""
        self.small_step_threads = None
        self._small_steps = self._steps_since_choice = 0
        self._timings = {1: [], self.max_threads: []}

    def _record(self, threads: int, seconds: float) -> None:
        self._small_steps += 1
        if self._small_steps <= WARMUP_STEPS:
            return
        self._timings[threads].append(seconds)
        if self._small_steps < WARMUP_STEPS + TRIAL_STEPS:
            return
        one, every = (statistics.median(self._timings[t]) for t in (1, self.max_threads))
        self.small_step_threads = 1 if one < every else self.max_threads
        logger.info("decode steps on %d CPU thread(s) (median step %.1f ms on 1, %.1f ms on %d)",
                    self.small_step_threads, one * 1e3, every * 1e3, self.max_threads)
