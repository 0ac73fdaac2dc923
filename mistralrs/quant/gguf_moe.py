"""Mixture-of-experts weights from a GGUF file: each expert's GGML blocks kept quantized, one kernel per weight.

llama.cpp stores a layer's experts merged, `ffn_{gate,up,down}_exps [n_expert, out, in]`; the GGUF loader
splits them into the checkpoint's per-expert names (each a run of whole block rows, no copy), so they reach
`FusedMoE.load_weight` one expert and projection at a time. `GGUFMoEMethod` packs each with
`mistralrs.quant.gguf_linear.pack_checkpoint_tensors`: per expert, gate and up concatenated into one weight when
their types agree (two otherwise), and down. `GGUFModelQuantConfig` gives every `Linear` its GGUF method, as
`GGUFQuantConfig` does, and every `FusedMoE` a `GGUFMoEMethod`.

The math is `PackedMoEMethod`'s (mistralrs/quant/packed_moe.py): the (token, slot) assignments are sorted by
expert and each expert that received tokens runs its packed weights once over its rows; the "reference" backend
loops over tokens. With `use_fast_kernels` off, every weight is dequantized once at load (the plain twin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.gguf_linear import CheckpointTensor, GGUFQuantConfig, pack_checkpoint_tensors
from mistralrs.quant.packed import PackedWeight
from mistralrs.quant.packed_moe import PackedMoEMethod


class GGUFMoEMethod(PackedMoEMethod):
    """Per-expert packed weights from GGUF tensors: `w13[e]` (gate rows, then up rows; one or two
    `PackedWeight`s) and `w2[e]`, each packed as soon as its tensors have arrived.

    One instance per `FusedMoE` layer.
    """

    def __init__(self, use_fast_kernels: bool = True):
        super().__init__(use_fast_kernels)
        self._pending: list[dict[str, CheckpointTensor]] = []  # per expert: gate/up until both have arrived

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        super().create_weights(layer, dtype, device)
        self._pending = [{} for _ in range(layer.num_experts)]

    def pack_shards(self, shards: list[CheckpointTensor]) -> list[PackedWeight]:
        return pack_checkpoint_tensors(shards, self._dtype, self._device, self.use_fast_kernels)

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: CheckpointTensor) -> None:
        self.check_shape(layer, expert_id, projection, tuple(loaded.shape), "weight")
        pending = self._pending[expert_id]
        pending[projection] = loaded
        for role in self.pack_arrival(expert_id, pending, projection):
            del pending[role]


@dataclass(frozen=True)
class GGUFModelQuantConfig(GGUFQuantConfig):
    """`GGUFQuantConfig` for a whole GGUF model: every `Linear` and every `FusedMoE` keeps GGML blocks."""

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        for module in model.modules():
            if isinstance(module, FusedMoE):
                module.set_quant_method(GGUFMoEMethod(self.use_fast_kernels))
