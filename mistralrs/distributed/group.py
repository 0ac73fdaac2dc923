"""The tensor-parallel group a model is built for.

Whoever starts the ranks creates the `torch.distributed` process group and builds the model inside
`building_for(group)`; layers and models read `current_group()` while they are constructed and keep the group
for their collectives. Outside such a block (the ordinary single-process case) `current_group()` is None and
every layer holds the whole weight.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group."""

    rank: int  # 0 .. world_size - 1; rank 0 serves requests and samples
    world_size: int  # ranks the model is sharded over (>= 1)
    process_group: Any = None  # the torch.distributed ProcessGroup of the ranks; None: the default (world) group
    backend: str = "gloo"  # "gloo" (CPU ranks) or "nccl" (one CUDA GPU per rank)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"TPGroup: world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"TPGroup: rank {self.rank} outside 0..{self.world_size - 1}")

    @property
    def is_head(self) -> bool:
        """Whether this rank serves requests (rank 0)."""
        return self.rank == 0


_CURRENT: contextvars.ContextVar[TPGroup | None] = contextvars.ContextVar("tp_group", default=None)


@contextlib.contextmanager
def building_for(group: TPGroup | None) -> Iterator[None]:
    """Models built inside shard themselves over `group` (None or a group of one: whole weights)."""
    token = _CURRENT.set(group if group is not None and group.world_size > 1 else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_group() -> TPGroup | None:
    """The group the model under construction is sharded over; None when it is not sharded."""
    return _CURRENT.get()
