"""Tensor parallelism's runtime: starting the ranks, loading the model on each, and driving the other ranks from
the head (REFERENCE §8.14; the plan of who runs which rank is mistralrs/distributed/launch.py).

The head (rank 0) runs the API, the engine thread and the scheduler as a single process does. Its front door
opens a `TPRuntime`: the rank-0 store, the node's other ranks as child processes (`python -m` this module, the
LoadSpec on their stdin), the default process group (gloo or NCCL, with a collective timeout), then every rank
loads the same LoadSpec inside `building_for(group)`, reports on the store, and rank 0 sizes the KV cache and
publishes its block count. Each step the head's `ModelRunner` broadcasts the step's `StepInputs` (one pickled
message on the `Channel`), every rank runs the model, and rank 0 samples; control commands that change the model
(re-ISQ, adapter activation) go over the same channel between steps, and an idle head sends a keep-alive every few
seconds. The other ranks run `serve`: receive, replay, until a `Shutdown`.

Failures: a child rank that exits is seen by its watch thread at once; a rank whose collectives fail or time out
is seen by the step that waited on it. Either way the runtime is broken: the other children are killed, the
process group is destroyed, and every request (and step) after that fails with a `TPError` naming the rank.
A child exits when its parent is gone, and a worker rank when the head's messages stop (closed connection or
timeout), so nothing outlives the head.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import itertools
import logging
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mistralrs.adapters.lora import activate_adapters
from mistralrs.distributed.group import building_for
from mistralrs.distributed.launch import TPPlan
from mistralrs.distributed.runtime import (
    Channel, RankProcesses, TPError, check_group_free, destroy_group, exit_with_parent, init_group, open_store,
)
from mistralrs.engine.builder import on_short_lived_thread
from mistralrs.engine.commands import ActivateAdapters, Command, ReIsq
from mistralrs.loader.pipeline import LoadedModel, load
from mistralrs.loader.spec import LoadKind, LoadSpec
from mistralrs.quant.isq import re_isq_config
from mistralrs.worker.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)

WORKER_MODULE = "mistralrs.engine.tp_rank"  # what a child rank runs (`python -m`): `main` below
POLL_S = 0.05  # how often a rank checks the store while waiting for the others
LOAD_TIMEOUT_S = 3600.0  # longest wait for the other ranks to start and load the model
EXIT_GRACE_S = 1.0  # after a failed collective, how long to wait for a child's exit to explain it
STOP_TIMEOUT_S = 10.0  # a child that has not exited this long after the shutdown message is killed
_generations = itertools.count()  # one store prefix per runtime of this process (torchrun: same order everywhere)
_live: weakref.WeakSet = weakref.WeakSet()  # runtimes whose children are killed at interpreter exit


@dataclass(frozen=True)
class KeepAlive:
    """Head -> ranks while no step runs: it is alive (a rank gives up after `tp_timeout_s` of silence)."""


@dataclass(frozen=True)
class Shutdown:
    """Head -> ranks: leave the group and exit."""


@dataclass(frozen=True)
class ChildPayload:
    """What a child rank's process reads on its stdin."""

    plan: TPPlan  # its plan (one rank)
    spec: LoadSpec  # the model every rank loads
    prefix: str  # the runtime's store prefix
    parent_pid: int  # it exits when this process is gone


def check_supported(spec: LoadSpec, has_draft: bool) -> None:
    """ValueError for what tensor parallelism does not run (yet)."""
    what = "tensor parallelism (MISTRALRS_TP_SIZE, --tp-size, several CUDA GPUs or cluster variables)"
    if spec.kind == LoadKind.DIFFUSION:
        raise ValueError(f"{what}: {spec.label} models are not supported; run them in one process "
                         "(MISTRALRS_TP_SIZE=1, or MISTRALRS_NO_NCCL=1 on several GPUs)")
    if has_draft:
        raise ValueError(f"which_draft: speculative decoding is not supported with {what}")
    if spec.anymoe is not None:
        raise ValueError(f"anymoe_config: AnyMoE is not supported with {what} (its gates are trained at load)")
    if spec.num_device_layers is not None:
        raise ValueError(f"num_device_layers: a device map does not apply with {what} (each rank holds its shard "
                         "on its own device)")


def rank_device(plan: TPPlan) -> torch.device:
    """The device of the plan's (first) rank: its node-local CUDA GPU under NCCL, else the CPU."""
    return torch.device("cuda", plan.local_rank) if plan.backend == "nccl" else torch.device("cpu")


