"""Runs a function on several CPU processes joined by a gloo process group, for the tensor-parallel tests.

`run_on_ranks(fn, payload)` starts `world_size` fresh (spawned) processes, each of which joins a gloo group through
a file store in a private temporary directory (no port to race for), runs `fn(group, payload)` with one intra-op
thread, and tears the group down. Rank 0's return value comes back through a file. A rank that fails or a run that
outlives `timeout` ends every process and raises, so a broken collective never hangs the suite.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mistralrs.distributed.group import TPGroup


def _rank_main(rank: int, world_size: int, workdir: str, fn: Callable[[TPGroup, Any], Any], payload: Any) -> None:
    torch.set_num_threads(1)
    fault_log = open(f"{workdir}/error-{rank}-fault.txt", "w", encoding="utf-8")  # a native crash's Python stack
    faulthandler.enable(file=fault_log)
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        try:
            result = fn(TPGroup(rank, world_size, dist.group.WORLD), payload)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            torch.save(result, f"{workdir}/result.pt")
    except BaseException:
        with open(f"{workdir}/error-{rank}.txt", "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        raise
    # Done, the group torn down and the result written: leave without the interpreter's teardown. After the
    # loader-driven cases of test_tp_loader.py, that teardown aborted now and then (about 1 run in 6: "terminate called
    # without an active exception", no Python frame; not seen with any one of its cases alone, nor after plain
    # collectives), with every result already complete.
    fault_log.close()
    os._exit(0)


def run_on_ranks(fn: Callable[[TPGroup, Any], Any], payload: Any, world_size: int = 2,
                 timeout: float = 300.0) -> Any:
    """`fn(group, payload)` on `world_size` gloo ranks (fn and payload picklable); rank 0's return value."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mistralrs-tp-") as workdir:
        processes = [context.Process(target=_rank_main, args=(rank, world_size, workdir, fn, payload), daemon=True)
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
        finally:
            alive = [p for p in processes if p.is_alive()]
            for process in alive:
                process.kill()
                process.join()
        errors = [f"{name}: {text}" for name in sorted(os.listdir(workdir)) if name.startswith("error-")
                  for text in [open(os.path.join(workdir, name), encoding="utf-8").read()] if text]
        if alive:
            raise TimeoutError(f"{len(alive)} of {world_size} ranks still running after {timeout} s\n"
                               + "\n".join(errors))
        if errors or any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"ranks failed (exit codes {[p.exitcode for p in processes]}):\n" + "\n".join(errors))
        return torch.load(f"{workdir}/result.pt", weights_only=False)
