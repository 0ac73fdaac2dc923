"""LoRA adapters in the PEFT layout (REFERENCE §6.2): load, check against the model, merge or hook.

An adapter folder holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` `[r, in]` and `lora_B.weight`
`[out, r]`. Module names are the Hugging Face ones; a module fused here (q/k/v -> qkv_proj, gate/up ->
gate_up_proj) is reached through the model family's `STACKED_PARAMS` table and its shard's output rows; an
expert projection of a `FusedMoE` (`experts.{e}.w1`, ...) through `adapters/moe_lora.py`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load_file
from torch import nn

from mistralrs.adapters.moe_lora import (
    ExpertLoraHook,
    expert_module_names,
    hook_expert,
    merge_expert,
    resolve_expert_target,
)
from mistralrs.layers.linear import Linear, StackedParam
from mistralrs.layers.moe import FusedMoE
from mistralrs.worker.forward_batch import ForwardBatch

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = ("use_dora", "fan_in_fan_out", "lora_bias")


@dataclass
class LoraAdapter:
    """One LoRA adapter: per Hugging Face module name, its `A [r, in]` and `B [out, r]`."""

    name: str  # adapter name (ordering file)
    rank: int  # r
    scale: float  # lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; 0 when r = 0)
    target_modules: list[str]  # module-name suffixes from adapter_config.json (empty when given as a regex)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # HF module name -> (A, B)


@dataclass(frozen=True)
class AdapterFiles:
    """The local files of one LoRA adapter (PEFT layout), as the loader resolved them."""

    name: str  # the adapter's name (ordering file)
    config_path: str  # its adapter_config.json
    tensor_paths: tuple[str, ...]  # its *.safetensors weights


def _read_config(path: str, name: str) -> tuple[int, float, list[str]]:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise ValueError(f"adapter {name!r}: adapter_config.json {flag}=true is not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise ValueError(f"adapter {name!r}: adapter_config.json {pattern} is not supported")
    if config.get("target_parameters"):   # peft's LoRA on raw parameters (e.g. fused MoE experts), not on a Linear
        raise ValueError(f"adapter {name!r}: adapter_config.json target_parameters "
                         f"{config['target_parameters']!r} is not supported (only target_modules: linear layers)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 0 or not isinstance(alpha, (int, float)):
        raise ValueError(f"adapter {name!r}: adapter_config.json needs integer r >= 0 and numeric lora_alpha, "
                         f"got r={rank!r}, lora_alpha={alpha!r}")
    if rank == 0:
        scale = 0.0
    else:
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = config.get("target_modules") or []
    return rank, float(scale), sorted(targets) if isinstance(targets, list) else []


def load_lora_adapter(files: AdapterFiles, *, dtype: torch.dtype, device: torch.device) -> LoraAdapter:
    """Reads the adapter in `files`; ValueError on a foreign key or a rank that disagrees with `r`."""
    name = files.name
    rank, scale, targets = _read_config(files.config_path, name)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for path in files.tensor_paths:
        for key, tensor in load_file(path).items():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (only Linear LoRA "
                                 "weights are supported)")
            halves.setdefault(match["module"], {})[match["ab"]] = tensor.to(device=device, dtype=dtype)
    weights = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {name!r}: module {module!r} has lora_{set(pair).pop()} without its pair")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"adapter {name!r}: module {module!r} has rank mismatch: lora_A {tuple(a.shape)}, "
                             f"lora_B {tuple(b.shape)}, adapter_config.json r={rank}")
        weights[module] = (a, b)
    return LoraAdapter(name, rank, scale, targets, weights)


def stacked_params_of(model: nn.Module) -> tuple[StackedParam, ...]:
    """The fused-projection table of the model's family: its class's `STACKED_PARAMS` (empty for a family whose
    checkpoint is already fused, as Phi3's `qkv_proj` / `gate_up_proj`)."""
    return tuple(getattr(type(model), "STACKED_PARAMS", ()))


def model_module_names(model: nn.Module) -> set[str]:
    """Hugging Face module names of the model's weights (`model.layers.0.self_attn.q_proj`, ...)."""
    return {name.rpartition(".")[0] for name in model.expected_weight_names()}


def _linear_of(modules: dict[str, nn.Module], stacked, hf_module: str) -> tuple[Linear, int | None] | None:
    """HF module name -> (our Linear, its fused shard index or None for the whole layer); None when not a Linear."""
    module = modules.get(hf_module)
    if isinstance(module, Linear):
        return module, None
    parent, _, local = hf_module.rpartition(".")
    for entry in stacked:
        fused = modules.get(f"{parent}.{entry.fused_name}" if parent else entry.fused_name)
        if entry.shard_name == local and isinstance(fused, Linear):
            return fused, entry.shard_index
    return None


def resolve_target(model: nn.Module, modules: dict[str, nn.Module], stacked, hf_module: str,
                   adapter: str) -> tuple[Linear, int, int]:
    """HF module name -> (our Linear, first output row, row count)."""
    found = _linear_of(modules, stacked, hf_module)
    if found is None:
        raise ValueError(f"adapter {adapter!r}: module {hf_module!r} is not a linear layer of this model")
    linear, shard_index = found
    if shard_index is None:
        return linear, 0, linear.out_features
    offset, size = linear.shard_range(shard_index)
    return linear, offset, size


def shard_adapter(model: nn.Module, adapter: LoraAdapter) -> LoraAdapter:
    """`adapter` with each module's A/B cut to what the (tensor-parallel) layer it targets holds on this rank:
    B's rows of a column-parallel layer's part, A's columns of a row-parallel layer (its partial delta is summed with
    the product), an expert projection's intermediate range. Modules of unsplit layers keep their A/B."""
    modules, stacked = dict(model.named_modules()), stacked_params_of(model)
    weights = {}
    for hf_module, (a, b) in adapter.weights.items():
        expert = resolve_expert_target(modules, hf_module)
        found = _linear_of(modules, stacked, hf_module)
        if expert is not None and expert.moe.tp_group is not None:
            start, size = expert.moe.tp_rows
            a, b = (a.narrow(1, start, size), b) if expert.projection == "down" else (a, b.narrow(0, start, size))
        elif expert is None and found is not None and found[0].tp is not None:
            linear, shard_index = found
            a, b = linear.tp.lora_factors(a, b, shard_index, linear.checkpoint_partition_sizes)
        weights[hf_module] = (a.contiguous(), b.contiguous())
    return replace(adapter, weights=weights)


def check_targets(adapter: LoraAdapter, names: set[str]) -> None:
    """ValueError naming a `target_modules` entry that matches no module of the model."""
    for target in adapter.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"adapter {adapter.name!r}: target module {target!r} matches no layer of the model")


