"""One rank of the channel test (tests/distributed/test_channel.py): `python channel_rank.py RANK PORT`.

Rank 0 sends MESSAGES over the `Channel`; rank 1 receives them and prints each one's `digest`, one per line (a
tensor's digest covers its dtype, shape and bytes)."""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist

from mistralrs.distributed.runtime import CHANNEL_CAPACITY, Channel
from mistralrs.worker.forward_batch import SeqChunk

MESSAGES = [
    "small",
    list(range(CHANNEL_CAPACITY)),   # several times the capacity: a second broadcast carries the rest
    b"x" * (CHANNEL_CAPACITY - 8 - 40),   # about the capacity, pickled: either side of the boundary
    SeqChunk([1, 2, 3], 5, [0, 1], 4),
    {   # tensors travel beside the pickle, one broadcast of raw bytes each
        "pixel_values": torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64),
        "sizes": torch.tensor([[64, 64]]),
        "mask": torch.tensor([True, False, True]),
        "half": torch.arange(7, dtype=torch.bfloat16),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "empty": torch.zeros(0, 5),
        "same": [torch.ones(2)] * 2,
        "long list": list(range(CHANNEL_CAPACITY)),
    },
]


def _canonical(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        raw = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return "tensor", str(obj.dtype), tuple(obj.shape), hashlib.sha256(raw).hexdigest()
    if isinstance(obj, dict):
        return {key: _canonical(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_canonical(value) for value in obj]
    return obj


def digest(message: object) -> str:
    """A short fingerprint of the message's repr (tensors by dtype, shape and bytes)."""
    return hashlib.sha256(repr(_canonical(message)).encode()).hexdigest()


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
