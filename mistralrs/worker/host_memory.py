"""Freed host memory goes back to the system: glibc's mmap threshold fixed at 1 MiB for the serving process.

glibc's malloc serves a block above its mmap threshold (128 KiB at start) with its own mapping and unmaps it on
free, but each such free raises the threshold to the block's size (up to 32 MiB): from then on blocks of that size
come from the heap, and freed ones stay in the resident set. PyTorch's CPU tensors are such blocks, so a prefill's
activations and the dequantized weight tiles of a large batch stayed resident after the step (SmolLM2 Q4_1 through
the benchmark: peak RSS 449 MB, 403 MB with the threshold fixed; Gemma 3 270M: 704 against 640 MB after 8
streams). A fixed threshold (set with `mallopt`, which also ends the adjustment) keeps blocks of 1 MiB and more
as mappings of their own; smaller ones, every tensor of a decode step but the largest logits, still come from
the heap. A process started with `MALLOC_MMAP_THRESHOLD_` in its environment keeps its own setting.

Those smaller blocks are many in a large step (a 512-token prefill: per-layer activations of a few hundred KiB),
and once freed they stay in the heap of the thread that ran the step. After a CPU step of `TRIM_AFTER_TOKENS`
tokens or more the free pages of every heap go back to the system (glibc's `malloc_trim`, 0.4-1 ms against the
50 ms and more of such a step): after the benchmark's 512-token prompt 5-6 MB less stays resident (Gemma 3 270M,
SmolLM2), within the peak's run-to-run spread at the time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

import torch

TRIM_AFTER_TOKENS = 128  # a CPU step of this many tokens or more hands its heaps' free pages back
MMAP_THRESHOLD = 1 << 20  # bytes: blocks from this size up are mapped on their own and unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL(ctypes.util.find_library("c")) if platform.libc_ver()[0] == "glibc" else None


@functools.cache
def bound_heap_retention() -> bool:
    """Fixes glibc's mmap threshold at `MMAP_THRESHOLD` once per process; False where the C library is not glibc
    or the environment sets the threshold."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_heap() -> bool:
    """Hands the free pages inside every malloc heap back to the system; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release_after_step(num_tokens: int, device: torch.device) -> bool:
    """`release_free_heap` after a CPU step of `num_tokens` tokens when that is `TRIM_AFTER_TOKENS` or more."""
    return device.type == "cpu" and num_tokens >= TRIM_AFTER_TOKENS and release_free_heap()