def _check_shapes(adapter: LoraAdapter, hf_module: str, linear: Linear, size: int) -> None:
    a, b = adapter.weights[hf_module]
    if a.shape[1] != linear.in_features or b.shape[0] != size:
        raise ValueError(f"adapter {adapter.name!r}: module {hf_module!r} shape mismatch: lora_A {tuple(a.shape)}, "
                         f"lora_B {tuple(b.shape)}, layer takes {linear.in_features} and gives {size}")


def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> None:
    """W += scale * B @ A for every module of `adapter`, into the fused shard's (or stacked expert's) rows."""
    modules, stacked = dict(model.named_modules()), stacked_params_of(model)
    for hf_module, (a, b) in adapter.weights.items():
        expert = resolve_expert_target(modules, hf_module)
        if expert is not None:
            merge_expert(adapter, hf_module, expert)
            continue
        linear, offset, size = resolve_target(model, modules, stacked, hf_module, adapter.name)
        _check_shapes(adapter, hf_module, linear, size)
        weight = linear.quant_method.dense_weight(linear)
        if weight is None:
            raise ValueError(f"adapter {adapter.name!r}: cannot merge into {hf_module!r}: its weights are not dense "
                             f"({type(linear.quant_method).__name__})")
        delta = (b.float() @ a.float()) * adapter.scale
        with torch.no_grad():
            rows = weight.narrow(0, offset, size)
            rows.copy_((rows.float() + delta).to(weight.dtype))


