"""Sparse mixture-of-experts: routing functions and the `FusedMoE` layer (router logits in, output out).

`FusedMoE` stores every expert's weights stacked, `w13 [num_experts, 2 * intermediate, hidden]` (gate rows, then
up rows) and `w2 [num_experts, hidden, intermediate]`, through a `MoEMethodBase` quant method (the same seam as
`layers/linear.py`: quantized experts enter by giving the layer another method). Checkpoints name each expert's
projections separately (`experts.{e}.w1.weight`, ...); `load_moe_weights` routes those names into the stacks.

The one switch `FusedMoE.backend` (set by the model runner from `ExecutionOptions.moe_backend`,
mistralrs/worker/options.py) chooses between
- "fused": the (token, slot) assignments are sorted by expert id, and each expert that received tokens runs one
  matmul over its contiguous rows (`index_select` in, weighted `index_add_` out). Experts without tokens are not
  visited, each visited expert's weights are read once per step whatever its token count, and the Python loop
  is bounded by `num_experts` (not by tokens). Gathering weights per token for a `bmm` was not chosen: on the
  CPU it copies a full expert matrix per assignment, doubling the memory traffic that bounds decode speed.
- "reference": the plain twin, a loop over tokens and their selected experts, one small MLP per pair.

Expert adapters (LoRA on `experts.{e}.{proj}`, `adapters/moe_lora.py`) sit in `FusedMoE.adapters`; each step
`FusedMoE.bound_adapters` binds them to the step's per-token adapter weights, and both paths add each bound
adapter's delta to a stack's product (`"w13"`: gate then up rows, `"w2"`: down) for exactly the tokens routed to
that expert. Without adapters (the list is empty) nothing is bound and the paths run as before.

Tensor parallelism (a `FusedMoE` built inside `distributed.group.building_for`): every rank holds a range of every
expert's intermediate width (`distributed.parallel.aligned_range`: gate/up rows, down columns) and the ranks'
outputs are summed by one all-reduce. Splitting the intermediate width rather than the experts keeps every rank
busy on every token whatever the router picks (with experts split, a step's work lands on the ranks that own the
chosen experts, and the ranks wait for the busiest), and the router and routing stay replicated and identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import QuantizedPiece, aligned_range, all_reduce, narrow_columns, narrow_rows
from mistralrs.layers.activation import act_and_mul, get_act_fn
from mistralrs.layers.linear import CheckpointModule, copy_checked, dense_device

MOE_BACKENDS = ("fused", "reference")

# a bound expert adapter: (stack "w13" or "w2", expert id, the rows' stack input, token indices of the rows) ->
# the addition to the stack's output for those rows, or None when it has nothing on that (expert, stack)
ExpertDelta = Callable[[str, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def add_expert_deltas(y: torch.Tensor, deltas: list[ExpertDelta], stack: str, expert_id: int,
                      expert_in: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`y` (the stack's product for `rows`) plus every bound adapter's delta on (`expert_id`, `stack`)."""
    for delta in deltas:
        extra = delta(stack, expert_id, expert_in, rows)
        if extra is not None:
            y = y + extra
    return y


