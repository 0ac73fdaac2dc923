"""LoRA on the experts of a `FusedMoE` (`layers/moe.py`): PEFT modules `<moe>.{expert}.{projection}`.

Checkpoints made with per-expert linear experts (Mixtral fine-tunes from transformers 4.x) name each expert's
projections `experts.{e}.w1/w3/w2`; our `FusedMoE` stacks them (`w13`: gate rows then up rows, `w2`: down), and
its `projection_of` maps the checkpoint name to the role. An adapter on such a module is either merged into the
dense stacked weights, or kept separate in an `ExpertLoraHook` in `FusedMoE.adapters`, which the MoE paths call
for exactly the tokens routed to each expert, weighted by the same per-token adapter weights as `LoraHook`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mistralrs.layers.moe import ExpertDelta, FusedMoE

if TYPE_CHECKING:
    from mistralrs.adapters.lora import LoraAdapter, LoraState

_STACK_OF = {"gate": "w13", "up": "w13", "down": "w2"}  # role -> the stacked tensor holding it


@dataclass
class ExpertTarget:
    """One expert projection an adapter module names."""

    moe: FusedMoE  # the layer holding the expert
    expert_id: int  # expert index in the layer
    projection: str  # "gate", "up" or "down"

    @property
    def in_features(self) -> int:
        """Width of the projection's input."""
        return self.moe.intermediate_size if self.projection == "down" else self.moe.hidden_size

    @property
    def out_features(self) -> int:
        """Width of the projection's output."""
        return self.moe.hidden_size if self.projection == "down" else self.moe.intermediate_size

    @property
    def offset(self) -> int:
        """First output row of the projection in its stack."""
        return self.moe.intermediate_size if self.projection == "up" else 0


def resolve_expert_target(modules: dict[str, nn.Module], hf_module: str) -> ExpertTarget | None:
    """`<moe>.{expert}.{projection}` -> its `ExpertTarget` (None when `hf_module` is not an expert projection)."""
    parts = hf_module.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    moe = modules.get(parts[0])
    if not isinstance(moe, FusedMoE):
        return None
    projection = moe.projection_of(parts[2])
    if projection is None or int(parts[1]) >= moe.num_experts:
        return None
    return ExpertTarget(moe, int(parts[1]), projection)


def expert_module_names(moe: FusedMoE, path: str) -> list[str]:
    """The HF module names of a `FusedMoE`'s expert projections, expert-major in checkpoint-name order."""
    return [f"{path}.{name.rpartition('.')[0]}" for name in moe.checkpoint_param_names()]


def check_expert_shapes(adapter: LoraAdapter, hf_module: str, target: ExpertTarget) -> None:
    """ValueError naming the module when its A/B do not fit the expert projection."""
    a, b = adapter.weights[hf_module]
    if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
        raise ValueError(f"adapter {adapter.name!r}: module {hf_module!r} shape mismatch: lora_A {tuple(a.shape)}, "
                         f"lora_B {tuple(b.shape)}, expert {target.projection} projection takes "
                         f"{target.in_features} and gives {target.out_features}")


def merge_expert(adapter: LoraAdapter, hf_module: str, target: ExpertTarget) -> None:
    """W += scale * B @ A into the expert's dense rows; ValueError when its weights are not dense."""
    check_expert_shapes(adapter, hf_module, target)
    weight = target.moe.quant_method.dense_expert_weight(target.moe, target.expert_id, target.projection)
    if weight is None:
        raise ValueError(f"adapter {adapter.name!r}: cannot merge into {hf_module!r}: its expert weights are not "
                         f"dense ({type(target.moe.quant_method).__name__})")
    a, b = adapter.weights[hf_module]
    with torch.no_grad():
        weight.copy_((weight.float() + (b.float() @ a.float()) * adapter.scale).to(weight.dtype))