class LoraState:
    """The adapters a model holds separately (switchable LoRA or X-LoRA experts), shared by all its `LoraHook`s.

    Column j of the per-token adapter weights (`ForwardBatch.adapter_weights`) belongs to `names[j]`. During an
    engine step the hooks apply the weights of the running step's batch (`ForwardBatch.current()`, set by the
    `AdapterRuntime`); a model called outside a step applies the Runner's active set to every token.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = tuple(names)  # every adapter loaded separately, in column order
        self.active: tuple[str, ...] = ()  # the Runner's active set; replaced whole, so a step sees one set
        self.xlora = None  # XLoraSpec (adapters/xlora.py) when the adapters are X-LoRA experts; None for LoRA
        self._active_row: torch.Tensor | None = None  # [1, num_adapters] row of `active` (None when empty)

    def check(self, names: list[str], what: str) -> tuple[str, ...]:
        """`names` without repeats; ValueError naming an unknown adapter and the loaded ones."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"{what}: Cannot load adapter {unknown[0]!r}: not a loaded adapter "
                             f"(loaded: {list(self.names)})")
        return tuple(dict.fromkeys(names))

    def activate(self, names: list[str]) -> None:
        """Replaces the active set; ValueError naming any unknown adapter."""
        self.active = self.check(list(names), "activate_adapters")
        self._active_row = self.set_weights([self.active])

    def set_weights(self, sets: list[tuple[str, ...]]) -> torch.Tensor | None:
        """`[len(sets), num_adapters]` rows with 1 in the columns of each set's adapters; None when all are empty."""
        if not any(sets):
            return None
        rows = torch.zeros(len(sets), len(self.names))
        for i, names in enumerate(sets):
            for name in names:
                rows[i, self.names.index(name)] = 1.0
        return rows

    def weights_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-token weights the hooks apply to `x` `[num_tokens, in]`: within a step its batch's
        `adapter_weights` (`[num_tokens, num_adapters]` or `[num_tokens, num_lora_layers, num_adapters]`, from the
        batch's copy on `x`'s device), else the active set's row for every token; None: skip the adapters."""
        batch = ForwardBatch.current()
        if batch is not None:
            weights = batch.on(x.device).adapter_weights
            if weights is not None and weights.shape[0] != x.shape[0]:
                raise ValueError(f"adapter weights cover {weights.shape[0]} tokens, the layer got {x.shape[0]} "
                                 "(a separately held adapter on a layer outside the packed token axis)")
            return weights
        if self._active_row is None:
            return None
        if self._active_row.device != x.device:
            self._active_row = self._active_row.to(x.device)
        return self._active_row.expand(x.shape[0], -1)


class LoraHook(nn.Module):
    """A `Linear.adapters` entry: `y += sum_j w[t, j] * scale_j * B_j(A_j(x[t]))` in each adapter's rows, with
    `w` the per-token adapter weights of the state (per LoRA layer for layerwise X-LoRA).

    Batched: the A's of every adapter (and fused shard) form one matrix and the B's one block matrix, so a step
    is two matmuls whatever the adapter mix; it is skipped when no token uses an adapter.
    """

    def __init__(self, state: LoraState, out_features: int) -> None:
        super().__init__()
        self.state = state
        self.out_features = out_features
        # (adapter column, LoRA-layer index, A [r, in], B [size, r], scale, first row, row count)
        self.entries: list[tuple[int, int, torch.Tensor, torch.Tensor, float, int, int]] = []
        self._packed: tuple[torch.Tensor, ...] | None = None  # (A_cat, B_cat, column of each rank, layer of each)

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float, offset: int, size: int,
            layer_index: int = 0) -> None:
        """Registers adapter `name`'s A/B for rows `[offset, offset + size)`, as LoRA layer `layer_index`."""
        self.entries.append((self.state.names.index(name), layer_index, a, b, scale, offset, size))
        self._packed = None

    def _pack(self) -> tuple[torch.Tensor, ...]:
        if self._packed is None:
            a_cat = torch.cat([a for _, _, a, _, _, _, _ in self.entries])  # [R, in]
            b_cat = a_cat.new_zeros(self.out_features, a_cat.shape[0])  # [out, R], scale folded in
            columns, layers, start = [], [], 0
            for column, layer, a, b, scale, offset, size in self.entries:
                rank = a.shape[0]
                b_cat[offset:offset + size, start:start + rank] = b * scale
                columns += [column] * rank
                layers += [layer] * rank
                start += rank
            device = a_cat.device
            self._packed = (a_cat, b_cat, torch.tensor(columns, device=device), torch.tensor(layers, device=device))
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.state.weights_for(x)
        if weights is None or not self.entries:
            return x.new_zeros(())
        a_cat, b_cat, columns, layers = self._pack()
        if weights.dim() == 3:   # layerwise: pick each rank's own LoRA layer
            columns = layers * weights.shape[2] + columns
            weights = weights.reshape(weights.shape[0], -1)
        rank_weights = weights.to(device=x.device, dtype=x.dtype).index_select(1, columns)  # [num_tokens, R]
        return ((x @ a_cat.t()) * rank_weights) @ b_cat.t()


