"""The MoE method shared by the quant methods whose expert weights are `PackedWeight`s (GGUF, ISQ, and UQFF's ISQ).

A `PackedMoEMethod` holds per expert the packed gate and up projections (`w13`, gate rows then up rows: one
product for both, as the dense stack) and the packed down projection (`w2`). Each projection of an expert arrives
separately (a checkpoint tensor, or an ISQ state); `pack_arrival` packs down alone as soon as it is in, and gate
with up once both are. The experts then run as `UnquantizedMoEMethod`'s do: grouped by expert ("fused" backend),
or a loop over tokens and their selected experts ("reference"), the layer's bound expert adapters added after
each product. A subclass says only how a projection's shards are packed (`pack_shards`) and how they arrive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mistralrs.layers.moe import ExpertDelta, FusedMoE, MoEMethodBase, experts_grouped, gated_expert
from mistralrs.quant.packed import PackedWeight, matmul_all

class PackedMoEMethod(MoEMethodBase):
    """A `FusedMoE`'s experts as packed weights: `w13[e]` (gate then up rows) and `w2[e]` (down), each a list of
    `PackedWeight`s over consecutive output rows, empty until the expert's projections have arrived.

    One instance per `FusedMoE` layer. Subclasses implement `pack_shards` and `load_expert_weight`.
    """

    supports_adapters = True  # separately held expert adapters add their deltas per routed row

    def __init__(self, use_fast_kernels: bool = True):
        self.use_fast_kernels = use_fast_kernels  # False: the plain twin (every expert dense at load)
        self.w13: list[list[PackedWeight]] = []  # per expert: packed gate+up covering 2 * intermediate rows
        self.w2: list[list[PackedWeight]] = []  # per expert: packed down covering hidden rows
        self._dtype = torch.float32  # the activation dtype (dense forms are kept in it)
        self._device = torch.device("cpu")  # where the packed weights live

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        self._dtype, self._device = dtype, torch.device(device)
        self.w13 = [[] for _ in range(layer.num_experts)]
        self.w2 = [[] for _ in range(layer.num_experts)]

    def pack_shards(self, shards: Sequence) -> list[PackedWeight]:
        """The compute forms of one weight given as consecutive row shards (the subclass's own shard type)."""
        raise NotImplementedError

    @staticmethod
    def check_shape(layer: FusedMoE, expert_id: int, role: str, shape: tuple[int, ...], what: str) -> None:
        """ValueError naming `what` (a weight, an ISQ state) when `shape` is not projection `role`'s."""
        h, i = layer.hidden_size, layer.intermediate_size
        expected = (h, i) if role == "down" else (i, h)
        if tuple(shape) != expected:
            raise ValueError(f"{layer.prefix}.{expert_id}.{role}: {what} has shape {tuple(shape)}, "
                             f"expected {expected}")

    def pack_arrival(self, expert_id: int, shards: Mapping[str, object], role: str) -> tuple[str, ...]:
        """Packs what the arrival of projection `role` completes among one expert's `shards` (role -> shard):
        down alone, gate and up together once both are in. Returns the roles packed (none while up or gate
        waits for the other)."""
        if role == "down":
            self.w2[expert_id] = self.pack_shards([shards["down"]])
            return ("down",)
        if "gate" not in shards or "up" not in shards:
            return ()
        self.w13[expert_id] = self.pack_shards([shards["gate"], shards["up"]])
        return ("gate", "up")

    def _expert(self, layer: FusedMoE, expert_id: int, x: torch.Tensor, deltas: list[ExpertDelta],
                rows: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP over `x [rows, hidden]` (the tokens `rows`), plus its adapters' deltas."""
        w13, w2 = self.w13[expert_id], self.w2[expert_id]
        if not w13 or not w2:
            raise ValueError(f"{layer.prefix or 'moe'}: weights of expert {expert_id} were not loaded")
        return gated_expert(layer, expert_id, x, rows, deltas, lambda h: matmul_all(w13, h),
                            lambda h: matmul_all(w2, h))

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
