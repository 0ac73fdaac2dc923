"""HQQ (Half-Quadratic Quantization) of a linear weight, in the form mistral.rs v0.5.0 stores it (HQQ4, HQQ8).

Facts of the reference (`mistralrs-quant/src/hqq`), which UQFF files written by it depend on:

- Grouping (`channel_wise`, axis 0, group size 64): the weight, flattened row-major, is viewed as
  `[64, numel / 64]`; group j is column j of that view, i.e. the flat elements j, j + N, j + 2N, ... with
  N = numel / 64. Per group: min, max, scale = (2^bits - 1) / (max - min) clamped to [0, 2e4], zero = -min * scale.
- `optimize_weights_proximal_legacy` refines the zeros only (lp norm 0.7, beta 10 growing by 1.01 per step),
  for up to `optimization_steps` steps, stopping at the first step whose mean |W - W_r| does not improve.
- Codes: round(W * scale + zero) clamped to [0, 2^bits - 1] (float32 math, rounding half away from zero).
- Storage: `w_q` uint8; 8 bits: `[64, N]`; 4 bits: `[32, N]` with row i holding code row i in the high nibble
  and code row i + 32 in the low nibble. `scales` = 1 / scale and `zeros`, float32 `[1, N]`.
- Dequantization: W = (code - zero) * scales, reshaped to the weight's shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs.quant.isq_state import HqqParams
from mistralrs.quant.packed import PackedWeight

HQQ_GROUP_SIZE = 64  # ISQ's group size (REFERENCE §3)
HQQ_OPTIMIZATION_STEPS = 10  # ISQ's optimization steps
HQQ_BITS = (4, 8)  # the HQQ widths ISQ offers (HQQ4, HQQ8)

# Shrinkage operator parameters of the reference's optimizer (HQQ's defaults).
_LP_NORM = 0.7
_BETA = 10.0
_KAPPA = 1.01


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """Rust's `f32::round` (candle's `round`): half away from zero."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized soft-thresholding: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    magnitude = x.abs()
    return torch.sign(x) * F.relu(magnitude - (1.0 / beta) * magnitude.pow(_LP_NORM - 1.0))


def _optimize_zeros(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: float,
                    steps: int) -> torch.Tensor:
    """The reference's proximal refinement of the zeros (`w` `[64, N]`, `scale`/`zero` `[1, N]`)."""
    beta = _BETA
    best_error = 1e4
    for _ in range(steps):
        codes = _round_half_away(w * scale + zero).clamp_(0, max_code)
        restored = (codes - zero) / scale
        shrunk = _shrink_lp(w - restored, beta)
        zero = (codes - (w - shrunk) * scale).mean(dim=0, keepdim=True)
        beta *= _KAPPA
        error = (w - restored).abs().mean().item()
        if error < best_error:
            best_error = error
        else:
            break
    return zero


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """float codes `[64, N]` -> uint8 `w_q` (8 bits: `[64, N]`; 4 bits: `[32, N]`, high nibble = rows 0..31)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    half = codes.shape[0] // 2
    return (codes[:half] << 4) | codes[half:]


def _unpack(w_q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 `w_q` -> uint8 codes `[64, N]` (the inverse of `_pack`)."""
    if bits == 8:
        return w_q
    return torch.cat([w_q >> 4, w_q & 0x0F])


def _check_bits(bits: int) -> None:
    if bits not in HQQ_BITS:
        raise ValueError(f"HQQ bits must be one of {HQQ_BITS}, got {bits}")