def apply_re_isq(loaded: LoadedModel, command: ReIsq, fast_kernels: bool) -> None:
    """Re-quantize the loaded model to the command's type with the load's topology, MoQE and imatrix."""
    config = re_isq_config(loaded.isq, command.isq_type, fast_kernels)
    config.quantize_loaded(loaded.model)
    loaded.isq = config


def _count_failures(failed: bool, group: object) -> int:
    """Every rank: how many ranks report a failure (a sum over the message group)."""
    count = torch.tensor([int(failed)], dtype=torch.int64)
    dist.all_reduce(count, group=group)
    return int(count.item())


def _load_for(group, spec: LoadSpec) -> LoadedModel:
    with building_for(group):
        return load(spec)


class TPRuntime:
    """One process's side of a tensor-parallel run: the head's (`load`, then the `StepPeers` of its model runner,
    `run_command`, `close`), or a worker node's first rank (`serve`)."""

    def __init__(self, plan: TPPlan, spec: LoadSpec, prefix: str | None = None) -> None:
        check_group_free()
        self.spec = dataclasses.replace(spec, device=rank_device(plan))  # every rank loads this
        self.prefix = prefix or f"mistralrs-tp/{next(_generations)}/"
        self.error: str | None = None  # why the runtime broke; None while it serves
        self._lock = threading.Lock()
        self._kv_published = False
        timeout = datetime.timedelta(seconds=spec.execution.tp_timeout_s)
        store = open_store(plan, timeout)
        if plan.master_port == 0:   # the head opened its store on a free port: its children connect there
            plan = dataclasses.replace(plan, master_port=store.port)
        self.plan = plan
        self._store = store
        logger.info("tensor parallelism: %d ranks (%s), this process runs ranks %d..%d, store at %s:%d",
                    plan.world_size, plan.backend, plan.rank, plan.rank + plan.num_local_ranks - 1,
                    plan.master_addr, plan.master_port)
        self.keys = dist.PrefixStore(self.prefix, store)
        self.children = RankProcesses(self._rank_exited)
        self._owner_close: weakref.WeakMethod | None = None  # its owner's close, called at interpreter exit
        _live.add(self)
        try:
            self._start_children()
            if not plan.is_head:
                self.keys.set(f"up/{plan.rank}", "1")
            self.group, control = init_group(plan, plan.rank, store, self.prefix + "pg/", self.spec.device,
                                             timeout)
        except BaseException:
            self.children.kill()
            raise
        self.channel = Channel(control)

    # ---- starting ----------------------------------------------------------------------------
    def _start_children(self) -> None:
        if self.plan.num_local_ranks == 1:
            return
        threads = max(1, (os.cpu_count() or 1) // self.plan.num_local_ranks)
        for offset in range(1, self.plan.num_local_ranks):
            self.children.start(self.plan.rank + offset, WORKER_MODULE,
                                ChildPayload(self.plan.for_child(offset), self.spec, self.prefix, os.getpid()),
                                {"OMP_NUM_THREADS": str(threads)} if self.plan.backend == "gloo" else {})
        self._await([f"up/{self.plan.rank + offset}" for offset in range(1, self.plan.num_local_ranks)],
                    "start")

    def _await(self, keys: list[str], what: str) -> None:
        """Wait until the store holds `keys`, failing at once when a child rank exited."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not self.keys.check(keys):
            if self.error is not None:
                raise TPError(self.error)
            if time.monotonic() > deadline:
                raise TPError(f"tensor parallelism: the ranks did not {what} within {LOAD_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    def _load(self) -> LoadedModel:
        """Load this rank's model inside `building_for(group)` and report on the store."""
        try:
            loaded = on_short_lived_thread(lambda: _load_for(self.group, self.spec))
        except Exception as exc:
            self.keys.set(f"loaded/{self.plan.rank}", f"{type(exc).__name__}: {exc}")
            raise
        self.keys.set(f"loaded/{self.plan.rank}", "ok")
        return loaded

    def load(self) -> LoadedModel:
        """Head: load rank 0's model and wait until every rank loaded its own (TPError naming a rank that could
        not, or one that exited)."""
        loaded = self._load()
        waiting = set(range(1, self.plan.world_size))
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while waiting:
            for rank in sorted(waiting):
                if self.keys.check([f"loaded/{rank}"]):
                    status = self.keys.get(f"loaded/{rank}").decode()
                    if status != "ok":
                        raise TPError(f"tensor parallelism: rank {rank} could not load the model: {status}")
                    waiting.discard(rank)
            if waiting and self.error is not None:
                raise TPError(self.error)
            if waiting and time.monotonic() > deadline:
                raise TPError(f"tensor parallelism: ranks {sorted(waiting)} did not load the model within "
                              f"{LOAD_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S if waiting else 0)
        return loaded

    def publish_kv_blocks(self, num_blocks: int, block_size: int) -> None:
        """Head: the KV cache every rank allocates (the same block count everywhere)."""
        self.keys.set("kv", f"{num_blocks},{block_size}")
        self._kv_published = True

    # ---- the head's side of a step (StepPeers) -------------------------------------------------
    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = f"tensor parallelism: {reason}; this Runner can no longer serve requests, create a new one"
        logger.error("%s", self.error)
        self.children.kill()

    def _rank_exited(self, rank: int, code: int) -> None:
        self._fail(f"rank {rank} exited with code {code}")

    def _raise_if_broken(self) -> None:
        if self.error is not None:
            destroy_group()
            raise TPError(self.error)

    def _collective_failed(self, what: str, exc: Exception) -> None:
        """A collective raised: name the child rank that died if one did (its watch thread may report it a moment
        after the closed connection), else the error; then raise."""
        deadline = time.monotonic() + EXIT_GRACE_S
        while self.error is None and not self.children.exited() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        exited = self.children.exited()
        if exited:
            rank, code = min(exited.items())
            self._fail(f"rank {rank} exited with code {code}")
        self._fail(f"{what} failed ({type(exc).__name__}: {exc})")
        self._raise_if_broken()

    def _send(self, message: object) -> None:
        self._raise_if_broken()
        try:
            self.channel.send(message)
        except Exception as exc:
            self._collective_failed("sending to the other ranks", exc)

    def send_step(self, step: StepInputs) -> None:
        """Hand the step to every other rank (TPError when the runtime broke)."""
        self._send(step)

    def step_failed(self, exc: Exception) -> None:
        """A step raised on the head: the ranks may have parted ways in their collectives, so the runtime breaks."""
        self._collective_failed("a step", exc)

    def keep_alive(self) -> None:
        """Tell the other ranks the head is alive; a broken runtime only logs (the next request gets the error)."""
        try:
            self._send(KeepAlive())
        except TPError as exc:
            logger.warning("%s", exc)

    def run_command(self, command: Command, apply: Callable[[], None]) -> None:
        """Run a control command (ReIsq, ActivateAdapters) on every rank: hand it to the others, `apply` it here,
        then count the ranks it failed on. Failing everywhere raises the head's error (the ranks still agree);
        failing on some ranks only breaks the runtime (their models differ now)."""
        self._send(command)
        try:
            self.channel.flush()
        except Exception as exc:
            self._collective_failed("sending to the other ranks", exc)
        error: Exception | None = None
        try:
            apply()
        except Exception as exc:
            error = exc
        try:
            failed = _count_failures(error is not None, self.channel.group)
        except Exception as exc:
            self._collective_failed(f"the ranks' report on {type(command).__name__}", exc)
        if 0 < failed < self.plan.world_size:
            self._fail(f"{type(command).__name__} failed on {failed} of {self.plan.world_size} ranks"
                       + (f" (the head's error: {error})" if error is not None else ""))
            self._raise_if_broken()
        if error is not None:
            raise error

    def close_at_exit(self, owner_close: Callable[[], None]) -> None:
        """Head: at interpreter exit, if still open, close through the owner's bound `close` (which stops the
        engine thread before this runtime), so the ranks get the shutdown message; a script that never closes its
        `Runner` (as the reference's examples) then ends every node cleanly. Held weakly."""
        self._owner_close = weakref.WeakMethod(owner_close)

    def close(self) -> None:
        """Head: tell the ranks to exit, wait for the children (killing any that linger), leave the group."""
        _live.discard(self)
        if not self._kv_published:   # the other ranks wait on the store, not on the channel: they exit on "abort"
            self.keys.set("kv", "abort")
            self.children.kill()
        elif self.error is None:
            try:
                self.channel.send(Shutdown())
                self.channel.flush()
            except Exception as exc:   # a rank is gone already: the children are killed below
                logger.warning("tensor parallelism: shutdown message not delivered (%s)", exc)
            self.children.stop(STOP_TIMEOUT_S)
        else:
            self.children.kill()
        destroy_group()

    # ---- the other ranks ---------------------------------------------------------------------
    def _await_kv(self) -> tuple[int, int] | None:
        """A worker rank: the head's KV block count and block size (None: the head gave up)."""
        self._await(["kv"], "size the KV cache")
        value = self.keys.get("kv").decode()
        if value == "abort":
            return None
        num_blocks, block_size = value.split(",")
        return int(num_blocks), int(block_size)

    def serve(self) -> int:
        """A rank other than 0: load, allocate the KV cache the head sized, replay the head's steps and commands
        until it shuts down. Returns the process's exit code."""
        try:
            loaded = self._load()
            kv = self._await_kv()
        except Exception:
            logger.exception("tensor-parallel rank %d: loading failed", self.plan.rank)
            self.children.kill()
            destroy_group()
            return 1
        if kv is None:
            self.children.kill()
            destroy_group()
            return 1
        runner = ModelRunner(loaded.model, num_blocks=kv[0], block_size=kv[1], kv_dtype=loaded.dtype,
                             device=loaded.device, options=self.spec.execution)
        code = self._replay(loaded, runner)
        if code == 0:
            self.children.stop(STOP_TIMEOUT_S)
        else:
            self.children.kill()
        destroy_group()
        return code

    def _replay(self, loaded: LoadedModel, runner: ModelRunner) -> int:
        while True:
            try:
                message = self.channel.receive()
            except Exception as exc:
                logger.error("tensor-parallel rank %d: the head is gone or silent (%s: %s); exiting",
                             self.plan.rank, type(exc).__name__, exc)
                return 1
            if isinstance(message, Shutdown):
                return 0
            if isinstance(message, StepInputs):
                try:
                    runner.replay(message)
                except Exception:   # the head's step fails too (or waits on this rank) and breaks the runtime
                    logger.exception("tensor-parallel rank %d: a step failed", self.plan.rank)
            elif isinstance(message, (ReIsq, ActivateAdapters)):
                if not self._apply_command(loaded, message):
                    return 1

    def _apply_command(self, loaded: LoadedModel, command: Command) -> bool:
        """A worker rank: apply the command and report to the head whether it failed (False: the report failed)."""
        failed = False
        try:
            if isinstance(command, ReIsq):
                apply_re_isq(loaded, command, self.spec.execution.fast_kernels)
            else:
                activate_adapters(loaded.model, list(command.names))
        except Exception:
            logger.exception("tensor-parallel rank %d: %s failed", self.plan.rank, type(command).__name__)
            failed = True
        try:
            _count_failures(failed, self.channel.group)
        except Exception as exc:
            logger.error("tensor-parallel rank %d: reporting to the head failed (%s); exiting", self.plan.rank, exc)
            return False
        return True


def run_node(plan: TPPlan, spec: LoadSpec) -> None:
    """A process whose first rank is not 0 (torchrun, a MISTRALRS_MN_* worker node): serve as a rank until the
    head shuts down, then exit the process (the `Runner(...)` call never returns there)."""
    logger.info("tensor parallelism: rank %d of %d serves the head at %s:%d", plan.rank, plan.world_size,
                plan.master_addr, plan.master_port)
    sys.exit(TPRuntime(plan, spec).serve())


@atexit.register
def _close_at_exit() -> None:
    """Runtimes still open at interpreter exit: closed through their owner (the ranks are told to exit), else,
    or if that fails, their children killed."""
    for runtime in list(_live):
        owner_close = runtime._owner_close() if runtime._owner_close is not None else None
        try:
            if owner_close is not None:
                owner_close()
        except Exception as exc:
            logger.warning("tensor parallelism: closing at exit failed (%s)", exc)
        runtime.children.kill()


def main() -> None:
    """A child rank's process: read its `ChildPayload`, serve, exit. Ctrl-C in a terminal reaches the whole process
    group; the head handles it and shuts the ranks down, so a child ignores it. Once served, the process ends at
    once (nothing of it outlives the group; the interpreter's teardown of torch would take seconds)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s rank %(process)d %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    payload: ChildPayload = pickle.load(sys.stdin.buffer)
    exit_with_parent(payload.parent_pid)
    code = TPRuntime(payload.plan, payload.spec, payload.prefix).serve()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
