"""The forms a linear weight takes for one matmul kernel, behind one small interface.

A quantized linear method keeps, per layer, one or more `PackedWeight`s covering consecutive output rows
(one for a plain layer or a fused projection whose shards share a type; several when fused shards differ).
`DenseWeight` is the plain form every fast form is tested against (DESIGN rule 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PackedWeight:
    """A `[out_features, in_features]` weight stored for one kernel; `matmul(x)` is `x @ W^T`."""

    out_features: int  # output rows covered by this weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., in_features]` (the model dtype) -> `[..., out_features]`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of weight storage."""
        raise NotImplementedError


class DenseWeight(PackedWeight):
    """A dense weight in the activation dtype; `F.linear`."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out_features, in_features]
        self.out_features = weight.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
