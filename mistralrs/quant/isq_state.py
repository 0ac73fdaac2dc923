"""The quantized state of one checkpoint linear layer after ISQ: what UQFF writes and reads back.

One `IsqLayerState` per checkpoint linear module (a shard of a fused projection is its own layer, as in the
reference's `get_layers()` list), in one of the four forms of REFERENCE §4.2. The ISQ linear methods
(`mistralrs/quant/isq.py`) produce and accept these; `mistralrs/quant/uqff.py` serializes them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Fp8Params:
    """The FP8 (E4M3, one per-tensor scale) fields of a layer."""

    weight: torch.Tensor        # float8_e4m3fn [out_features, in_features]
    dequant_w_scale: float      # 1 / quant_scale
    dequant_x_scale: float
    quant_scale: float          # 448 / absmax of the bf16 weight, clamped to the F8E4M3 range
    layer_dtype: torch.dtype    # the blob's layer dtype: v0.5.0's ISQ records float8_e4m3fn; not used in the math


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
