"""GGML K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and the scale searches they share, in vectorized torch.

The algorithms are llama.cpp's (`ggml/src/ggml-quants.c`): `quantize_row_*_ref` without an importance matrix,
`quantize_row_*_impl(..., quant_weights)` with one. Every group (sub-block) of every row is searched at once:
the per-group loops of the C code become tensor operations over a `[num_groups, group_len]` tensor, and the
loops over candidate scales stay Python loops over those tensors. The greedy per-element refinements
(`make_q3_quants`, `make_qp_quants`) visit the elements of a group in order, as the C code does, for all
groups at once. Sums are taken in float32 in torch's order, so results can differ from llama.cpp's in the
last bits; the tests bound the round-trip error instead of comparing bytes.

A K-quant super-block holds 256 weights. Block layouts (bytes, in order):

- Q2_K (84): scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), f16 d, f16 dmin.
- Q3_K (110): hmask[32] (high bit), qs[64] (low 2 bits), scales[12] (16 six-bit scales), f16 d.
- Q4_K (144): f16 d, f16 dmin, scales[12] (8 six-bit scales and mins), qs[128] (4-bit).
- Q5_K (176): f16 d, f16 dmin, scales[12], qh[32] (fifth bit), qs[128] (low 4 bits).
- Q6_K (210): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # weights per K-quant super-block
GROUP_MAX_EPS = 1e-15  # llama.cpp's threshold below which a group counts as all zero


def rdiv(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """`numerator / denominator` as one correctly rounded float32 division (torch's `scalar / tensor` multiplies
    by the reciprocal instead, which can differ from C in the last bit)."""
    return torch.div(denominator.new_tensor(numerator), denominator)


def _f32_step(base: float, delta: float, step: int) -> float:
    """C's float32 `base + delta * step` (each operation rounded to float32)."""
    return float(np.float32(base) + np.float32(delta) * np.float32(step))


def _f16_round(values: torch.Tensor) -> torch.Tensor:
    """float32 -> the float32 value of its nearest float16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)))."""
    return values.half().float()


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 `[n]` -> uint8 `[n, 2]` little-endian float16."""
    return values.reshape(-1, 1).half().view(torch.uint8)


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| max, the first element reaching it with its sign), both `[G, 1]`, over the last dimension."""
    amax, index = x.abs().max(dim=-1, keepdim=True)
    return amax, x.gather(-1, index)


