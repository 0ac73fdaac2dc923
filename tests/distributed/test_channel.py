"""The head's message channel between two gloo ranks: messages shorter and longer than one broadcast, and messages
holding tensors (sent beside the pickle as raw bytes), arrive whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from tests.distributed import channel_rank

SCRIPT = Path(channel_rank.__file__)
ROOT = SCRIPT.parents[2]


def test_messages_arrive_whole_in_order():
    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ranks = [subprocess.Popen([sys.executable, str(SCRIPT), str(rank), str(store.port)], env=env,
                              stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [0, 0]
    assert outputs[1].splitlines() == [channel_rank.digest(message) for message in channel_rank.MESSAGES]