def lora_layer_indices(model: nn.Module, modules_used: set[str], layers: dict[str, int]) -> dict[str, int]:
    """HF module name -> LoRA-layer index (the layer axis of X-LoRA scalings): the ordering file's `layers` when
    given, otherwise the modules that carry an adapter numbered in the model's module order (shards in their
    fused order, a `FusedMoE`'s experts in expert order, each in checkpoint-name order: gate, up, down), as peft
    numbers them where the Hugging Face model declares its modules in the same order."""
    if layers:
        missing = sorted(m for m in modules_used if m not in layers)
        if missing:
            raise ValueError(f"ordering file: layers has no index for adapter module {missing[0]!r}")
        return {m: layers[m] for m in modules_used}
    stacked, indices = stacked_params_of(model), {}
    for path, module in model.named_modules():
        if isinstance(module, FusedMoE):
            for name in expert_module_names(module, path):
                if name in modules_used:
                    indices[name] = len(indices)
            continue
        if not isinstance(module, Linear):
            continue
        parent, _, local = path.rpartition(".")
        shards = sorted((e for e in stacked if e.fused_name == local), key=lambda e: e.shard_index)
        for name in [path] + [f"{parent}.{e.shard_name}" if parent else e.shard_name for e in shards]:
            if name in modules_used:
                indices[name] = len(indices)
    return indices


def hook_adapter(model: nn.Module, adapter: LoraAdapter, state: LoraState,
                 layer_indices: dict[str, int] | None = None) -> None:
    """Keeps `adapter` separate: adds its A/B to the `LoraHook` of each layer it touches (as LoRA layer
    `layer_indices[module]`, 0 when not given)."""
    modules, stacked = dict(model.named_modules()), stacked_params_of(model)
    for hf_module, (a, b) in adapter.weights.items():
        expert = resolve_expert_target(modules, hf_module)
        if expert is not None:
            hook_expert(adapter, hf_module, expert, state, (layer_indices or {}).get(hf_module, 0))
            continue
        linear, offset, size = resolve_target(model, modules, stacked, hf_module, adapter.name)
        _check_shapes(adapter, hf_module, linear, size)
        if linear is getattr(model, "lm_head", None):
            raise ValueError(f"adapter {adapter.name!r}: module {hf_module!r}: an adapter on lm_head can only be "
                             "merged (a LoRA without preload_adapters on a dense base)")
        hook = next((h for h in linear.adapters if isinstance(h, LoraHook)), None)
        if hook is None:
            hook = LoraHook(state, linear.out_features)
            linear.adapters.append(hook)
        hook.add(adapter.name, a, b, adapter.scale, offset, size, (layer_indices or {}).get(hf_module, 0))


def lora_state_of(model: nn.Module) -> LoraState | None:
    """The model's `LoraState` (None when it holds no separate adapters)."""
    for module in model.modules():
        if isinstance(module, (Linear, FusedMoE)):
            for hook in module.adapters:
                if isinstance(hook, (LoraHook, ExpertLoraHook)):
                    return hook.state
    return None


def activate_adapters(model: nn.Module, names: list[str]) -> None:
    """Replaces the active adapter set of `model`; ValueError when it has no separate adapters or a name is unknown."""
    state = lora_state_of(model)
    if state is None or state.xlora is not None:
        raise ValueError(f"activate_adapters({names!r}): this model has no preloaded LoRA adapters (adapters in "
                         "the ordering file's order are merged unless preload_adapters is given; X-LoRA "
                         "chooses its adapters itself)")
    state.activate(list(names))


def check_ordering_layers(model: nn.Module, ordering) -> set[str]:
    """The model's HF module names; ValueError when the ordering file's `layers` names a module it lacks."""
    names = model_module_names(model)
    for layer in ordering.layers:
        if layer not in names:
            raise ValueError(f"ordering file: layers names {layer!r}, which is not a layer of the model")
    return names


def apply_lora(model: nn.Module, ordering, adapter_files: list[AdapterFiles], *, dtype: torch.dtype,
               device: torch.device, mergeable: bool = True) -> None:
    """Applies the adapters of `ordering` (their files: those of `order`, then the other preloaded ones) to `model`:
    merged into the base without `preload_adapters` (when `mergeable`, i.e. the base weights are dense), otherwise
    all kept separate with those in `order` active."""
    names = check_ordering_layers(model, ordering)
    adapters = [shard_adapter(model, load_lora_adapter(files, dtype=dtype, device=device)) for files in adapter_files]
    for adapter in adapters:
        check_targets(adapter, names)
    if not ordering.preload_adapters and mergeable:
        for adapter in adapters:
            merge_adapter(model, adapter)
        return
    state = LoraState([a.name for a in adapters])
    for adapter in adapters:
        hook_adapter(model, adapter, state)
    state.activate(ordering.order)
