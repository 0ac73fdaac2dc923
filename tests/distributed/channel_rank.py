"""One rank of the channel test (tests/distributed/test_channel.py): `python channel_rank.py RANK PORT`.

Rank 0 sends MESSAGES over the `Channel`; rank 1 receives them and prints each one's `digest`, one per line."""

from __future__ import annotations

import hashlib
import sys

import torch.distributed as dist

from mistralrs.distributed.runtime import CHANNEL_CAPACITY, Channel
from mistralrs.worker.forward_batch import SeqChunk

MESSAGES = [
    "small",
    list(range(CHANNEL_CAPACITY)),   # several times the capacity: a second broadcast carries the rest
    b"x" * (CHANNEL_CAPACITY - 8 - 40),   # about the capacity, pickled: either side of the boundary
    SeqChunk([1, 2, 3], 5, [0, 1], 4),
]


def digest(message: object) -> str:
    """A short fingerprint of the message's repr."""
    return hashlib.sha256(repr(message).encode()).hexdigest()


def main() -> None:
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    store = dist.TCPStore("127.0.0.1", port, 2, False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    channel = Channel()
    for message in MESSAGES:
        if rank == 0:
            channel.send(message)
        else:
            print(digest(channel.receive()), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
