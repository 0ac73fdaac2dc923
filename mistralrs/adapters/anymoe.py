"""AnyMoE (REFERENCE §8.10, arXiv 2405.19076): a decoder layer's MLP replaced by a mixture of MLPs and a gate.

`AnyMoeMlp` takes the place of `<prefix>.<layer>.<mlp>` (a family's MLP module, found by name, so every family
whose decoder layers hold a dense MLP works the same way). Expert 0 is the base MLP itself; experts 1..n are copies
of it carrying the MLP weights of other checkpoints of the same architecture (`fine_tuned_expert`) or the base
weights plus a LoRA delta (`lora_expert`). The gate is a float32 `Linear(hidden_size -> num_experts)` followed by a
softmax, applied to the MLP's input.

Routing, one expert per sequence (the reference's top-1 of the sequence-averaged gate; no mixing weights):
- In a packed step (`ForwardBatch.current()`: `query_start_locs`, `context_lens`, `prompt_lens`) every sequence is
  routed on its own tokens, so a batch of several sequences routes each as if it ran alone.
- The gate is averaged over the sequence's prompt tokens only. A prompt computed in several chunks (chunked
  prefill) routes each chunk by the mean over the prompt tokens seen so far, so its last chunk uses the mean over
  the whole prompt; the expert chosen there stays for every generated token. (The reference re-routes each decode
  step on the new token alone; fixing the prompt's expert keeps a sequence on one expert from its prompt's end.)
- Each layer keeps per sequence the gate sums before and after its latest chunk (`_Route`), so a chunk that runs
  again (the engine retries a failed step's requests one by one) counts once, and a sequence that starts again
  from position 0 (preempted, or `no_kv_cache`) starts afresh.
- The routes are keyed by the sequence's first KV block. That block belongs to the sequence alone from its first
  chunk (position 0) to its end because the engine turns prefix caching off for AnyMoE models (`has_anymoe`): a
  cached block's K/V would depend on another prompt's routing. A call outside an engine step (no current batch)
  routes all its rows as one sequence and keeps no state.

Training (`mistralrs/loader/anymoe_training.py`): with `start_training()` each layer's gate takes gradients and
`forward` keeps the sequence-averaged gate output of the step in `gate_output` for the loss; only the chosen
expert's output goes on, as at inference.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.adapters.lora import resolve_target, stacked_params_of
from mistralrs.layers.linear import Linear, expected_checkpoint_names, load_checkpoint_weights
from mistralrs.layers.moe import FusedMoE
from mistralrs.worker.forward_batch import ForwardBatch

# Hugging Face architectures whose decoder layers AnyMoE can extend (the reference's text models with AnyMoE
# support; Gemma 3 is the text half of its supported vision model). Mixtral, Phi-3.5-MoE and DeepSeek are not.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Starcoder2ForCausalLM",
)


@dataclass
class _Span:
    """One sequence's rows in a step."""

    first_row: int  # packed index of its first token this step
    num_rows: int  # tokens it has this step
    start_pos: int  # position of its first token this step
    num_prompt_rows: int  # leading rows that are prompt tokens (all rows when the prompt length is unknown)
    key: int | None  # its first KV block (the route key); None: no state kept (a call outside a step)


@dataclass
class _Route:
    """One sequence's routing state in one AnyMoE layer."""

    start: int  # position of the first token of the sequence's latest chunk
    before: torch.Tensor  # [num_experts] float32 gate probabilities summed over the prompt tokens before `start`
    after: torch.Tensor  # the same, up to the end of that chunk
    expert: int  # the expert chosen from `after`


def _spans(fb: ForwardBatch | None, num_rows: int) -> list[_Span]:
    """The sequences of the running step (one stateless span when there is no step or it is another's rows)."""
    if fb is None or fb.num_tokens != num_rows:
        return [_Span(0, num_rows, 0, num_rows, None)]
    spans = []
    for s, (q0, q1) in enumerate(zip(fb.query_start_locs, fb.query_start_locs[1:])):
        start, prompt_len = fb.context_lens[s] - (q1 - q0), fb.prompt_lens[s]
        prompt_rows = q1 - q0 if prompt_len == 0 else min(max(prompt_len - start, 0), q1 - q0)
        spans.append(_Span(q0, q1 - q0, start, prompt_rows, fb.block_tables[s][0]))
    return spans


