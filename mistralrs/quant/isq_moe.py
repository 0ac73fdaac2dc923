"""ISQ for the stacked experts of a `FusedMoE` (the `MoEMethodBase` seam of `layers/moe.py`).

Each expert's gate, up and down projections are separate checkpoint linears (`experts.{e}.w1/w3/w2`), so each
is quantized on arrival into its own `IsqLayerState`, listed per expert in the reference's order: gate (w1),
down (w2), up (w3). Down is packed alone as soon as it is in, gate and up together once both are (one product
for both, as the dense `w13`). The experts then run grouped as in `UnquantizedMoEMethod`: the
(token, slot) assignments sorted by expert, one packed product pair per expert that received tokens, or per
token with the "reference" backend (`PackedMoEMethod`, mistralrs/quant/packed_moe.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mistralrs.layers.moe import FusedMoE, UnquantizedMoEMethod
from mistralrs.quant.isq import dequantize_state, dequantized_shape, pack_states, quantize_state
from mistralrs.quant.isq_state import IsqLayerState
from mistralrs.quant.isq_types import IsqType
from mistralrs.quant.packed import PackedWeight
from mistralrs.quant.packed_moe import PackedMoEMethod

ROLES = ("gate", "down", "up")  # per-expert state order (the reference's w1, w2, w3)


class IsqMoEMethod(PackedMoEMethod):
    """A `FusedMoE`'s experts quantized per projection (`states`, three per expert) and packed per expert."""

    def __init__(self, isq: IsqType | None, *, imatrix: Sequence[torch.Tensor | None] | None = None,
                 use_fast_kernels: bool = True):
        super().__init__(use_fast_kernels)
        self.isq = isq                      # the type projections are quantized to (None: kept unquantized)
        self.imatrix = imatrix              # per state (expert-major, ROLES order): `[in_features]` or None
        self._states: list[dict[str, IsqLayerState]] = []  # per expert: role -> state
        self._ready: list[IsqLayerState] | None = None  # states given to `from_states`, adopted at create_weights

    @classmethod
    def from_states(cls, states: Sequence[IsqLayerState], use_fast_kernels: bool = True) -> IsqMoEMethod:
        """A method holding ready states (`3 * num_experts`, expert-major in ROLES order)."""
        method = cls(None, use_fast_kernels=use_fast_kernels)
        method._ready = list(states)
        return method

    @property
    def states(self) -> list[IsqLayerState]:
        """Every projection's state, expert-major in ROLES order (the order of `isq_layer_names`)."""
        if any(len(expert) != len(ROLES) for expert in self._states):
            raise ValueError("IsqMoEMethod.states: expert weights are still missing")
        return [expert[role] for expert in self._states for role in ROLES]

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        super().create_weights(layer, dtype, device)
        self._states = [{} for _ in range(layer.num_experts)]
        if self._ready is None:
            return
        if len(self._ready) != len(ROLES) * layer.num_experts:
            raise ValueError(f"{layer.prefix}: {len(self._ready)} ISQ states for {layer.num_experts} experts "
                             f"(expected {len(ROLES) * layer.num_experts})")
        for index, state in enumerate(self._ready):
            self._store(layer, index // len(ROLES), ROLES[index % len(ROLES)], state)
        self._ready = None

    def pack_shards(self, shards: list[IsqLayerState]) -> list[PackedWeight]:
        return pack_states(shards, self._dtype, self._device, self.use_fast_kernels)

    def _store(self, layer: FusedMoE, expert_id: int, role: str, state: IsqLayerState) -> None:
        self.check_shape(layer, expert_id, role, dequantized_shape(state), "ISQ state")
        self._states[expert_id][role] = state
        self.pack_arrival(expert_id, self._states[expert_id], role)

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: torch.Tensor) -> None:
        self.check_shape(layer, expert_id, projection, tuple(loaded.shape), "weight")
        imatrix = None
        if self.imatrix is not None:
            imatrix = self.imatrix[expert_id * len(ROLES) + ROLES.index(projection)]
        self._store(layer, expert_id, projection, quantize_state(loaded, None, self.isq, self._dtype, imatrix))

    def requantize(self, layer: FusedMoE, isq: IsqType | None,
                   imatrix: Sequence[torch.Tensor | None] | None = None) -> None:
        """Quantizes the experts' current weights again to `isq` (re-ISQ)."""
        self.isq, self.imatrix = isq, imatrix
        for index, state in enumerate(self.states):
            vector = None if imatrix is None else imatrix[index]
            fresh = quantize_state(dequantize_state(state), None, isq, self._dtype, vector)
            self._states[index // len(ROLES)][ROLES[index % len(ROLES)]] = fresh
        for expert_id, expert in enumerate(self._states):
            for role in ("up", "down"):  # repacks both stacks (gate and up together)
                self.pack_arrival(expert_id, expert, role)


def moe_states(layer: FusedMoE) -> list[IsqLayerState]:
    """The experts' states in ROLES order (dense states when the layer is not ISQ-quantized)."""
    method = layer.quant_method
    if isinstance(method, IsqMoEMethod):
        return method.states
    if not isinstance(method, UnquantizedMoEMethod):
        raise ValueError(f"{layer.prefix}: its {type(method).__name__} weights cannot be read back as ISQ states")
    i = layer.intermediate_size
    views = {"gate": lambda e: layer.w13[e, :i], "up": lambda e: layer.w13[e, i:], "down": lambda e: layer.w2[e]}
    return [IsqLayerState(dense=views[role](e).detach().clone()) for e in range(layer.num_experts) for role in ROLES]


def requantize_moe(layer: FusedMoE, isq: IsqType, imatrix: Sequence[torch.Tensor | None] | None,
                   use_fast_kernels: bool) -> None:
    """Quantizes a loaded `FusedMoE`'s experts to `isq` in place (dense or already ISQ-quantized)."""
    method = layer.quant_method
    if isinstance(method, IsqMoEMethod):
        method.use_fast_kernels = use_fast_kernels
        method.requantize(layer, isq, imatrix)
        return
    with torch.no_grad():
        states = [quantize_state(s.dense, None, isq, layer.dtype, None if imatrix is None else imatrix[index])
                  for index, s in enumerate(moe_states(layer))]
    layer.set_quant_method(IsqMoEMethod.from_states(states, use_fast_kernels=use_fast_kernels))
