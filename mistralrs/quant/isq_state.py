"""The quantized state of one checkpoint linear layer after ISQ: what UQFF writes and reads back.

One `IsqLayerState` per checkpoint linear module (a shard of a fused projection is its own layer, as in the
reference's `get_layers()` list), in one of the four forms of REFERENCE §4.2. The ISQ linear methods
(`mistralrs/quant/isq.py`) produce and accept these; `mistralrs/quant/uqff.py` serializes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mistralrs.quant.ggml_tensor import GGMLTensor


@dataclass
class HqqParams:
    """The HQQ fields of a layer (REFERENCE §3: group size 64, axis 0, 10 steps, round_zeros off, channel_wise on)."""

    w_q: torch.Tensor           # packed quantized codes, as the UQFF blob stores them
    scales: torch.Tensor        # per-group scales
    zeros: torch.Tensor         # per-group zero points
    shape: tuple[int, ...]      # the dequantized weight's shape [out_features, in_features]
    bits: int                   # 4 or 8
    group_size: int = 64
    axis: int = 0
    optimization_steps: int = 10  # 0 = none
    round_zeros: bool = False
    channel_wise: bool = True

    # A tensor-parallel rank's piece (the `QuantizedPiece` cuts of mistralrs/distributed/parallel.py). Group j of the
    # `[group_size, N]` code view holds the element at one position of each band of `rows / group_size` weight rows,
    # so a range of columns keeps whole groups (when the rows make whole bands) and a range of rows never does.

    def narrow_rows(self, start: int, size: int) -> torch.Tensor:
        """Rows `[start, start + size)` of the weight, dequantized to float32 (no row range is whole groups)."""
        return self.dequantize(torch.float32).narrow(0, start, size)

    def columns_aligned(self, start: int, size: int) -> bool:
        """Whether columns `[start, start + size)` keep whole groups: a 2-D weight whose rows are whole bands."""
        return len(self.shape) == 2 and self.shape[0] % self.group_size == 0 and size > 0

    def narrow_columns(self, start: int, size: int) -> HqqParams:
        """Columns `[start, start + size)` as HQQ groups (`columns_aligned` must hold): each code row is its band's
        rows back to back, so every code row keeps the same columns of each of its weight rows."""
        if not self.columns_aligned(start, size):
            raise ValueError(f"columns [{start}, {start + size}) of an HQQ weight {list(self.shape)} are not whole "
                             f"groups of {self.group_size}")
        band, width = self.shape[0] // self.group_size, self.shape[1]

        def cut(tensor: torch.Tensor) -> torch.Tensor:  # [..., band * width] -> [..., band * size]
            lead = tensor.shape[:-1]
            return tensor.reshape(*lead, band, width)[..., start:start + size].reshape(*lead, band * size)

        return replace(self, w_q=cut(self.w_q), scales=cut(self.scales), zeros=cut(self.zeros),
                       shape=(self.shape[0], size))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense `dtype` tensor."""
        from mistralrs.quant.hqq import hqq_dequantize
        return hqq_dequantize(self, dtype)


@dataclass
class Fp8Params:
    """The FP8 (E4M3, one per-tensor scale) fields of a layer."""

    weight: torch.Tensor        # float8_e4m3fn [out_features, in_features]
    dequant_w_scale: float      # 1 / quant_scale
    dequant_x_scale: float
    quant_scale: float          # 448 / absmax of the bf16 weight, clamped to the F8E4M3 range
    layer_dtype: torch.dtype    # the blob's layer dtype: v0.5.0's ISQ records float8_e4m3fn; not used in the math

    # A tensor-parallel rank's piece (the `QuantizedPiece` cuts of mistralrs/distributed/parallel.py): one scale for
    # the whole tensor, so any range of rows or columns keeps it.

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape `[out_features, in_features]`."""
        return tuple(self.weight.shape)

    def narrow_rows(self, start: int, size: int) -> Fp8Params:
        """Rows `[start, start + size)`, with the same scales."""
        return replace(self, weight=self.weight.narrow(0, start, size))

    def columns_aligned(self, start: int, size: int) -> bool:
        """Always: the scale is per tensor."""
        return size > 0

    def narrow_columns(self, start: int, size: int) -> Fp8Params:
        """Columns `[start, start + size)`, with the same scales."""
        return replace(self, weight=self.weight.narrow(-1, start, size).contiguous())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense `dtype` tensor."""
        from mistralrs.quant.fp8 import fp8_dequantize
        return fp8_dequantize(self, dtype)


@dataclass
class IsqLayerState:
    """One layer's weights in exactly one of the forms: `ggml` (GGUF-type ISQ), `dense` (unquantized), `hqq`, `fp8`."""

    bias: torch.Tensor | None = None  # float32, kept unquantized in every form
    ggml: GGMLTensor | None = None    # GGML blocks of the weight [out_features, in_features]
    dense: torch.Tensor | None = None  # an unquantized weight [out_features, in_features]
    hqq: HqqParams | None = None
    fp8: Fp8Params | None = None

    def __post_init__(self):
        forms = [name for name in ("ggml", "dense", "hqq", "fp8") if getattr(self, name) is not None]
        if len(forms) != 1:
            raise ValueError(f"IsqLayerState needs exactly one of ggml/dense/hqq/fp8, got {forms or 'none'}")

    @property
    def kind(self) -> str:
        """'ggml', 'dense', 'hqq' or 'fp8'."""
        return next(name for name in ("ggml", "dense", "hqq", "fp8") if getattr(self, name) is not None)

    @property
    def weight(self) -> GGMLTensor | torch.Tensor | HqqParams | Fp8Params:
        """The weight in its form."""
        return getattr(self, self.kind)

    @classmethod
    def of(cls, weight: GGMLTensor | torch.Tensor | HqqParams | Fp8Params, bias: torch.Tensor | None
           ) -> IsqLayerState:
        """The state holding `weight` in the form its type says (a tensor: unquantized) and `bias`."""
        forms = {GGMLTensor: "ggml", HqqParams: "hqq", Fp8Params: "fp8"}
        return cls(bias=bias, **{forms.get(type(weight), "dense"): weight})

    def owned(self) -> IsqLayerState:
        """A copy whose tensors share no storage with this one's (a piece cut from a layer read from a file then
        does not keep the whole layer's bytes alive)."""
        weight = self.weight
        if isinstance(weight, GGMLTensor):
            weight = weight.with_rows(weight.data.clone())
        elif isinstance(weight, HqqParams):
            weight = replace(weight, w_q=weight.w_q.clone(), scales=weight.scales.clone(), zeros=weight.zeros.clone())
        elif isinstance(weight, Fp8Params):
            weight = replace(weight, weight=weight.weight.clone())
        else:
            weight = weight.clone()
        return IsqLayerState.of(weight, None if self.bias is None else self.bias.clone())