def _rows(spans: list[_Span], counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed row index, span index) of the first `counts[i]` rows of every span."""
    rows = [r for span, n in zip(spans, counts) for r in range(span.first_row, span.first_row + n)]
    segments = [i for i, n in enumerate(counts) for _ in range(n)]
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(segments, dtype=torch.int64, device=device))


class AnyMoeMlp(nn.Module):
    """The MLP of one decoder layer as a mixture of `experts` (expert 0: the base MLP) routed per sequence by a
    trained gate (see the module docstring). Called as the family's MLP: `forward(x [num_tokens, hidden])`."""

    def __init__(self, experts: list[nn.Module], hidden_size: int, layer_idx: int, *, device: torch.device,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.layer_idx = layer_idx  # the decoder layer (the `moe_gate.<layer>` key of gate.safetensors)
        self.gate = nn.Linear(hidden_size, len(experts), dtype=torch.float32, device=device)
        with torch.no_grad():   # the reference's init: Kaiming-normal weight, uniform(+-1/sqrt(in)) bias
            bound = hidden_size ** -0.5
            weight = torch.randn(self.gate.weight.shape, generator=generator) * (2.0 ** 0.5 * bound)
            bias = (torch.rand(self.gate.bias.shape, generator=generator) * 2 - 1) * bound
            self.gate.weight.copy_(weight)
            self.gate.bias.copy_(bias)
        self.gate.requires_grad_(False)
        self.gate_training = False  # training: gate gradients on, `gate_output` kept
        self.gate_output: torch.Tensor | None = None  # training: [num_seqs, num_experts] mean gate output of a step
        self.last_routing: tuple[int, ...] = ()  # the expert of each sequence of the latest step (logs, tests)
        self._routes: dict[int, _Route] = {}  # first KV block -> routing state

    @property
    def num_experts(self) -> int:
        """Experts, the base MLP included."""
        return len(self.experts)

    def start_training(self) -> None:
        """Gate gradients on; each forward keeps its sequence-averaged gate output in `gate_output`."""
        self.gate.requires_grad_(True)
        self.gate_training = True

    def finish_training(self) -> None:
        """Back to inference: the gate frozen, no gate output kept, no routes from training."""
        self.gate.requires_grad_(False)
        self.gate_training = False
        self.gate_output = None
        self._routes.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spans = _spans(ForwardBatch.current(), x.shape[0])
        experts = self._train_route(x, spans) if self.gate_training else self._route(x, spans)
        self.last_routing = tuple(experts)
        return self._mix(x, spans, experts)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.gate(x.to(self.gate.weight.device, torch.float32)), dim=-1)

    def _train_route(self, x: torch.Tensor, spans: list[_Span]) -> list[int]:
        """Every row counts (training prompts are whole); the mean keeps its graph to the gate."""
        counts = [span.num_rows for span in spans]
        rows, segments = _rows(spans, counts, x.device)
        with torch.enable_grad():
            probs = self._probs(x.detach().index_select(0, rows))
            sums = torch.zeros(len(spans), self.num_experts, device=probs.device).index_add(
                0, segments.to(probs.device), probs)
            self.gate_output = sums / torch.tensor(counts, dtype=torch.float32, device=probs.device)[:, None]
        return self.gate_output.detach().argmax(dim=-1).tolist()

    def _route(self, x: torch.Tensor, spans: list[_Span]) -> list[int]:
        """The expert of each span: argmax of its gate sum over the prompt tokens so far (see the module doc)."""
        routes = [self._routes.get(span.key) if span.key is not None else None for span in spans]
        bases: list[torch.Tensor | None] = []
        counts = []
        for span, route in zip(spans, routes):
            if span.start_pos == 0 or route is None:
                bases.append(None)
                counts.append(span.num_prompt_rows or span.num_rows)   # a route lost midway restarts here
            else:
                bases.append(route.before if span.start_pos == route.start else route.after)
                counts.append(span.num_prompt_rows)
        if not any(counts):   # decoding: every sequence keeps the expert of its prompt, no gate, no host sync
            for span, route, base in zip(spans, routes, bases):
                self._routes[span.key] = _Route(span.start_pos, base, base, route.expert)
            return [route.expert for route in routes]
        device = self.gate.weight.device
        totals = torch.stack([torch.zeros(self.num_experts, device=device) if b is None else b for b in bases])
        rows, segments = _rows(spans, counts, x.device)
        totals = totals.index_add(0, segments.to(device), self._probs(x.index_select(0, rows)))
        experts = totals.argmax(dim=-1).tolist()
        for span, base, total, expert in zip(spans, bases, totals, experts):
            if span.key is not None:
                self._routes[span.key] = _Route(span.start_pos, torch.zeros_like(total) if base is None else base,
                                                total, expert)
        return experts

    def _mix(self, x: torch.Tensor, spans: list[_Span], experts: list[int]) -> torch.Tensor:
        """Each span's rows through its expert."""
        if len(set(experts)) == 1:
            return self.experts[experts[0]](x)
        out = torch.empty_like(x)
        for expert in sorted(set(experts)):
            rows, _ = _rows(spans, [span.num_rows if e == expert else 0 for span, e in zip(spans, experts)],
                            x.device)
            out.index_copy_(0, rows, self.experts[expert](x.index_select(0, rows)))
        return out


