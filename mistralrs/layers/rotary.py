"""Rotary position embeddings (RoPE), NeoX "rotate half" layout, with the HF `rope_scaling` variants.

`RotaryEmbedding.cos_sin(positions)` is computed once per step by the model and shared by every layer;
`apply_rotary(x, cos, sin)` rotates the first `rotary_dim` features of each head.
A new scaling variant is one function `(rope_scaling dict, RopeBasis) -> (inv_freq, attention_factor)`
added to `_INV_FREQ_SCALERS`.

LongRoPE ("longrope", legacy "su"; Phi-3) has two frequency sets: the short factors while a sequence is within
`original_max_position_embeddings`, the long factors beyond it. `transformers` picks one set per forward call by
`max(position_ids) + 1`, so a prompt processed in one call uses the long set for all its tokens when it is longer
than the original length. Our positions are per token and prompts may be chunked, so the model passes, per token,
its sequence's length after this step or, while larger, the sequence's whole prompt length
(`context_lens_per_token`): every chunk of a long prompt uses the long set, as `transformers` does for the whole
prompt in one call, and a sequence that grows past the original length while decoding switches at that step. The
choice does not depend on what else is packed into the step. Keys already cached keep the rotation they were
written with, as in `transformers`' cached forward (its `generate` instead recomputes the sequence at the switch).

M-RoPE (Qwen2-VL; `rope_scaling.mrope_section`, `type` "mrope" or, as transformers 5 writes it, "default") gives
each token three positions (temporal, height, width) `[3, num_tokens]`: the rotary frequencies are split into
consecutive sections of `mrope_section` sizes, and section i turns with axis `i % 3`'s position. A token whose three
positions are equal (every text token) gets plain RoPE, so 1-D positions are accepted too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mistralrs.worker.forward_batch import ForwardBatch

# A scaling variant: (rope_scaling dict, RopeBasis) -> (inv_freq [rotary_dim // 2] float32, attention_factor).
InvFreqScaler = Callable[[dict[str, Any], "RopeBasis"], tuple[torch.Tensor, float]]


@dataclass(frozen=True)
class RopeBasis:
    """What every scaling variant may read besides its own `rope_scaling` parameters."""

    base: float  # rope_theta
    rotary_dim: int  # rotated features per head
    max_position_embeddings: int  # the model's (extended) context length

    def pos_freqs(self) -> torch.Tensor:
        """`base ** (2i / rotary_dim)`, float32 `[rotary_dim // 2]`; the default inv_freq is its reciprocal."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).to(torch.float32) / self.rotary_dim
        return self.base**exponents


def _scaling_param(scaling: dict[str, Any], key: str) -> Any:
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling.{key} is required for rope_type {rope_type_of(scaling)!r}")
    return scaling[key]


def _default_rope(_scaling: dict[str, Any], basis: RopeBasis) -> tuple[torch.Tensor, float]:
    """Plain RoPE."""
    return 1.0 / basis.pos_freqs(), 1.0


def _linear_rope(scaling: dict[str, Any], basis: RopeBasis) -> tuple[torch.Tensor, float]:
    """Position interpolation: positions are divided by `factor`."""
    return 1.0 / basis.pos_freqs() / float(_scaling_param(scaling, "factor")), 1.0


def _llama3_rope(scaling: dict[str, Any], basis: RopeBasis) -> tuple[torch.Tensor, float]:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    inv_freq = 1.0 / basis.pos_freqs()
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_rope(scaling: dict[str, Any], basis: RopeBasis) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, scale cos/sin by mscale."""
    original = float(scaling.get("original_max_position_embeddings") or basis.max_position_embeddings)
    factor = scaling.get("factor") or basis.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    dim = basis.rotary_dim

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(basis.base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = basis.pos_freqs()
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(scaling: dict[str, Any], basis: RopeBasis) -> float:
    """LongRoPE's cos/sin scale: `attention_factor`, else sqrt(1 + ln(factor) / ln(original length)), where
    `factor` defaults to max_position_embeddings / original_max_position_embeddings (as Phi-3 configs imply)."""
    original = float(_scaling_param(scaling, "original_max_position_embeddings"))
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor") or basis.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_inv_freq(scaling: dict[str, Any], basis: RopeBasis, which: str) -> torch.Tensor:
    """LongRoPE inverse frequencies `1 / (factor_i * base ** (2i / rotary_dim))` for `which` in
    ("short_factor", "long_factor"); ValueError naming the field when its length is not rotary_dim // 2."""
    factors = _scaling_param(scaling, which)
    if not isinstance(factors, (list, tuple)) or len(factors) != basis.rotary_dim // 2:
        length = len(factors) if isinstance(factors, (list, tuple)) else type(factors).__name__
        raise ValueError(f"rope_scaling.{which} must list rotary_dim // 2 = {basis.rotary_dim // 2} numbers, "
                         f"got {length}")
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * basis.pos_freqs())


def _longrope(scaling: dict[str, Any], basis: RopeBasis) -> tuple[torch.Tensor, float]:
    """LongRoPE's short set (the long set is added by `RotaryEmbedding`, see the module docstring)."""
    return longrope_inv_freq(scaling, basis, "short_factor"), _longrope_attention_factor(scaling, basis)


