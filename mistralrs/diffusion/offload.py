"""FluxOffloaded: weights stay in CPU memory; each block's weights visit the compute device only while it runs.

`OffloadPolicy.run(module, *args)` copies the module's parameters and buffers to the device, calls the module
with them (`torch.func.functional_call`, so the CPU copy is never replaced) and lets the device copies go when the
call returns. On a CPU-only machine the device is the CPU, `.to` returns the weights themselves (no copy) and
FluxOffloaded computes exactly what Flux does, through the same per-block calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class OffloadPolicy:
    """Runs modules held in CPU memory on `device`."""

    device: torch.device  # where the computation happens

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            raise ValueError(f"OffloadPolicy.device must be a torch.device, got {self.device!r}")

    def run(self, module: nn.Module, *args, **kwargs):
        """`module(*args, **kwargs)` with its weights copied to `device` for the call."""
        tensors = {name: t.to(self.device, non_blocking=True)
                   for name, t in [*module.named_parameters(), *module.named_buffers()]}
        return functional_call(module, tensors, args, kwargs, strict=False)