def anymoe_layers(model: nn.Module) -> list[AnyMoeMlp]:
    """The model's AnyMoE layers in module order (empty for a plain model)."""
    return [m for m in model.modules() if isinstance(m, AnyMoeMlp)]


def has_anymoe(model: nn.Module) -> bool:
    """True when `model` has AnyMoE layers (the engine then keeps prefix caching off, see the module doc)."""
    return any(isinstance(m, AnyMoeMlp) for m in model.modules())


def find_mlps(model: nn.Module, prefix: str, mlp: str, layers: tuple[int, ...]) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, its MLP module) at `<prefix>.<layer>.<mlp>` for the `layers` asked (all when empty);
    ValueError naming the field that finds no dense MLP there."""
    try:
        stack = model.get_submodule(prefix)
    except AttributeError:
        raise ValueError(f"anymoe_config.prefix: the model has no module {prefix!r} (its decoder layers are "
                         "usually at 'model.layers')") from None
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"anymoe_config.prefix: {prefix!r} is a {type(stack).__name__}, not the list of decoder "
                         "layers")
    outside = sorted(i for i in layers if i >= len(stack))
    if outside:
        raise ValueError(f"anymoe_config.layers: {outside} out of range: the model has {len(stack)} decoder layers")
    found = []
    for index in sorted(set(layers)) or range(len(stack)):
        module = getattr(stack[index], mlp, None)
        if not isinstance(module, nn.Module) or not any(isinstance(m, Linear) for m in module.modules()):
            raise ValueError(f"anymoe_config.mlp: decoder layer {prefix}.{index} has no MLP named {mlp!r}")
        if any(isinstance(m, (FusedMoE, AnyMoeMlp)) for m in module.modules()):
            raise ValueError(f"anymoe_config.mlp: {prefix}.{index}.{mlp} is a mixture of experts already")
        found.append((index, module))
    return found


def _renamed(expert: nn.Module, path: str) -> nn.Module:
    """`expert` with its linears' prefixes (error messages, ISQ rules) under `path`."""
    for name, module in expert.named_modules():
        if isinstance(module, Linear):
            module.prefix = f"{path}.{name}"
    return expert


