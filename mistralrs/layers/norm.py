"""Normalization layers: RMSNorm (Llama), GemmaRMSNorm (`1 + w` scale), LayerNorm with bias."""

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


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the checkpoint stores `w` and the scale is `1 + w`, applied in float32 before the cast
    back to the input dtype (the order `transformers` uses for Gemma, unlike Llama's).

    Also the per-head q/k norm of Gemma 3 (`hidden_size` = head_dim, over the last axis).
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        return F.rms_norm(x.float(), (self.hidden_size,), scale, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with a weight and a bias (Phi-2, Starcoder2), computed in the input dtype like `nn.LayerNorm`."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
