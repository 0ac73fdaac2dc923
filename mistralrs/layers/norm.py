"""Normalization layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, like `transformers`' LlamaRMSNorm.

    The normalized activations are cast back to the input dtype before the weight multiply, which is the
    order `transformers` uses; for float32 inputs this collapses into one fused `rms_norm` call.
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.hidden_size,)
        if x.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