def fine_tuned_expert(model: nn.Module, base: nn.Module, tensors: Mapping[str, torch.Tensor], path: str,
                      source: str) -> nn.Module:
    """A copy of the MLP `base` holding the checkpoint tensors `tensors` (names relative to the MLP, e.g.
    `gate_proj.weight`; fused through the family's `STACKED_PARAMS`), placed at `path`. ValueError naming `source`
    when a tensor is missing, left over or of another shape."""
    expert = copy.deepcopy(base)
    stacked = stacked_params_of(model)
    try:
        consumed = load_checkpoint_weights(expert, tensors.items(), stacked, lambda name: False)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    missing = expected_checkpoint_names(expert, stacked, lambda name: False) - consumed
    unexpected = set(tensors) - consumed
    if missing or unexpected:
        raise ValueError(f"{source}: its MLP does not match the base model's (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
    return _renamed(expert, path)


def lora_expert(model: nn.Module, base: nn.Module, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                scale: float, path: str, source: str) -> nn.Module:
    """A copy of the MLP `base` with `W += scale * B @ A` for every projection of `deltas` (name relative to the
    MLP, e.g. `gate_proj` -> (lora_A [rank, in], lora_B [out, rank])), placed at `path`."""
    expert = copy.deepcopy(base)
    modules, stacked = dict(expert.named_modules()), stacked_params_of(model)
    for name, (a, b) in deltas.items():
        try:
            linear, offset, size = resolve_target(expert, modules, stacked, name, source)
        except ValueError:
            raise ValueError(f"anymoe_config.expert_type.target_modules: {name!r} is not a projection of the MLP "
                             f"{path} (its linears: {sorted(n for n, m in modules.items() if isinstance(m, Linear))})"
                             ) from None
        if a.shape[1] != linear.in_features or b.shape[0] != size:
            raise ValueError(f"{source}: {name} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                             f"layer ({linear.in_features} in, {size} out)")
        weight = linear.quant_method.dense_weight(linear)
        with torch.no_grad():
            rows = weight.narrow(0, offset, size)
            delta = (b.to(rows.device, torch.float32) @ a.to(rows.device, torch.float32)) * scale
            rows.copy_((rows.float() + delta).to(weight.dtype))
    return _renamed(expert, path)


def install(stack_owner: nn.Module, prefix: str, mlp: str, experts: dict[int, list[nn.Module]], hidden_size: int,
            seed: int = 0) -> list[AnyMoeMlp]:
    """Replaces `<prefix>.<layer>.<mlp>` of every layer in `experts` (layer -> experts 1..n) by an `AnyMoeMlp`
    over the base MLP and those experts, its gate initialized from `seed`; returns the new layers."""
    stack = stack_owner.get_submodule(prefix)
    generator = torch.Generator().manual_seed(seed)
    installed = []
    for index, added in sorted(experts.items()):
        base = getattr(stack[index], mlp)
        device = next(base.parameters()).device
        moe = AnyMoeMlp([_renamed(base, f"{prefix}.{index}.{mlp}.experts.0"), *added], hidden_size, index,
                        device=device, generator=generator)
        setattr(stack[index], mlp, moe)
        installed.append(moe)
    return installed


def gate_tensors(layers: list[AnyMoeMlp]) -> dict[str, torch.Tensor]:
    """The gates as gate.safetensors stores them: `moe_gate.<layer>.weight` / `.bias` (float32, on the CPU)."""
    tensors = {}
    for layer in layers:
        tensors[f"moe_gate.{layer.layer_idx}.weight"] = layer.gate.weight.detach().cpu().contiguous()
        tensors[f"moe_gate.{layer.layer_idx}.bias"] = layer.gate.bias.detach().cpu().contiguous()
    return tensors


def load_gate_tensors(layers: list[AnyMoeMlp], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Sets every layer's gate from `tensors` (the `gate_tensors` keys); ValueError naming `source` and the key
    that is missing, of another shape, or for a layer that has no gate."""
    expected = gate_tensors(layers)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{source}: gates for layers AnyMoE is not applied to ({extra[:4]}); anymoe_config.layers "
                         f"selects {[layer.layer_idx for layer in layers]}")
    for layer in layers:
        for name, param in (("weight", layer.gate.weight), ("bias", layer.gate.bias)):
            key = f"moe_gate.{layer.layer_idx}.{name}"
            if key not in tensors:
                raise ValueError(f"{source}: no {key!r}")
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, the gate takes "
                                 f"{tuple(param.shape)} (hidden size x {layer.num_experts} experts)")
            with torch.no_grad():
                param.copy_(tensors[key].to(param.device, torch.float32))