def experts_grouped(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                    expert_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The routed sum over experts, tokens grouped by expert: `expert_fn(expert_id, expert_in, rows)` is one
    expert's output for the rows (token indices) routed to it; each is weighted and added back to its tokens.
    One host sync (the per-expert counts) per call; experts no token chose are skipped."""
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [num_tokens * top_k], assignment a belongs to token a // top_k
    order = torch.argsort(flat_ids, stable=True)
    token_ids = order // top_k  # assignments grouped by expert
    weights = topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert_id, count in enumerate(counts):
        if count:
            rows = token_ids[start:start + count]
            out.index_add_(0, rows, expert_fn(expert_id, x.index_select(0, rows), rows) * weights[start:start + count])
            start += count
    return out


def gated_expert(layer: FusedMoE, expert_id: int, expert_in: torch.Tensor, rows: torch.Tensor,
                 deltas: list[ExpertDelta], gate_up: Callable[[torch.Tensor], torch.Tensor],
                 down: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One expert's gated MLP over its routed rows, with the products a quant method supplies (`gate_up`, `down`)
    and the bound adapters' deltas added after each."""
    hidden = gate_up(expert_in)
    if deltas:
        hidden = add_expert_deltas(hidden, deltas, "w13", expert_id, expert_in, rows)
    inner = act_and_mul(hidden, layer.act_fn)
    out = down(inner)
    return add_expert_deltas(out, deltas, "w2", expert_id, inner, rows) if deltas else out


def softmax_topk_routing(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over experts (float32), top-k, optionally renormalised over the top-k.

    Returns (`topk_weights [num_tokens, top_k]` float32, `topk_ids [num_tokens, top_k]` int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def _sparsemixer_pick(scores: torch.Tensor, candidates: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparsemixer stage at inference: the arg-max of `candidates`, weighted by its softmax among the
    candidates within relative distance `2 * jitter_eps` of the maximum (distance measured against `scores`)."""
    threshold, selected = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    outside = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(candidates.masked_fill(outside, float("-inf")), dim=-1)
    return gates.gather(-1, selected), selected


def sparsemixer_routing(router_logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's sparsemixer at inference (top-2 only): the first expert is the arg-max, weighted by its
    softmax over the logits near the maximum; the second is the arg-max once the first is masked out, weighted
    the same way among the remaining logits. Returns (`topk_weights`, `topk_ids`), each `[num_tokens, 2]`."""
    if top_k != 2:
        raise ValueError(f"num_experts_per_tok must be 2 for sparsemixer routing, got {top_k}")
    scores = router_logits.float()
    weight_1, expert_1 = _sparsemixer_pick(scores, scores, jitter_eps)
    weight_2, expert_2 = _sparsemixer_pick(scores, scores.scatter(-1, expert_1, float("-inf")), jitter_eps)
    return torch.cat((weight_1, weight_2), dim=-1), torch.cat((expert_1, expert_2), dim=-1)


class MoEMethodBase:
    """How a `FusedMoE` stores its expert weights, loads checkpoint tensors into them, and computes the experts."""

    supports_adapters = False  # True when `apply` adds the layer's bound expert adapters (separately held LoRA)

    def dense_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str) -> torch.Tensor | None:
        """A writable view of one expert's dense `[out, in]` matrix (for merging adapters); None when not dense."""
        return None

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        """Registers the layer's expert parameters or buffers."""
        raise NotImplementedError

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: torch.Tensor) -> None:
        """Stores one expert's checkpoint matrix; `projection` is "gate", "up" or "down"."""
        raise NotImplementedError

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """`x [num_tokens, hidden]` and the routing -> `[num_tokens, hidden]`."""
        raise NotImplementedError


class UnquantizedMoEMethod(MoEMethodBase):
    """Dense stacked expert weights in the model dtype; grouped matmuls ("fused") or the per-token twin."""

    supports_adapters = True

    def create_weights(self, layer: FusedMoE, dtype: torch.dtype, device: torch.device | str) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        device = dense_device(device)
        layer.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False)
        layer.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False)

    def dense_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str) -> torch.Tensor:
        i = layer.intermediate_size
        targets = {"gate": lambda: layer.w13[expert_id, :i], "up": lambda: layer.w13[expert_id, i:],
                   "down": lambda: layer.w2[expert_id]}
        return targets[projection]()

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: torch.Tensor) -> None:
        copy_checked(self.dense_expert_weight(layer, expert_id, projection), loaded,
                     f"{layer.prefix}.{expert_id}.{projection}")

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        if layer.backend == "reference":
            return self._apply_reference(layer, x, topk_weights, topk_ids)
        return self._apply_grouped(layer, x, topk_weights, topk_ids)

    @staticmethod
    def _apply_grouped(layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor) -> torch.Tensor:
        deltas = layer.bound_adapters(x)

        def expert(expert_id: int, expert_in: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return gated_expert(layer, expert_id, expert_in, rows, deltas,
                                lambda h: F.linear(h, layer.w13[expert_id]), lambda h: F.linear(h, layer.w2[expert_id]))
        return experts_grouped(x, topk_weights, topk_ids, layer.num_experts, expert)

    @staticmethod
    def _apply_reference(layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        i = layer.intermediate_size
        deltas = layer.bound_adapters(x)
        for token in range(x.shape[0]):
            row, x_row = torch.tensor([token], device=x.device), x[token:token + 1]
            for slot in range(topk_ids.shape[1]):
                expert_id = int(topk_ids[token, slot])
                w13 = layer.w13[expert_id]
                gate = add_expert_deltas(x_row @ w13.T, deltas, "w13", expert_id, x_row, row)  # [1, 2 * i]
                hidden = layer.act_fn(gate[:, :i]) * gate[:, i:]
                down = add_expert_deltas(hidden @ layer.w2[expert_id].T, deltas, "w2", expert_id, hidden, row)
                out[token] += float(topk_weights[token, slot]) * down[0]
        return out


class FusedMoE(CheckpointModule):
    """The experts of one sparse MoE block: `forward(x [num_tokens, hidden], router_logits [num_tokens,
    num_experts]) -> [num_tokens, hidden]`, each token the routing-weighted sum of its top-k experts' gated MLPs.

    Args:
        num_experts: experts in the block.
        top_k: experts per token.
        hidden_size / intermediate_size: expert MLP widths.
        hidden_act: HF activation name of the gate.
        routing: "softmax_renorm" (Mixtral), "softmax" (no renormalisation), "sparsemixer" (Phi-3.5-MoE), or
            "external": the model routes (DeepSeek's grouped routers) and calls `forward_routed`.
        checkpoint_names: the checkpoint's (gate, up, down) projection names under `experts.{e}`.
        jitter_eps: sparsemixer's `router_jitter_noise`.
        backend: "fused" or "reference" (see the module docstring).
        quant_method: storage and math; `UnquantizedMoEMethod()` when None.
        prefix: the module path (for messages).
    """

    ROUTINGS = ("softmax_renorm", "softmax", "sparsemixer", "external")

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *, hidden_act: str,
                 routing: str, checkpoint_names: tuple[str, str, str], dtype: torch.dtype,
                 device: torch.device | str, jitter_eps: float = 0.0, backend: str = "fused",
                 quant_method: MoEMethodBase | None = None, prefix: str = ""):
        super().__init__()
        if routing not in self.ROUTINGS:
            raise ValueError(f"routing must be one of {list(self.ROUTINGS)}, got {routing!r}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_local_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.tp_group = current_group()  # the tensor-parallel group; None: whole experts
        self.tp_rows = aligned_range(intermediate_size, self.tp_group)  # this rank's range of the intermediate width
        self.intermediate_size = self.tp_rows[1]  # this rank's intermediate width per expert
        self.routing = routing
        self.jitter_eps = jitter_eps
        self.act_fn = get_act_fn(hidden_act)
        self.prefix = prefix
        self.dtype = dtype  # the model dtype: activations, and expert weights a quant method keeps dense
        self.params_device = torch.device(device)
        self.backend = ""
        self.set_backend(backend)
        self._projection_of = dict(zip(checkpoint_names, ("gate", "up", "down")))  # checkpoint name -> role
        self.adapters: list = []  # expert adapters, each with `bind(x) -> ExpertDelta | None` (adapters/moe_lora.py)
        self.quant_method = quant_method or UnquantizedMoEMethod()
        self.quant_method.create_weights(self, dtype, device)

    def set_quant_method(self, quant_method: MoEMethodBase) -> None:
        """Replaces the quant method before any expert weight is loaded; the old method's storage is dropped.
        ValueError when the layer holds expert adapters the new method cannot apply."""
        if self.adapters and not quant_method.supports_adapters:
            raise ValueError(f"{self.prefix or 'FusedMoE'}: holds separately loaded expert adapters, which "
                             f"{type(quant_method).__name__} experts cannot apply (merge them or keep dense experts)")
        for name in ("w13", "w2"):
            if name in self._parameters:
                del self._parameters[name]
        self.quant_method = quant_method
        quant_method.create_weights(self, self.dtype, self.params_device)

    def set_backend(self, backend: str) -> None:
        """Switches between the "fused" path and its "reference" twin."""
        if backend not in MOE_BACKENDS:
            raise ValueError(f"moe backend must be one of {list(MOE_BACKENDS)}, got {backend!r}")
        self.backend = backend

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`topk_weights [num_tokens, top_k]` float32, `topk_ids [num_tokens, top_k]`)."""
        if self.routing == "external":
            raise ValueError(f"{self.prefix or 'FusedMoE'}: routing is done by the model; call forward_routed")
        if self.routing == "sparsemixer":
            return sparsemixer_routing(router_logits, self.top_k, self.jitter_eps)
        return softmax_topk_routing(router_logits, self.top_k, renormalize=self.routing == "softmax_renorm")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x, *self.route(router_logits))

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts for a routing already made: `topk_weights`/`topk_ids` `[num_tokens, top_k]`."""
        out = self.quant_method.apply(self, x, topk_weights, topk_ids)
        return out if self.tp_group is None else all_reduce(out, self.tp_group)

    def projection_of(self, checkpoint_name: str) -> str | None:
        """The role ("gate", "up" or "down") of a checkpoint projection name (`w1`, ...); None for another name."""
        return self._projection_of.get(checkpoint_name)

    def bound_adapters(self, x: torch.Tensor) -> list[ExpertDelta]:
        """The expert adapters that apply to this step's tokens `x`, bound to their per-token weights (empty when
        none does: the paths then skip the adapter work)."""
        if not self.adapters:
            return []
        bound = [adapter.bind(x) for adapter in self.adapters]
        return [b for b in bound if b is not None]

    def checkpoint_param_names(self) -> list[str]:
        return [f"{e}.{name}.weight" for e in range(self.num_experts) for name in self._projection_of]

    def load_weight(self, param_name: str, loaded: torch.Tensor, shard_index: int | None = None) -> None:
        """Loads `"{expert}.{projection}.weight"` (a name from `checkpoint_param_names`)."""
        expert, name, _ = param_name.split(".")
        projection = self._projection_of[name]
        self.quant_method.load_expert_weight(self, int(expert), projection, self.local_piece(projection, loaded))

    def local_piece(self, projection: str, loaded: torch.Tensor | QuantizedPiece) -> torch.Tensor | QuantizedPiece:
        """This rank's piece of an expert's `projection` weight: its range of the intermediate width (gate/up rows,
        down columns; a down split inside a quantized block dequantized to the model dtype)."""
        if self.tp_group is None:
            return loaded
        start, size = self.tp_rows
        if projection == "down":
            return narrow_columns(loaded, start, size, self.dtype)
        return narrow_rows(loaded, start, size)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, routing={self.routing}, backend={self.backend}")


_EXPERT_NAME = re.compile(r"^(?P<module>.+)\.(?P<param>\d+\.[^.]+\.weight)$")


def load_moe_weights(root: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                     load_rest: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str]]) -> set[str]:
    """Routes per-expert checkpoint tensors (`<moe>.{e}.{proj}.weight`) into the `FusedMoE` modules of `root` and
    every other pair to `load_rest`; returns all names consumed."""
    moe_modules = {name: m for name, m in root.named_modules() if isinstance(m, FusedMoE)}
    consumed: set[str] = set()

    def others() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            match = _EXPERT_NAME.match(name)
            moe = moe_modules.get(match["module"]) if match else None
            if moe is not None and match["param"] in moe.checkpoint_param_names():
                moe.load_weight(match["param"], tensor)
                consumed.add(name)
            else:
                yield name, tensor

    consumed |= load_rest(others())
    return consumed

