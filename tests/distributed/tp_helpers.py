"""Shared by the tensor-parallel runtime tests: the child rank processes this process started."""

from __future__ import annotations

import os
from pathlib import Path

from mistralrs.engine.tensor_parallel import WORKER_MODULE


def rank_children() -> list[int]:
    """Process ids of the live child ranks of this process (`python -m mistralrs.engine.tp_rank`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:   # gone meanwhile
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == os.getpid() and WORKER_MODULE.encode() in cmdline:
            found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
