"""The pieces every rank of a tensor-parallel run uses: the store and process group, the head's message channel,
the child processes of a node's other ranks, and a child's watch on its parent.

The process group is torch.distributed's default group (the models' collectives use it: `TPGroup.process_group`
None), so one process runs at most one tensor-parallel model at a time; it is destroyed when that model's runtime
closes, and the next one opens a fresh store and group.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from mistralrs.distributed.group import TPGroup
from mistralrs.distributed.launch import TPPlan

logger = logging.getLogger(__name__)

CHANNEL_CAPACITY = 16 * 1024  # bytes of the one broadcast a message takes (a longer one takes a second)
_HEADER = 8  # the message's length, little-endian, in front of it
PARENT_POLL_S = 0.5  # how often a child process checks that its parent is alive


class TPError(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the runtime that saw it can no longer serve."""


def open_store(plan: TPPlan, timeout: datetime.timedelta) -> dist.TCPStore:
    """The rank-0 store: opened by the head (on a free port when the plan's is 0) unless torchrun's agent hosts
    it; every other process connects to it (`timeout`: its longest wait in one operation)."""
    is_master = plan.is_head and not plan.agent_store
    return dist.TCPStore(plan.master_addr, plan.master_port, plan.world_size, is_master, timeout=timeout,
                         wait_for_workers=False)


def check_group_free() -> None:
    """TPError when torch.distributed's default process group is taken (one tensor-parallel model per process)."""
    if dist.is_initialized():
        raise TPError("tensor parallelism: this process runs a tensor-parallel model already (torch.distributed's "
                      "default process group is taken); close that Runner first")


def init_group(plan: TPPlan, rank: int, store: dist.Store, prefix: str, device: torch.device,
               timeout: datetime.timedelta) -> tuple[TPGroup, object]:
    """Join the default process group as `rank` (blocks until every rank joined); returns the models' `TPGroup`
    and the group the head's messages travel on (gloo: the default group; NCCL: a gloo group beside it), both
    with `timeout` as the longest wait in one collective (a hung rank's bound)."""
    check_group_free()
    options = {}
    if plan.backend == "nccl":   # one GPU per rank: bind it before the first collective
        torch.cuda.set_device(device)
        options = dict(device_id=device)
    dist.init_process_group(plan.backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=plan.world_size, timeout=timeout, **options)
    control = dist.new_group(backend="gloo", timeout=timeout) if plan.backend == "nccl" else None
    return TPGroup(rank, plan.world_size, None, plan.backend), control