def hqq_quantize(weight: torch.Tensor, bits: int, optimization_steps: int = HQQ_OPTIMIZATION_STEPS) -> HqqParams:
    """HQQ-quantize `weight` (`[out_features, in_features]`, any float dtype) with `bits` 4 or 8, group size 64
    along axis 0, `optimization_steps` refinement steps (0: none), round_zeros off, channel_wise on.

    Math in float32 on the weight's device; the result lives there too."""
    _check_bits(bits)
    if weight.numel() % HQQ_GROUP_SIZE:
        raise ValueError(f"HQQ weight of shape {list(weight.shape)}: the number of elements must be a multiple "
                         f"of the group size {HQQ_GROUP_SIZE}")
    if optimization_steps < 0:
        raise ValueError(f"optimization_steps must be >= 0, got {optimization_steps}")
    w = weight.to(torch.float32).reshape(HQQ_GROUP_SIZE, -1)  # [64, N]: group j is column j
    low = w.min(dim=0, keepdim=True).values
    high = w.max(dim=0, keepdim=True).values
    max_code = float(2 ** bits - 1)
    scale = (max_code / (high - low)).clamp(0.0, 2e4)
    zero = -low * scale
    zero = _optimize_zeros(w, scale, zero, max_code, optimization_steps)
    codes = _round_half_away(w * scale + zero).clamp_(0, max_code)
    return HqqParams(w_q=_pack(codes, bits), scales=1.0 / scale, zeros=zero, shape=tuple(weight.shape), bits=bits,
                     group_size=HQQ_GROUP_SIZE, axis=0, optimization_steps=optimization_steps, round_zeros=False,
                     channel_wise=True)


def _check_layout(params: HqqParams) -> None:
    """The layout this module reads: axis 0, channel-wise, group size = rows of the unpacked codes."""
    _check_bits(params.bits)
    if params.axis != 0 or not params.channel_wise:
        raise ValueError(f"HQQ layout axis={params.axis} channel_wise={params.channel_wise} is not supported; "
                         "accepted: axis=0 with channel_wise=True (what ISQ writes)")
    rows = params.w_q.shape[0] * (2 if params.bits == 4 else 1)
    if rows != params.group_size:
        raise ValueError(f"HQQ w_q of shape {list(params.w_q.shape)} does not hold {params.group_size}-element groups "
                         f"of {params.bits}-bit codes")


def hqq_dequantize(params: HqqParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `params` encodes, as a `dtype` tensor of `params.shape` (float32 math, cast at the end)."""
    _check_layout(params)
    codes = _unpack(params.w_q, params.bits).to(torch.float32)
    weight = (codes - params.zeros.float()) * params.scales.float()
    return weight.reshape(params.shape).to(dtype)


class HqqWeight(PackedWeight):
    """An HQQ-quantized `[out_features, in_features]` weight kept as its codes; `matmul` dequantizes a tile of
    output rows at a time (one group row of the `[64, N]` code view covers `out_features / 64` whole rows).

    When `out_features` is not a multiple of 64 the group rows do not align with weight rows and the whole
    weight is dequantized per call (the plain path, `hqq_dequantize` then `F.linear`)."""

    def __init__(self, params: HqqParams, tile_elements: int = 1 << 20):
        _check_layout(params)
        self.params = params
        self.out_features = params.shape[0]
        self.in_features = params.shape[-1]
        self.tile_elements = tile_elements  # most weights dequantized at once by `matmul`
        self.tiled = len(params.shape) == 2 and self.out_features % params.group_size == 0

    def _tile(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        """Group rows `[first, last)` (not straddling the 4-bit halves) dequantized: `[rows, in_features]`."""
        p = self.params
        if p.bits == 8:
            codes = p.w_q[first:last]
        elif first < p.group_size // 2:
            codes = p.w_q[first:last] >> 4
        else:
            codes = p.w_q[first - p.group_size // 2:last - p.group_size // 2] & 0x0F
        tile = (codes.to(torch.float32) - p.zeros.float()) * p.scales.float()  # [last - first, N]
        return tile.reshape(-1, self.in_features).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tiled:
            return F.linear(x, hqq_dequantize(self.params, x.dtype))
        half = self.params.group_size // 2  # tiles stay within one half (the high or the low 4-bit nibbles)
        step = max(1, min(half, self.tile_elements // self.params.w_q.shape[1]))
        outputs = [F.linear(x, self._tile(start, min(start + step, base + half), x.dtype))
                   for base in (0, half) for start in range(base, base + half, step)]
        return torch.cat(outputs, dim=-1)

    def nbytes(self) -> int:
        p = self.params
        return sum(t.numel() * t.element_size() for t in (p.w_q, p.scales, p.zeros))
