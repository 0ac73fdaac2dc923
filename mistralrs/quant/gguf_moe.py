"""Mixture-of-experts weights from a GGUF file: each expert's GGML blocks kept quantized, one kernel per weight.

llama.cpp stores a layer's experts merged, `ffn_{gate,up,down}_exps [n_expert, out, in]`; the GGUF loader
splits them into the checkpoint's per-expert names (each a run of whole block rows, no copy), so they reach
`FusedMoE.load_weight` one expert and projection at a time. `GGUFMoEMethod` packs each with
`mistralrs.quant.gguf_linear.build_packed_weight`: per expert, gate and up concatenated into one weight when
their types agree (two otherwise), and down. `GGUFModelQuantConfig` gives every `Linear` its GGUF method, as
`GGUFQuantConfig` does, and every `FusedMoE` a `GGUFMoEMethod`.

The math is the grouped one of `UnquantizedMoEMethod`: the (token, slot) assignments are sorted by expert and
each expert that received tokens runs its packed weights once over its rows; the "reference" backend loops over
tokens. With `use_fast_kernels` off, every weight is dequantized once at load (the plain twin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.layers.moe import ExpertDelta, FusedMoE, MoEMethodBase, experts_grouped, gated_expert
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.gguf_linear import GGUFQuantConfig, build_packed_weight
from mistralrs.quant.packed import PackedWeight

CheckpointTensor = torch.Tensor | GGMLTensor


def _kind(tensor: CheckpointTensor) -> str:
    return tensor.ggml_type if isinstance(tensor, GGMLTensor) else "dense"


class GGUFMoEMethod(MoEMethodBase):
    """Per-expert packed weights: `w13[e]` (gate rows, then up rows; one or two `PackedWeight`s) and `w2[e]`.

    One instance per `FusedMoE` layer.
    """

    supports_adapters = True  # separately held expert adapters add their deltas per routed row

    def __init__(self, use_fast_kernels: bool = True):
        self.use_fast_kernels = use_fast_kernels  # False: dequantize every expert at load (the plain path)
        self.w13: list[list[PackedWeight]] = []  # per expert: packed gate+up covering 2 * intermediate rows
        self.w2: list[PackedWeight | None] = []  # per expert: packed down
        self._pending: list[dict[str, CheckpointTensor]] = []  # per expert: gate/up until both have arrived
        self._dtype = torch.float32
        self._device = torch.device("cpu")

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        self._dtype, self._device = dtype, torch.device(device)
        self.w13 = [[] for _ in range(layer.num_experts)]
        self.w2 = [None] * layer.num_experts
        self._pending = [{} for _ in range(layer.num_experts)]

    def _pack(self, tensor: CheckpointTensor) -> PackedWeight:
        return build_packed_weight(tensor, self._dtype, self._device, self.use_fast_kernels)

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: CheckpointTensor) -> None:
        h, i = layer.hidden_size, layer.intermediate_size
        expected = (h, i) if projection == "down" else (i, h)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"weight '{layer.prefix}.{expert_id}.{projection}' has shape {tuple(loaded.shape)}, "
                             f"expected {expected}")
        if projection == "down":
            self.w2[expert_id] = self._pack(loaded)
            return
        pending = self._pending[expert_id]
        pending[projection] = loaded
        if len(pending) < 2:
            return
        gate, up = pending.pop("gate"), pending.pop("up")
        if _kind(gate) != _kind(up):
            self.w13[expert_id] = [self._pack(gate), self._pack(up)]
        elif isinstance(gate, GGMLTensor):
            self.w13[expert_id] = [self._pack(GGMLTensor.cat_rows([gate, up]))]
        else:
            self.w13[expert_id] = [self._pack(torch.cat([gate, up]))]

    def _expert(self, layer: FusedMoE, expert_id: int, x: torch.Tensor, deltas: list[ExpertDelta],
                rows: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP over `x [rows, hidden]` (the tokens `rows`), plus its adapters' deltas."""
        w13, w2 = self.w13[expert_id], self.w2[expert_id]
        if not w13 or w2 is None:
            raise ValueError(f"{layer.prefix or 'moe'}: weights of expert {expert_id} were not loaded")

        def gate_up(h: torch.Tensor) -> torch.Tensor:
            return w13[0].matmul(h) if len(w13) == 1 else torch.cat([w.matmul(h) for w in w13], dim=-1)
        return gated_expert(layer, expert_id, x, rows, deltas, gate_up, w2.matmul)

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        deltas = layer.bound_adapters(x)
        if layer.backend == "reference":
            out = torch.zeros_like(x)
            for token in range(x.shape[0]):
                row = torch.tensor([token], device=x.device)
                for slot in range(topk_ids.shape[1]):
                    expert_out = self._expert(layer, int(topk_ids[token, slot]), x[token:token + 1], deltas, row)
                    out[token] += float(topk_weights[token, slot]) * expert_out[0]
            return out
        return experts_grouped(x, topk_weights, topk_ids, layer.num_experts,
                               lambda e, expert_in, rows: self._expert(layer, e, expert_in, deltas, rows))


@dataclass(frozen=True)
class GGUFModelQuantConfig(GGUFQuantConfig):
    """`GGUFQuantConfig` for a whole GGUF model: every `Linear` and every `FusedMoE` keeps GGML blocks."""

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        for module in model.modules():
            if isinstance(module, FusedMoE):
                module.set_quant_method(GGUFMoEMethod(self.use_fast_kernels))