_INV_FREQ_SCALERS: dict[str, InvFreqScaler] = {
    "default": _default_rope,
    "mrope": _default_rope,  # M-RoPE: plain frequencies, split into sections by `mrope_section`
    "linear": _linear_rope,
    "llama3": _llama3_rope,
    "yarn": _yarn_rope,
    "longrope": _longrope,
    "su": _longrope,  # the name Phi-3 configs used before "longrope"
}
LONGROPE_TYPES = ("longrope", "su")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The rope type named by an HF `rope_scaling` dict (`rope_type`, or the legacy `type`); "default" when none."""
    if not scaling:
        return "default"
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    return "mrope" if rope_type == "default" and scaling.get("mrope_section") else rope_type


def mrope_section_of(scaling: dict[str, Any] | None, rotary_dim: int) -> tuple[int, ...] | None:
    """M-RoPE's `mrope_section` (frequencies per axis section), or None; ValueError naming the field when its sizes
    are not positive integers summing to rotary_dim // 2."""
    section = (scaling or {}).get("mrope_section")
    if section is None:
        return None
    if (not isinstance(section, (list, tuple)) or not section
            or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in section)
            or sum(section) != rotary_dim // 2):
        raise ValueError(f"rope_scaling.mrope_section must list positive integers summing to rotary_dim // 2 = "
                         f"{rotary_dim // 2}, got {section!r}")
    return tuple(section)


def supported_rope_types() -> list[str]:
    """The `rope_scaling.rope_type` values this package implements."""
    return sorted(_INV_FREQ_SCALERS)


def validate_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """ValueError naming `rope_scaling` when its type is not implemented."""
    rope_type = rope_type_of(scaling)
    if rope_type not in _INV_FREQ_SCALERS:
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
        basis = RopeBasis(float(base), rotary_dim, max_position_embeddings)
        inv_freq, self.attention_factor = _INV_FREQ_SCALERS[rope_type_of(scaling)](scaling or {}, basis)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [rotary_dim // 2] float32
        self.long_context_start: int | None = None  # LongRoPE: sequences longer than this use long_inv_freq
        self.long_inv_freq: torch.Tensor | None  # LongRoPE's long set [rotary_dim // 2] float32, else None
        long_inv_freq = None
        if rope_type_of(scaling) in LONGROPE_TYPES:
            long_inv_freq = longrope_inv_freq(scaling, basis, "long_factor").to(device)
            self.long_context_start = int(scaling["original_max_position_embeddings"])
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.mrope_section = mrope_section_of(scaling, rotary_dim)  # M-RoPE's section sizes, else None
        mrope_axis = None  # M-RoPE: [rotary_dim // 2] int64, the position axis (0..2) each frequency turns with
        if self.mrope_section is not None:
            mrope_axis = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in
                                    enumerate(self.mrope_section)]).to(device)
        self.register_buffer("mrope_axis", mrope_axis, persistent=False)

    @property
    def is_longrope(self) -> bool:
        """Whether the frequencies depend on the sequence length (LongRoPE)."""
        return self.long_inv_freq is not None

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, context_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin tables, each `[num_tokens, 1, rotary_dim]` in `dtype`.

        `positions` is `[num_tokens]`, or with M-RoPE also `[3, num_tokens]` (temporal, height, width).

        The sin table's first half is negated so that `apply_rotary` needs no negation:
        rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin).
        `context_lens` (`[num_tokens]`, each token's sequence length after this step) chooses LongRoPE's short or
        long set; without it a token decides by its own position (`position + 1`). Other types ignore it.
        """
        inv_freq = self.inv_freq[None, :]
        if self.long_inv_freq is not None:
            lengths = positions + 1 if context_lens is None else context_lens
            use_long = (lengths > self.long_context_start)[:, None]
            inv_freq = torch.where(use_long, self.long_inv_freq[None, :], inv_freq)
        if positions.dim() == 2:
            freqs = self._mrope_freqs(positions)
        else:
            freqs = positions.to(torch.float32)[:, None] * inv_freq  # [num_tokens, rotary_dim // 2]
        cos = freqs.cos()
        sin = freqs.sin()
        if self.attention_factor != 1.0:
            cos = cos * self.attention_factor
            sin = sin * self.attention_factor
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _mrope_freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """M-RoPE angles `[num_tokens, rotary_dim // 2]` from `[3, num_tokens]` positions: frequency j turns with
        the position of axis `mrope_axis[j]`."""
        if self.mrope_axis is None or positions.shape[0] != 3:
            raise ValueError(f"positions of shape {tuple(positions.shape)} need M-RoPE (rope_scaling.mrope_section) "
                             "and 3 rows")
        freqs = positions.to(torch.float32)[:, :, None] * self.inv_freq  # [3, num_tokens, rotary_dim // 2]
        axis = self.mrope_axis[None, None, :].expand(1, positions.shape[1], -1)
        return freqs.gather(0, axis)[0]


def context_lens_per_token(fb: ForwardBatch) -> torch.Tensor:
    """`[num_tokens]` int64: for each packed token, the length LongRoPE decides by: its sequence's context length
    after this step, or the sequence's whole prompt length while that is longer (a prompt's chunks all use the
    factors of the whole prompt)."""
    lengths = [max(n, p) for n, p, q in zip(fb.context_lens, fb.prompt_lens, fb.query_lens) for _ in range(q)]
    return torch.tensor(lengths, dtype=torch.int64, device=fb.positions.device)


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