def hook_expert(adapter: LoraAdapter, hf_module: str, target: ExpertTarget, state: LoraState,
                layer_index: int) -> None:
    """Keeps the adapter's A/B on the expert separate: adds them to the layer's `ExpertLoraHook`."""
    check_expert_shapes(adapter, hf_module, target)
    method = target.moe.quant_method
    if not method.supports_adapters:
        raise ValueError(f"adapter {adapter.name!r}: module {hf_module!r}: separately held expert adapters are not "
                         f"supported on {type(method).__name__} experts (only on dense experts)")
    hook = next((h for h in target.moe.adapters if isinstance(h, ExpertLoraHook)), None)
    if hook is None:
        hook = ExpertLoraHook(state, target.moe)
        target.moe.adapters.append(hook)
    a, b = adapter.weights[hf_module]
    hook.add(adapter.name, target, a, b, adapter.scale, layer_index)


class ExpertLoraHook:
    """A `FusedMoE.adapters` entry: for the rows routed to expert e, a stack's output gains
    `sum_j w[t, j] * scale_j * B_j(A_j(x[t]))` in the projection's rows, `w` the state's per-token adapter weights
    (per LoRA layer for layerwise X-LoRA). Per (expert, stack) the A's form one matrix and the B's one block
    matrix, so each routed expert costs two small matmuls per stack whatever the adapter mix."""

    def __init__(self, state: LoraState, moe: FusedMoE) -> None:
        self.state = state
        self.moe = moe
        # (expert, stack) -> [(adapter column, LoRA-layer index, A [r, in], B [size, r], scale, first row)]
        self.entries: dict[tuple[int, str], list[tuple[int, int, torch.Tensor, torch.Tensor, float, int]]] = {}
        self._packed: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}  # (A_cat, B_cat, columns, layers)

    def add(self, name: str, target: ExpertTarget, a: torch.Tensor, b: torch.Tensor, scale: float,
            layer_index: int = 0) -> None:
        """Registers adapter `name`'s A/B on one expert projection, as LoRA layer `layer_index`."""
        key = (target.expert_id, _STACK_OF[target.projection])
        self.entries.setdefault(key, []).append((self.state.names.index(name), layer_index, a, b, scale,
                                                 target.offset))
        self._packed.pop(key, None)

    def _pack(self, key: tuple[int, str]) -> tuple[torch.Tensor, ...]:
        packed = self._packed.get(key)
        if packed is None:
            entries = self.entries[key]
            out = 2 * self.moe.intermediate_size if key[1] == "w13" else self.moe.hidden_size
            a_cat = torch.cat([a for _, _, a, _, _, _ in entries])  # [R, in]
            b_cat = a_cat.new_zeros(out, a_cat.shape[0])  # [out, R], scale folded in
            columns, layers, start = [], [], 0
            for column, layer, a, b, scale, offset in entries:
                rank = a.shape[0]
                b_cat[offset:offset + b.shape[0], start:start + rank] = b * scale
                columns += [column] * rank
                layers += [layer] * rank
                start += rank
            device = a_cat.device
            packed = (a_cat, b_cat, torch.tensor(columns, device=device, dtype=torch.long),
                      torch.tensor(layers, device=device, dtype=torch.long))
            self._packed[key] = packed
        return packed

    def bind(self, x: torch.Tensor) -> ExpertDelta | None:
        """This step's delta function for the tokens `x` (None when no token uses an adapter)."""
        weights = self.state.weights_for(x)
        if weights is None or not self.entries:
            return None
        weights = weights.to(device=x.device, dtype=x.dtype)

        def delta(stack: str, expert_id: int, expert_in: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
            key = (expert_id, stack)
            if key not in self.entries:
                return None
            a_cat, b_cat, columns, layers = self._pack(key)
            token_weights = weights.index_select(0, rows)
            if token_weights.dim() == 3:   # layerwise: pick each rank's own LoRA layer
                columns = layers * token_weights.shape[2] + columns
                token_weights = token_weights.reshape(token_weights.shape[0], -1)
            rank_weights = token_weights.index_select(1, columns)  # [rows, R]
            return ((expert_in @ a_cat.t()) * rank_weights) @ b_cat.t()

        return delta
