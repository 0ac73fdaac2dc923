"""The linear method shared by the quant methods whose weights are `PackedWeight`s (GGUF, ISQ, and UQFF's ISQ).

A `PackedLinearMethod` registers the layer's bias, checks each checkpoint tensor against its shard, and once the
layer's shards have arrived holds its `weights`: `PackedWeight`s over consecutive output rows. `apply` is each
weight's product, concatenated along the output rows, plus the bias (one `F.linear` for a single dense weight);
`fused_parts` hands the fused C++ decoder layer each weight's own fused form for the same product.
A subclass says only how its shards arrive and are packed (`store_weight`): `GGUFLinearMethod` keeps the
checkpoint's GGML blocks or dense tensors, `IsqLinearMethod` quantizes each shard on arrival.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.linear import Linear, LinearMethodBase, copy_checked
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.packed import DenseWeight, FusedLinearPart, PackedWeight, matmul_all


class PackedLinearMethod(LinearMethodBase):
    """One layer's weights as `PackedWeight`s (`weights`, in output-row order, once every shard has arrived).

    One instance per layer. Subclasses implement `store_weight`, and may narrow `shard_range` and `dense_weight`.
    """

    def __init__(self, use_fast_kernels: bool = True):
        self.use_fast_kernels = use_fast_kernels  # False: the plain twin (every shard dense at load, F.linear)
        self.weights: list[PackedWeight] = []  # compute forms over consecutive output rows, once loaded
        self._dtype = torch.float32  # the activation dtype (dense forms are kept in it)
        self._device = torch.device("cpu")  # where the packed weights live

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device | str) -> None:
        self._dtype, self._device = dtype, torch.device(device)
        bias = torch.zeros(layer.out_features, dtype=dtype, device=device) if layer.has_bias else None
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def shard_range(self, layer: Linear, shard_index: int | None) -> tuple[int, int]:
        """(row offset, rows) of the checkpoint tensor for `shard_index` (None: the whole weight at once, a fused
        one included, as Phi-3's qkv_proj)."""
        return (0, layer.out_features) if shard_index is None else layer.shard_range(shard_index)

    def load_weight(self, layer: Linear, param_name: str, loaded: torch.Tensor | GGMLTensor,
                    shard_index: int | None) -> None:
        offset, size = self.shard_range(layer, shard_index)
        name = f"{layer.prefix}.{param_name}" + ("" if shard_index is None else f"[shard {shard_index}]")
        if param_name == "bias":
            if layer.bias is None:
                raise ValueError(f"{layer.prefix or 'linear'}: checkpoint has a 'bias' the layer was built without")
            copy_checked(layer.bias.narrow(0, offset, size), loaded, name)
            self.bias_loaded(shard_index, layer.bias.narrow(0, offset, size))
            return
        if tuple(loaded.shape) != (size, layer.in_features):
            raise ValueError(f"weight {name!r} has shape {tuple(loaded.shape)}, expected {(size, layer.in_features)}")
        self.store_weight(layer, shard_index, loaded)

    def store_weight(self, layer: Linear, shard_index: int | None, loaded: torch.Tensor | GGMLTensor) -> None:
        """Keeps the weight of shard `shard_index` (its shape checked); sets `weights` once every shard is in."""
        raise NotImplementedError

    def bias_loaded(self, shard_index: int | None, bias: torch.Tensor) -> None:
        """Called with the layer's bias rows of shard `shard_index` once the checkpoint's bias is copied in."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.weights:
            raise ValueError(f"{layer.prefix or 'linear'}: weights were not loaded (shards still missing)")
        if len(self.weights) == 1 and isinstance(self.weights[0], DenseWeight):
            return F.linear(x, self.weights[0].weight, layer.bias)
        y = matmul_all(self.weights, x)
        return y if layer.bias is None else y + layer.bias

    def apply_float(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.weights or not all(weight.float_sums for weight in self.weights):
            return super().apply_float(layer, x)
        y = matmul_all(self.weights, x.float())
        return y if layer.bias is None else y + layer.bias.float()

    def dense_weight(self, layer: Linear) -> torch.Tensor | None:
        if len(self.weights) == 1 and isinstance(self.weights[0], DenseWeight):
            return self.weights[0].weight
        return None

    def row_lookup(self, layer: Linear):
        return self.weights[0].row_lookup() if len(self.weights) == 1 else None

    def fused_parts(self, layer: Linear) -> list[FusedLinearPart] | None:
        """Each packed weight's own fused form (`PackedWeight.fused_part`); None when one has none."""
        parts = [weight.fused_part() for weight in self.weights]
        return None if not parts or any(part is None for part in parts) else parts