def refine_codes(x: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor, low: float | None,
                 high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's greedy refinement of symmetric codes (make_q3_quants / make_qp_quants, up to 5 passes).

    For each element in order, the code that best fits the least-squares scale of the others replaces the
    current one when it raises `sumlx^2 / suml2`. `x`, `weights`, `codes` `[G, n]` -> (codes, sumlx, suml2).
    """
    xt, wt = x.t().contiguous(), weights.t().contiguous()  # [n, G]: one group per column
    lt = codes.t().contiguous()
    wxt = wt * xt
    sumlx, suml2 = (wxt * lt).sum(0), (wt * lt * lt).sum(0)
    for _ in range(5):
        num_changed = torch.zeros((), dtype=torch.int64, device=x.device)
        for i in range(xt.shape[0]):
            current = lt[i]
            slx = sumlx - wxt[i] * current
            sl2 = suml2 - wt[i] * current * current
            new = torch.round(xt[i] * sl2 / slx).clamp(low, high)
            slx_new = slx + wxt[i] * new
            sl2_new = sl2 + wt[i] * new * new
            accept = ((slx > 0) & (new != current) & (sl2_new > 0)
                      & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            lt[i] = torch.where(accept, new, current)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            num_changed += accept.sum()
        if not num_changed.item():
            break
    return lt.t(), sumlx, suml2


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes minimizing the weighted squared error (llama.cpp make_qx_quants, rmse_type 1).

    `x` `[G, n]`, `weights` `[G, n]` (None: x^2) -> (scale `[G]`, codes `[G, n]` in 0..2*nmax-1, float32);
    weight = scale * (code - nmax). All-zero groups get scale 0 and codes 0.
    """
    w = x * x if weights is None else weights
    amax, signed_max = _signed_absmax(x)
    is_zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(is_zero, 1.0, signed_max)
    wx = w * x

    def codes_for(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale * x).clamp_(-nmax, nmax - 1)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = codes_for(iscale)
        return (wx * codes).sum(-1, keepdim=True), (w * codes * codes).sum(-1, keepdim=True)

    best_iscale = rdiv(-nmax, signed_max)  # the codes are a function of the scale: keep the best one's [G, 1]
    sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = rdiv(-_f32_step(nmax, 0.1, step), signed_max)
        slx, sl2 = fit(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
    codes = torch.where(is_zero, 0.0, codes_for(best_iscale) + nmax)
    return torch.where(is_zero, 0.0, scale).squeeze(-1), codes


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes with greedy refinement (llama.cpp make_q3_quants, do_rmse): `x` `[G, n]` ->
    (scale `[G]`, codes `[G, n]` in 0..2*nmax-1); all-zero groups get scale 0 and codes 0."""
    amax, signed_max = _signed_absmax(x)
    is_zero = amax < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(is_zero, 1.0, signed_max))
    codes = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
    codes, sumlx, suml2 = refine_codes(x, x * x, codes, -nmax, nmax - 1)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(is_zero.squeeze(-1), 0.0, scale), torch.where(is_zero, 0.0, codes + nmax)


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine codes (scale, min) by a search over `nstep + 1` scales (llama.cpp make_qkx2_quants/make_qkx3_quants).

    `x`, `weights` `[G, n]` -> (scale `[G]`, the_min `[G]` (>= 0), codes `[G, n]` in 0..nmax);
    weight = scale * code - the_min. The error is weighted |diff| (`use_mad`) or weighted diff^2.
    """
    low = x.min(dim=-1, keepdim=True).values.clamp(max=0)
    high = x.max(dim=-1, keepdim=True).values
    flat = high <= low
    high = torch.where(flat, low + 1, high)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)

    def error(scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        diff = scale * codes + offset - x
        diff = diff.abs() if use_mad else diff * diff
        return (weights * diff).sum(-1, keepdim=True)

    def codes_for(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale * (x - offset)).clamp_(0, nmax)

    # the codes are a function of (iscale, shift): the search keeps the best pair, [G, 1] each
    best_iscale = rdiv(nmax, high - low)
    best_shift = low
    scale, best_min = rdiv(1.0, best_iscale), low
    best_error = error(scale, low, codes_for(best_iscale, low))
    for step in range(nstep + 1):
        # as in C, the candidates after an improvement are taken around the improved min
        iscale = rdiv(_f32_step(rmin, rdelta, step) + nmax, high - best_min)
        codes = codes_for(iscale, best_min)
        wl = weights * codes
        sum_l = wl.sum(-1, keepdim=True)
        sum_l2 = (wl * codes).sum(-1, keepdim=True)
        sum_xl = (wl * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        current = error(this_scale, this_min, codes)
        better = (det > 0) & (current < best_error)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_shift = torch.where(better, best_min, best_shift)
        best_error = torch.where(better, current, best_error)
        scale = torch.where(better, this_scale, scale)
        best_min = torch.where(better, this_min, best_min)
    best_codes = codes_for(best_iscale, best_shift)
    # a constant non-positive group is its min exactly: scale 0, codes 0
    scale, best_min = torch.where(flat, 0.0, scale), torch.where(flat, low, best_min)
    return scale.squeeze(-1), (-best_min).squeeze(-1), torch.where(flat, 0.0, best_codes)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative codes for non-negative values (llama.cpp make_qp_quants): quantizes the sub-block scales
    or mins of a super-block. `x`, `weights` `[G, n]` -> (scale `[G]`, codes `[G, n]` in 0..nmax)."""
    top = x.max(dim=-1, keepdim=True).values.clamp(min=0)
    is_zero = top < GROUP_MAX_EPS
    top = torch.where(is_zero, 1.0, top)

    def mse(iscale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        diff = x - rdiv(1.0, iscale) * codes
        return (weights * diff * diff).sum(-1, keepdim=True)

    best_iscale = rdiv(nmax, top)
    best_mse = mse(best_iscale, torch.round(best_iscale * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale = rdiv(_f32_step(nmax, 0.1, step), top)
        current = mse(iscale, torch.round(iscale * x).clamp_(max=nmax))
        better = current < best_mse
        best_mse = torch.where(better, current, best_mse)
        best_iscale = torch.where(better, iscale, best_iscale)
    codes = torch.round(best_iscale * x).clamp_(max=nmax)
    codes, sumlx, suml2 = refine_codes(x, weights, codes, None, nmax)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(is_zero.squeeze(-1), 0.0, scale), torch.where(is_zero, 0.0, codes).clamp_(min=0)


def _requantize(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, codes: torch.Tensor,
                low: int, high: int, shift: int) -> torch.Tensor:
    """Codes against the stored (f16-rounded) sub-block scales: round((x + offset) / step) clamped, plus `shift`.

    `x`, `codes` `[B, S, n]`, `step`/`offset` `[B, S]`; sub-blocks whose step is 0 keep `codes`."""
    shifted = x if offset is None else x + offset.unsqueeze(-1)
    new = torch.round(shifted / step.unsqueeze(-1)).clamp_(low, high) + shift
    return torch.where((step != 0).unsqueeze(-1), new, codes)


def _super_block_weights(x: torch.Tensor, importance: torch.Tensor, sigma_factor: float, sub: int) -> torch.Tensor:
    """llama.cpp's imatrix weights qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) over the super-block.

    `x`, `importance` `[B, 256]` -> `[B * 256 / sub, sub]`."""
    sigma2 = sigma_factor * (x * x).sum(-1, keepdim=True) / QK_K
    return (importance * torch.sqrt(sigma2 + x * x)).reshape(-1, sub)


def _pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """int32 `[B, 256]` codes 0..3 -> uint8 `[B, 64]`: byte l of each 128 holds codes l, l+32, l+64, l+96."""
    quarters = codes.reshape(-1, 2, 4, 32)
    packed = quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6)
    return packed.reshape(-1, 64).to(torch.uint8)


def _pack_4bit_pairs(codes: torch.Tensor) -> torch.Tensor:
    """int32 `[B, 256]` codes 0..15 -> uint8 `[B, 128]`: byte l of each 64 holds codes l (low) and l+32 (high)."""
    halves = codes.reshape(-1, 4, 2, 32)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)


def _pack_k4_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """int32 `[B, 8]` six-bit scales and mins -> uint8 `[B, 12]` (llama.cpp's Q4_K/Q5_K scale packing)."""
    low_s, high_s = scales[:, :4], scales[:, 4:]
    low_m, high_m = mins[:, :4], mins[:, 4:]
    first = low_s | ((high_s >> 4) << 6)
    second = low_m | ((high_m >> 4) << 6)
    third = (high_s & 0xF) | ((high_m & 0xF) << 4)
    return torch.cat([first, second, third], dim=1).to(torch.uint8)


def _pack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """int32 `[B, 16]` six-bit scales -> uint8 `[B, 12]`: low nibbles of j and j+8 in byte j (j < 8), the two high
    bits of scale j in byte 8 + j % 4 at bit 2 * (j // 4)."""
    low = (scales[:, :8] & 0xF) | ((scales[:, 8:] & 0xF) << 4)
    high_bits = (scales >> 4).reshape(-1, 4, 4)  # [B, j // 4, j % 4]
    high = high_bits[:, 0] | (high_bits[:, 1] << 2) | (high_bits[:, 2] << 4) | (high_bits[:, 3] << 6)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def quantize_q2_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, 256]` super-blocks (importance `[B, 256]` or None) -> uint8 `[B, 84]` Q2_K blocks."""
    num_blocks = x.shape[0]
    sub = x.reshape(-1, 16)
    if importance is None:
        scales, mins, codes = make_qkx_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(num_blocks, 16), mins.reshape(num_blocks, 16)
        max_scale = scales.max(-1, keepdim=True).values.clamp(min=0)
        max_min = mins.max(-1, keepdim=True).values.clamp(min=0)
        scale_codes = torch.where(max_scale > 0, torch.round(rdiv(15.0, max_scale) * scales), 0.0).clamp_(0, 15)
        min_codes = torch.where(max_min > 0, torch.round(rdiv(15.0, max_min) * mins), 0.0).clamp_(0, 15)
        d, dmin = max_scale.squeeze(-1) / 15, max_min.squeeze(-1) / 15
    else:
        weights = _super_block_weights(x, importance, 1.0, 16)
        scales, mins, codes = make_qkx_quants(sub, weights, 3, -0.9, 0.05, 36, use_mad=False)
        sub_weights = weights.sum(-1).reshape(num_blocks, 16)
        d, scale_codes = make_qp_quants(scales.reshape(num_blocks, 16), 15, sub_weights)
        dmin, min_codes = make_qp_quants(mins.reshape(num_blocks, 16), 15, sub_weights)
    d, dmin = _f16_round(d), _f16_round(dmin)
    codes = _requantize(x.reshape(num_blocks, 16, 16), d.unsqueeze(-1) * scale_codes,
                        dmin.unsqueeze(-1) * min_codes, codes.reshape(num_blocks, 16, 16), 0, 3, 0)
    packed_scales = (scale_codes.int() | (min_codes.int() << 4)).to(torch.uint8)
    return torch.cat([packed_scales, _pack_2bit(codes.reshape(num_blocks, QK_K).int()),
                      f16_bytes(d), f16_bytes(dmin)], dim=1)


def quantize_q3_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, 256]` super-blocks (importance `[B, 256]` or None) -> uint8 `[B, 110]` Q3_K blocks."""
    num_blocks = x.shape[0]
    sub = x.reshape(-1, 16)
    if importance is None:
        scales, codes = make_q3_quants(sub, 4)
        scales = scales.reshape(num_blocks, 16)
        _, max_scale = _signed_absmax(scales)
        has_scale = max_scale != 0
        iscale = rdiv(-32.0, torch.where(has_scale, max_scale, 1.0))
        scale_codes = torch.where(has_scale, torch.round(iscale * scales).clamp_(-32, 31) + 32, 0.0)
        d = torch.where(has_scale, rdiv(1.0, iscale), 0.0).squeeze(-1)
    else:
        weights = _super_block_weights(x, importance, 2.0, 16)
        scales, codes = make_qx_quants(sub, 4, weights)
        d, scale_codes = make_qx_quants(scales.reshape(num_blocks, 16), 32, weights.sum(-1).reshape(num_blocks, 16))
    d = _f16_round(d)
    codes = _requantize(x.reshape(num_blocks, 16, 16), d.unsqueeze(-1) * (scale_codes - 32), None,
                        codes.reshape(num_blocks, 16, 16), -4, 3, 4).reshape(num_blocks, QK_K).int()
    high = (codes > 3).int().reshape(num_blocks, 8, 32)  # bit b of hmask[m] is code 32 * b + m
    hmask = sum(high[:, bit] << bit for bit in range(8)).to(torch.uint8)
    return torch.cat([hmask, _pack_2bit(codes & 3), _pack_q3_scales(scale_codes.int()), f16_bytes(d)], dim=1)


def _quantize_k_affine(x: torch.Tensor, importance: torch.Tensor | None, nmax: int, rmin: float, nstep: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q4_K/Q5_K search: `[B, 256]` -> (codes int32 `[B, 256]` in 0..nmax, packed scales uint8 `[B, 12]`,
    d `[B]`, dmin `[B]` (f16-rounded))."""
    num_blocks = x.shape[0]
    sub = x.reshape(-1, 32)
    if importance is None:
        av_x = torch.sqrt((sub * sub).sum(-1, keepdim=True) / 32)
        scales, mins, codes = make_qkx_quants(sub, av_x + sub.abs(), nmax, rmin, 0.1, nstep, use_mad=False)
        scales, mins = scales.reshape(num_blocks, 8), mins.reshape(num_blocks, 8)
        max_scale = scales.max(-1, keepdim=True).values.clamp(min=0)
        max_min = mins.max(-1, keepdim=True).values.clamp(min=0)
        inv_scale = torch.where(max_scale > 0, rdiv(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, rdiv(63.0, max_min), 0.0)
        scale_codes = torch.round(inv_scale * scales).clamp_(0, 63)
        min_codes = torch.round(inv_min * mins).clamp_(0, 63)
        d, dmin = max_scale.squeeze(-1) / 63, max_min.squeeze(-1) / 63
    else:
        weights = _super_block_weights(x, importance, 2.0, 32)
        scales, mins, codes = make_qkx_quants(sub, weights, nmax, -0.9, 0.05, 36, use_mad=False)
        sub_weights = weights.sum(-1).reshape(num_blocks, 8)
        d, scale_codes = make_qp_quants(scales.reshape(num_blocks, 8), 63, sub_weights)
        dmin, min_codes = make_qp_quants(mins.reshape(num_blocks, 8), 63, sub_weights)
    d, dmin = _f16_round(d), _f16_round(dmin)
    codes = _requantize(x.reshape(num_blocks, 8, 32), d.unsqueeze(-1) * scale_codes, dmin.unsqueeze(-1) * min_codes,
                        codes.reshape(num_blocks, 8, 32), 0, nmax, 0)
    return codes.reshape(num_blocks, QK_K).int(), _pack_k4_scales(scale_codes.int(), min_codes.int()), d, dmin


def quantize_q4_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, 256]` super-blocks (importance `[B, 256]` or None) -> uint8 `[B, 144]` Q4_K blocks."""
    codes, scales, d, dmin = _quantize_k_affine(x, importance, 15, -1.0, 20)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), scales, _pack_4bit_pairs(codes)], dim=1)


def quantize_q5_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, 256]` super-blocks (importance `[B, 256]` or None) -> uint8 `[B, 176]` Q5_K blocks."""
    codes, scales, d, dmin = _quantize_k_affine(x, importance, 31, -0.5, 15)
    high = (codes >> 4).reshape(-1, 4, 2, 32)  # [B, chunk of 64, half, l]: bit 2 * chunk + half of qh[l]
    qh = sum((high[:, chunk, 0] << (2 * chunk)) | (high[:, chunk, 1] << (2 * chunk + 1)) for chunk in range(4))
    return torch.cat([f16_bytes(d), f16_bytes(dmin), scales, qh.to(torch.uint8), _pack_4bit_pairs(codes & 0xF)], dim=1)


def quantize_q6_k(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, 256]` super-blocks (importance `[B, 256]` or None) -> uint8 `[B, 210]` Q6_K blocks."""
    num_blocks = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, codes = make_qx_quants(sub, 32, None if importance is None else importance.reshape(-1, 16))
    scales = scales.reshape(num_blocks, 16)
    max_abs, max_scale = _signed_absmax(scales)
    is_zero = max_abs < GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(is_zero, 1.0, max_scale))
    d = _f16_round(torch.where(is_zero, 0.0, rdiv(1.0, iscale))).squeeze(-1)
    scale_codes = torch.where(is_zero, 0.0, torch.round(iscale * scales).clamp_(-128, 127))
    codes = _requantize(x.reshape(num_blocks, 16, 16), d.unsqueeze(-1) * scale_codes, None,
                        codes.reshape(num_blocks, 16, 16), -32, 31, 32)
    codes = torch.where(is_zero.unsqueeze(-1), 0.0, codes).reshape(num_blocks, 2, 4, 32).int()
    low, high = codes & 0xF, codes >> 4  # [B, half of 128, quarter, l]
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat([ql.reshape(num_blocks, 128).to(torch.uint8), qh.reshape(num_blocks, 64).to(torch.uint8),
                      scale_codes.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)
