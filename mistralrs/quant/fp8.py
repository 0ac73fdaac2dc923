"""FP8 (E4M3) ISQ: one per-tensor scale, as mistral.rs v0.5.0's `FP8Linear` computes it (REFERENCE §3).

Facts of the reference (`mistralrs-quant/src/fp8`):

- The weight is first cast to bfloat16. amax = max(|max|, |min|) of that copy, in float32.
- quant_scale = 448 / amax (F8E4M3_MAX / amax) in float32, clamped to [-448, 448] (so an all-zero or tiny weight
  gets 448).
- The F8 weight is `(w_bf16 * bf16(quant_scale))` computed in bfloat16, then cast to F8E4M3 (nearest).
- dequant_w_scale = 1 / quant_scale (float32); dequant_x_scale is set to the same value.
- Without cuBLASLt the layer computes `x @ (w.to(x.dtype) * dequant_w_scale.to(x.dtype))^T`; with it, the
  activations are quantized to F8 per tensor the same way and the product scaled by both dequant scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs.quant.isq_state import Fp8Params
from mistralrs.quant.packed import PackedWeight

F8E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def _quant_scale(tensor_bf16: torch.Tensor) -> torch.Tensor:
    """float32 0-dim `448 / amax`, clamped to the F8E4M3 range (the reference's per-tensor scale)."""
    amax = tensor_bf16.abs().max().float()
    return torch.div(amax.new_tensor(F8E4M3_MAX), amax).clamp(-F8E4M3_MAX, F8E4M3_MAX)


def _to_f8(tensor_bf16: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`tensor * scale` in bfloat16, cast to float8_e4m3fn (clamped first: torch maps overflow to NaN)."""
    scaled = tensor_bf16 * scale.to(torch.bfloat16)
    return scaled.clamp(-F8E4M3_MAX, F8E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_quantize(weight: torch.Tensor, layer_dtype: torch.dtype) -> Fp8Params:
    """`weight` (`[out_features, in_features]`, any float dtype) as F8E4M3 with one per-tensor scale.

    `layer_dtype` is recorded in the result (the reference records the dtype its `FP8Linear` was built with,
    which v0.5.0's ISQ sets to F8E4M3); the computation itself uses the activations' dtype."""
    if not weight.is_floating_point():
        raise ValueError(f"FP8 quantization needs a floating-point weight, got {weight.dtype}")
    weight_bf16 = weight.to(torch.bfloat16)
    scale = _quant_scale(weight_bf16)
    dequant_scale = torch.reciprocal(scale)
    return Fp8Params(weight=_to_f8(weight_bf16, scale), dequant_w_scale=dequant_scale.item(),
                     dequant_x_scale=dequant_scale.item(), quant_scale=scale.item(), layer_dtype=layer_dtype)


def fp8_dequantize(params: Fp8Params, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the reference's plain path computes it: `w.to(dtype) * dequant_w_scale` in `dtype`."""
    return params.weight.to(dtype) * torch.tensor(params.dequant_w_scale, dtype=dtype, device=params.weight.device)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` can run F8E4M3 products on `device` (CUDA, compute capability >= 8.9)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class Fp8Weight(PackedWeight):
    """An F8E4M3 `[out_features, in_features]` weight with its per-tensor scale.

    Plain path: the weight is dequantized to the activation dtype a tile of output rows at a time, then
    `F.linear`. Fast path (`use_scaled_mm`, CUDA with FP8 tensor cores, feature counts multiples of 16): the
    activations are quantized to F8E4M3 per tensor like the weight and `torch._scaled_mm` multiplies them.
    """

    def __init__(self, params: Fp8Params, use_scaled_mm: bool = True, tile_elements: int = 1 << 22):
        if params.weight.dtype != torch.float8_e4m3fn or params.weight.dim() != 2:
            raise ValueError(f"Fp8Weight needs a 2-D float8_e4m3fn weight, got {params.weight.dtype} "
                             f"{list(params.weight.shape)}")
        self.params = params
        self.out_features, self.in_features = params.weight.shape
        self.tile_rows = max(1, tile_elements // max(1, self.in_features))  # output rows dequantized at once
        self.use_scaled_mm = (use_scaled_mm and scaled_mm_supported(params.weight.device)
                              and self.in_features % 16 == 0 and self.out_features % 16 == 0)
        self._w_scale = torch.tensor(params.dequant_w_scale, dtype=torch.float32, device=params.weight.device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and x.is_cuda:
            return self._scaled_matmul(x)
        weight = self.params.weight
        scale = torch.tensor(self.params.dequant_w_scale, dtype=x.dtype, device=weight.device)
        outputs = [F.linear(x, weight[start:start + self.tile_rows].to(x.dtype) * scale)
                   for start in range(0, self.out_features, self.tile_rows)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def _scaled_matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        x_scale = _quant_scale(rows)
        x_f8 = _to_f8(rows, x_scale)
        out = torch._scaled_mm(x_f8, self.params.weight.t(), scale_a=torch.reciprocal(x_scale),
                               scale_b=self._w_scale, out_dtype=torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.params.weight.numel()
