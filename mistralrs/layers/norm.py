"""Normalization layers: RMSNorm (Llama), GemmaRMSNorm (`1 + w` scale), LayerNorm with bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with float32 statistics, like `transformers`' LlamaRMSNorm.

    float32 inputs take one `rms_norm` call (equal to `transformers`). Half-precision inputs take
    `layer_norm` over `[x, -x]`: that vector has mean 0 and variance mean(x²), so its first half comes out as
    `x * rsqrt(mean(x²) + eps) * w`, from one fused kernel that keeps float32 statistics and rounds once (the
    composite `rms_norm` path costs about twice as much per call at decode sizes on the CPU, and rounds twice).
    """

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self._doubled: tuple[int, torch.Tensor] | None = None  # (weight version, cat(w, w)) for the half path

    def doubled_weight(self) -> torch.Tensor:
        """`cat(weight, weight)`, the layer_norm weight of the half-precision path (cached per weight version)."""
        version = self.weight._version
        if self._doubled is None or self._doubled[0] != version:
            self._doubled = (version, torch.cat([self.weight, self.weight]))
        return self._doubled[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        mirrored = torch.cat([x, x.neg()], dim=-1)
        normed = F.layer_norm(mirrored, (2 * self.hidden_size,), self.doubled_weight(), None, self.eps)
        return normed[..., :self.hidden_size]

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

    def scale_weight(self) -> torch.Tensor:
        """The float32 scale `1 + w` (also the fused decode path's norm weight)."""
        return 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.hidden_size,), self.scale_weight(), self.eps).to(x.dtype)

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
