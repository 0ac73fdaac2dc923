"""Where this process stands in a tensor-parallel run: `tp_plan` reads the size and the cluster variables.

Three ways to run, in this order of precedence:

- The reference's multi-node variables (REFERENCE §8.14), mapped onto torchrun's: every node sets
  `MISTRALRS_MN_GLOBAL_WORLD_SIZE` (ranks in all); the head node `MISTRALRS_MN_HEAD_NUM_WORKERS` (other nodes) and
  `MISTRALRS_MN_HEAD_PORT` (its store's port, the MASTER_PORT); worker node `i` (from 0)
  `MISTRALRS_MN_WORKER_ID=i` and `MISTRALRS_MN_WORKER_SERVER_ADDR=host:port` (the MASTER_ADDR and MASTER_PORT).
  Every node runs as many ranks as it has visible CUDA GPUs (one on a CPU node): the head ranks 0.., worker node
  `i` the ranks after the head's and those of nodes 0..i-1 (every node the same count).
- torchrun's variables (`WORLD_SIZE` > 1, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): one rank per
  process, each started by torchrun.
- One node, one program: `ExecutionOptions.tp_size` (`MISTRALRS_TP_SIZE`, `--tp-size`), or every visible CUDA GPU
  when there are several and NCCL is on; the head starts the other ranks itself, its store on a free localhost
  port.

A process that runs several ranks (a node's first rank) starts the others as child processes. Only rank 0 serves
requests; a process whose first rank is not 0 runs the worker loop and exits when the head shuts down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mistralrs.worker.options import ExecutionOptions

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class TPPlan:
    """This process's share of a tensor-parallel run and how the ranks meet."""

    world_size: int  # ranks in all (> 1)
    rank: int  # the first rank this process runs (0: the head, which serves requests)
    num_local_ranks: int  # ranks this node runs: `rank` here, ranks rank+1 .. in child processes
    backend: str  # "nccl" (one CUDA GPU per rank) or "gloo" (CPU ranks)
    master_addr: str  # host of rank 0's store
    master_port: int  # its port; 0: a free port, chosen when the head opens the store (one node only)
    agent_store: bool = False  # torchrun's agent hosts the store (rank 0 connects to it as a client)
    local_rank: int = 0  # this process's first rank's index on its node (its CUDA device under NCCL)

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"TPPlan: world_size must be at least 2, got {self.world_size}")
        if not 0 <= self.rank < self.world_size or self.rank + self.num_local_ranks > self.world_size:
            raise ValueError(f"TPPlan: ranks {self.rank}..{self.rank + self.num_local_ranks - 1} outside "
                             f"0..{self.world_size - 1}")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"TPPlan: backend must be 'nccl' or 'gloo', got {self.backend!r}")

    @property
    def is_head(self) -> bool:
        """Whether this process runs rank 0 and serves requests."""
        return self.rank == 0

    def for_child(self, offset: int) -> TPPlan:
        """The plan of the child process that runs this node's rank `rank + offset`."""
        return TPPlan(self.world_size, self.rank + offset, 1, self.backend, self.master_addr, self.master_port,
                      self.agent_store, self.local_rank + offset)


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name}={environ.get(name)!r}; accepted values: an integer >= {minimum}")
    return int(raw)


def _address(environ: Mapping[str, str], name: str) -> tuple[str, int]:
    host, _, port = environ.get(name, "").strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name}={environ.get(name)!r}; accepted values: host:port")
    return host, int(port)


def _backend(options: ExecutionOptions, num_cuda: int) -> str:
    return "nccl" if num_cuda > 0 and options.nccl else "gloo"


def _check_size(options: ExecutionOptions, world_size: int, source: str) -> None:
    if options.tp_size is not None and options.tp_size != world_size:
        raise ValueError(f"tp_size={options.tp_size} (MISTRALRS_TP_SIZE / --tp-size) disagrees with {source}="
                         f"{world_size}; leave it unset or give the same number")


def _multi_node(options: ExecutionOptions, environ: Mapping[str, str], num_cuda: int) -> TPPlan:
    """The MISTRALRS_MN_* variables mapped onto torchrun's (see the module docstring)."""
    world_size = _int(environ, "MISTRALRS_MN_GLOBAL_WORLD_SIZE", 2)
    _check_size(options, world_size, "MISTRALRS_MN_GLOBAL_WORLD_SIZE")
    per_node = max(num_cuda, 1) if options.nccl else 1
    backend = _backend(options, num_cuda)
    if environ.get("MISTRALRS_MN_HEAD_NUM_WORKERS", "").strip():
        num_nodes = _int(environ, "MISTRALRS_MN_HEAD_NUM_WORKERS", 1) + 1
        if num_nodes * per_node != world_size:
            raise ValueError(f"MISTRALRS_MN_GLOBAL_WORLD_SIZE={world_size} is not {num_nodes} nodes x {per_node} "
                             "ranks (one per visible CUDA GPU, one on a CPU node)")
        return TPPlan(world_size, 0, per_node, backend, LOCALHOST, _int(environ, "MISTRALRS_MN_HEAD_PORT", 1))
    worker_id = _int(environ, "MISTRALRS_MN_WORKER_ID", 0)
    host, port = _address(environ, "MISTRALRS_MN_WORKER_SERVER_ADDR")
    first = (worker_id + 1) * per_node
    if first + per_node > world_size:
        raise ValueError(f"MISTRALRS_MN_WORKER_ID={worker_id}: its ranks {first}..{first + per_node - 1} lie outside "
                         f"MISTRALRS_MN_GLOBAL_WORLD_SIZE={world_size}")
    return TPPlan(world_size, first, per_node, backend, host, port)


def _torchrun(options: ExecutionOptions, environ: Mapping[str, str], num_cuda: int) -> TPPlan:
    world_size = _int(environ, "WORLD_SIZE", 1)
    _check_size(options, world_size, "WORLD_SIZE")
    rank = _int(environ, "RANK", 0)
    local_rank = _int(environ, "LOCAL_RANK", 0) if environ.get("LOCAL_RANK", "").strip() else 0
    host = environ.get("MASTER_ADDR", "").strip()
    if not host:
        raise ValueError("MASTER_ADDR is not set (torchrun sets it with WORLD_SIZE and RANK)")
    return TPPlan(world_size, rank, 1, _backend(options, num_cuda), host, _int(environ, "MASTER_PORT", 1),
                  agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True", local_rank=local_rank)


def tp_plan(options: ExecutionOptions, environ: Mapping[str, str], num_cuda: int) -> TPPlan | None:
    """This process's plan (None: no tensor parallelism) from `options` (tp_size, nccl), the environment's cluster
    variables and the number of visible CUDA GPUs. ValueError naming the variable for a bad or inconsistent value."""
    if environ.get("MISTRALRS_MN_GLOBAL_WORLD_SIZE", "").strip():
        return _multi_node(options, environ, num_cuda)
    if environ.get("WORLD_SIZE", "").strip() and _int(environ, "WORLD_SIZE", 1) > 1:
        return _torchrun(options, environ, num_cuda)
    size = options.tp_size
    if size is None:
        size = num_cuda if num_cuda > 1 and options.nccl else 1
    if size == 1:
        return None
    backend = _backend(options, num_cuda)
    if backend == "nccl" and size > num_cuda:
        raise ValueError(f"tp_size={size}: only {num_cuda} CUDA GPU(s) visible (one rank per GPU); lower it, or "
                         "set MISTRALRS_NO_NCCL=1 for CPU ranks")
    return TPPlan(size, 0, size, backend, LOCALHOST, 0)
