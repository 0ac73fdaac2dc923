"""Rotary position embeddings (RoPE), NeoX "rotate half" layout, with the HF `rope_scaling` variants.

`RotaryEmbedding.cos_sin(positions)` is computed once per step by the model and shared by every layer;
`apply_rotary(x, cos, sin)` rotates the first `rotary_dim` features of each head.
A new scaling variant is one function `(base inv_freq, scaling dict, ...) -> (inv_freq, attention_factor)`
added to `_INV_FREQ_SCALERS`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

# (inv_freq [rotary_dim // 2] float32, rope_scaling dict, max_position_embeddings) -> (inv_freq, attention_factor)
InvFreqScaler = Callable[[torch.Tensor, dict[str, Any], int], tuple[torch.Tensor, float]]


def _scaling_param(scaling: dict[str, Any], key: str) -> Any:
    if key not in scaling:
        raise ValueError(f"rope_scaling.{key} is required for rope_type {rope_type_of(scaling)!r}")
    return scaling[key]


def _linear_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any], _max_pos: int) -> tuple[torch.Tensor, float]:
    """Position interpolation: positions are divided by `factor`."""
    return inv_freq / float(_scaling_param(scaling, "factor")), 1.0


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any], _max_pos: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1 frequency-dependent scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    factor = float(_scaling_param(scaling, "factor"))
    low_freq_factor = float(_scaling_param(scaling, "low_freq_factor"))
    high_freq_factor = float(_scaling_param(scaling, "high_freq_factor"))
    old_context_len = float(_scaling_param(scaling, "original_max_position_embeddings"))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


_INV_FREQ_SCALERS: dict[str, InvFreqScaler] = {
    "linear": _linear_scaling,
    "llama3": _llama3_scaling,
}


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The rope type named by an HF `rope_scaling` dict (`rope_type`, or the legacy `type`); "default" when none."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def supported_rope_types() -> list[str]:
    """The `rope_scaling.rope_type` values this package implements."""
    return ["default", *sorted(_INV_FREQ_SCALERS)]


def validate_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """ValueError naming `rope_scaling` when its type is not implemented."""
    rope_type = rope_type_of(scaling)
    if rope_type != "default" and rope_type not in _INV_FREQ_SCALERS:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported; accepted values: {supported_rope_types()}"
        )


class RotaryEmbedding(nn.Module):
    """Computes per-token cos/sin tables for RoPE from positions (float32 math, like `transformers`).

    Args:
        rotary_dim: features rotated per head (head_dim, or less for partial rotary models).
        base: `rope_theta`.
        scaling: HF `rope_scaling` dict or None.
        max_position_embeddings: the model's context length (some scaling variants read it).
    """

    def __init__(
        self,
        rotary_dim: int,
        base: float,
        scaling: dict[str, Any] | None,
        max_position_embeddings: int,
        *,
        device: torch.device | str,
    ):
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        validate_rope_scaling(scaling)
        self.rotary_dim = rotary_dim
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
        inv_freq = 1.0 / (base**exponents)
        rope_type = rope_type_of(scaling)
        attention_factor = 1.0
        if rope_type != "default":
            inv_freq, attention_factor = _INV_FREQ_SCALERS[rope_type](inv_freq, scaling, max_position_embeddings)
        self.attention_factor = attention_factor
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [rotary_dim // 2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin tables, each `[num_tokens, 1, rotary_dim]` in `dtype`.

        The sin table's first half is negated so that `apply_rotary` needs no negation:
        rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin).
        """
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [num_tokens, rotary_dim // 2]
        cos = freqs.cos()
        sin = freqs.sin()
        if self.attention_factor != 1.0:
            cos = cos * self.attention_factor
            sin = sin * self.attention_factor
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `x` `[num_tokens, num_heads, head_dim]` with tables from `RotaryEmbedding.cos_sin`.

    Only the first `rotary_dim` features of each head are rotated (partial rotary); the rest pass through.
    Returns a new tensor.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotated = apply_rotary(x[..., :rotary_dim], cos, sin)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)