def destroy_group() -> None:
    """Leave the default process group (nothing when it is gone already; a broken group is dropped all the same)."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:   # the group broke with a rank: torch forgets it anyway, which is all we need
        logger.warning("tensor parallelism: destroying the process group: %s", exc)


class _TensorPickler(pickle.Pickler):
    """Pickles a message with its tensors left out: each becomes a reference (index, dtype, shape) into `tensors`."""

    def __init__(self, file, tensors: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj: object) -> object:
        if not isinstance(obj, torch.Tensor):
            return None
        self.tensors.append(obj)
        return len(self.tensors) - 1, obj.dtype, tuple(obj.shape)


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a `_TensorPickler` message: each tensor reference becomes an empty tensor in `tensors`, whose bytes
    arrive afterwards."""

    def __init__(self, file, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: object) -> torch.Tensor:
        index, dtype, shape = pid
        if index != len(self.tensors):
            raise pickle.UnpicklingError(f"tensor reference {index} out of order (expected {len(self.tensors)})")
        tensor = torch.empty(shape, dtype=dtype)
        self.tensors.append(tensor)
        return tensor


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes as a flat uint8 view (what one broadcast carries, whatever the dtype)."""
    return tensor.reshape(-1).view(torch.uint8)


class Channel:
    """The head's messages to the other ranks: any picklable object, one broadcast of `CHANNEL_CAPACITY` bytes
    (a second one carries the rest of a longer message), then one broadcast of its raw bytes per tensor the message
    holds (image inputs: the pickle carries only each tensor's dtype and shape). Every rank calls `send` (the head)
    or `receive` (the others) in the same order.

    The head's broadcasts are asynchronous: `send` returns once the message is queued, so the head computes its
    step while the others are still receiving (or finishing the previous step); the next `send` (or `flush`) first
    waits for the previous message to be delivered and raises its error."""

    def __init__(self, group: object = None) -> None:
        self.group = group  # None: the default group
        self._buffer = torch.zeros(CHANNEL_CAPACITY, dtype=torch.uint8)
        self._in_flight: list[tuple[object, torch.Tensor]] = []  # (work, tensor it reads) of the last message

    def flush(self) -> None:
        """Head: wait until the last message was delivered (raises the broadcast's error)."""
        in_flight, self._in_flight = self._in_flight, []
        for work, _tensor in in_flight:
            work.wait()

    def send(self, message: object) -> None:
        """Head: broadcast `message` (after the previous one was delivered)."""
        file, tensors = io.BytesIO(), []
        _TensorPickler(file, tensors).dump(message)
        data = file.getvalue()
        self.flush()
        head = len(data).to_bytes(_HEADER, "little") + data[:CHANNEL_CAPACITY - _HEADER]
        self._buffer[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        broadcasts = [self._buffer]
        rest = data[CHANNEL_CAPACITY - _HEADER:]
        if rest:
            broadcasts.append(torch.frombuffer(bytearray(rest), dtype=torch.uint8))
        broadcasts += [_raw_bytes(t.detach().to("cpu").contiguous()) for t in tensors if t.numel()]
        self._in_flight = [(dist.broadcast(tensor, src=0, group=self.group, async_op=True), tensor)
                           for tensor in broadcasts]

    def receive(self) -> object:
        """Another rank: the head's next message (waits at most the group's timeout)."""
        dist.broadcast(self._buffer, src=0, group=self.group)
        size = int.from_bytes(self._buffer[:_HEADER].numpy().tobytes(), "little")
        data = self._buffer[_HEADER:_HEADER + size].numpy().tobytes()
        if size > CHANNEL_CAPACITY - _HEADER:
            rest = torch.empty(size - len(data), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        tensors: list[torch.Tensor] = []
        message = _TensorUnpickler(io.BytesIO(data), tensors).load()
        for tensor in tensors:
            if tensor.numel():
                dist.broadcast(_raw_bytes(tensor), src=0, group=self.group)
        return message


class RankProcesses:
    """The child processes that run a node's other ranks, each watched by a thread: one that exits while the
    runtime has not asked it to calls `on_exit(rank, exit_code)`."""

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self._on_exit = on_exit
        self._processes: dict[int, subprocess.Popen] = {}
        self._stopping = False

    def start(self, rank: int, module: str, payload: object, env_defaults: dict[str, str]) -> None:
        """Run `python -m module` as rank `rank`, handing it `payload` (pickled) on its stdin, with this process's
        environment plus `env_defaults` where it sets none. Its `sys.path` gets the directory this package was
        imported from, so it imports the same `mistralrs`."""
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**env_defaults, **os.environ}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, env=env)
        self._processes[rank] = process
        process.stdin.write(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        process.stdin.close()
        threading.Thread(target=self._watch, args=(rank, process), name=f"mistralrs-tp-rank{rank}",
                         daemon=True).start()

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._stopping:
            self._on_exit(rank, code)

    @property
    def pids(self) -> dict[int, int]:
        """Rank -> process id of every child started."""
        return {rank: process.pid for rank, process in self._processes.items()}

    def exited(self) -> dict[int, int]:
        """Rank -> exit code of every child that has exited."""
        return {rank: code for rank, process in self._processes.items()
                if (code := process.poll()) is not None}

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every child to exit, then kill those left."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for process in self._processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """Kill every child at once (a rank died: the others would wait on it)."""
        self._stopping = True
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
        for process in self._processes.values():
            process.wait()


def exit_with_parent(parent_pid: int) -> None:
    """A child process: exit at once when the process that started it is gone (polled every PARENT_POLL_S)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        logger.error("tensor-parallel rank: the head process %d is gone; exiting", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="mistralrs-tp-parent", daemon=True).start()
