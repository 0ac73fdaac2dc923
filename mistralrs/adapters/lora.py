"""LoRA adapters in the PEFT layout (REFERENCE §6.2): load, check against the model, merge or hook.

An adapter folder holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` `[r, in]` and `lora_B.weight`
`[out, r]`. Module names are the Hugging Face ones; a module fused here (q/k/v -> qkv_proj, gate/up ->
gate_up_proj) is reached through the model family's `STACKED_PARAMS` table and its shard's output rows.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from mistralrs.layers.linear import Linear, StackedParam
from mistralrs.loader.source import ModelSource

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


def _adapter_files(source: ModelSource, name: str, allow_root: bool) -> tuple[str, list[str]]:
    """(adapter_config.json path, safetensors paths) of adapter `name`: files with `name` as a folder of their path
    (or, when `allow_root`, the repo's own top-level files)."""
    files = source.list_files()
    mine = [f for f in files if name in f.split("/")[:-1]]
    if not mine and allow_root:
        mine = [f for f in files if "/" not in f]
    configs = [f for f in mine if f.rsplit("/", 1)[-1] == "adapter_config.json"]
    tensors = sorted(f for f in mine if f.endswith(".safetensors"))
    if len(configs) != 1 or not tensors:
        raise ValueError(f"Cannot load adapter {name!r}: {source.model_id!r} needs one adapter_config.json and "
                         f"*.safetensors weights under {name}/ (found {len(configs)} configs, {len(tensors)} weights)")
    return source.get(configs[0]), [source.get(f) for f in tensors]


def _read_config(path: str, name: str) -> tuple[int, float, list[str]]:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise ValueError(f"adapter {name!r}: adapter_config.json {flag}=true is not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise ValueError(f"adapter {name!r}: adapter_config.json {pattern} is not supported")
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


def load_lora_adapter(source: ModelSource, name: str, *, dtype: torch.dtype, device: torch.device,
                      allow_root: bool = False) -> LoraAdapter:
    """Reads adapter `name` from `source` (PEFT layout); ValueError on a missing file, a foreign key or a rank that
    disagrees with `r`."""
    config_path, tensor_paths = _adapter_files(source, name, allow_root)
    rank, scale, targets = _read_config(config_path, name)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for path in tensor_paths:
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
    """The fused-projection table of the model's family (`STACKED_PARAMS` of its module or a base class's)."""
    for cls in type(model).__mro__:
        table = getattr(sys.modules.get(cls.__module__), "STACKED_PARAMS", None)
        if table is not None:
            return tuple(table)
    return ()


def model_module_names(model: nn.Module) -> set[str]:
    """Hugging Face module names of the model's weights (`model.layers.0.self_attn.q_proj`, ...)."""
    return {name.rpartition(".")[0] for name in model.expected_weight_names()}


def resolve_target(model: nn.Module, modules: dict[str, nn.Module], stacked, hf_module: str,
                   adapter: str) -> tuple[Linear, int, int]:
    """HF module name -> (our Linear, first output row, row count)."""
    module = modules.get(hf_module)
    if isinstance(module, Linear):
        return module, 0, module.out_features
    parent, _, local = hf_module.rpartition(".")
    for entry in stacked:
        fused = modules.get(f"{parent}.{entry.fused_name}" if parent else entry.fused_name)
        if entry.shard_name == local and isinstance(fused, Linear):
            offset, size = fused.shard_range(entry.shard_index)
            return fused, offset, size
    raise ValueError(f"adapter {adapter!r}: module {hf_module!r} is not a linear layer of this model")


def _check_targets(adapter: LoraAdapter, names: set[str]) -> None:
    for target in adapter.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"adapter {adapter.name!r}: target module {target!r} matches no layer of the model")


def _check_shapes(adapter: LoraAdapter, hf_module: str, linear: Linear, size: int) -> None:
    a, b = adapter.weights[hf_module]
    if a.shape[1] != linear.in_features or b.shape[0] != size:
        raise ValueError(f"adapter {adapter.name!r}: module {hf_module!r} shape mismatch: lora_A {tuple(a.shape)}, "
                         f"lora_B {tuple(b.shape)}, layer takes {linear.in_features} and gives {size}")


def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> None:
    """W += scale * B @ A for every module of `adapter`, into the fused shard's rows where fused."""
    modules, stacked = dict(model.named_modules()), stacked_params_of(model)
    for hf_module, (a, b) in adapter.weights.items():
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
    """The adapters a model holds separately and the set that is active now; shared by all its `LoraHook`s."""

    def __init__(self, names: list[str]) -> None:
        self.names = tuple(names)  # every adapter loaded separately
        self.active: tuple[str, ...] = ()  # replaced whole, so a forward step sees one consistent set

    def activate(self, names: list[str]) -> None:
        """Replaces the active set; ValueError naming any unknown adapter."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"Cannot load adapter {unknown[0]!r}: not a loaded adapter (loaded: {list(self.names)})")
        self.active = tuple(dict.fromkeys(names))


class LoraHook(nn.Module):
    """A `Linear.adapters` entry: `sum over active adapters of scale * (x @ A^T) @ B^T` in each adapter's rows."""

    def __init__(self, state: LoraState, out_features: int) -> None:
        super().__init__()
        self.state = state
        self.out_features = out_features
        # adapter name -> [(A, B, scale, first row, row count)]
        self.entries: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, int, int]]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float, offset: int, size: int) -> None:
        """Registers adapter `name`'s A/B for rows `[offset, offset + size)`."""
        self.entries.setdefault(name, []).append((a, b, scale, offset, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = None
        for name in self.state.active:
            for a, b, scale, offset, size in self.entries.get(name, ()):
                part = (x @ a.t()) @ b.t() * scale
                if delta is None:
                    delta = x.new_zeros(*x.shape[:-1], self.out_features)
                delta[..., offset:offset + size] += part
        return x.new_zeros(()) if delta is None else delta


def hook_adapter(model: nn.Module, adapter: LoraAdapter, state: LoraState) -> None:
    """Keeps `adapter` separate: adds its A/B to the `LoraHook` of each layer it touches."""
    modules, stacked = dict(model.named_modules()), stacked_params_of(model)
    for hf_module, (a, b) in adapter.weights.items():
        linear, offset, size = resolve_target(model, modules, stacked, hf_module, adapter.name)
        _check_shapes(adapter, hf_module, linear, size)
        hook = next((h for h in linear.adapters if isinstance(h, LoraHook)), None)
        if hook is None:
            hook = LoraHook(state, linear.out_features)
            linear.adapters.append(hook)
        hook.add(adapter.name, a, b, adapter.scale, offset, size)


def lora_state_of(model: nn.Module) -> LoraState | None:
    """The model's `LoraState` (None when it holds no separate adapters)."""
    for module in model.modules():
        if isinstance(module, Linear):
            for hook in module.adapters:
                if isinstance(hook, LoraHook):
                    return hook.state
    return None


def activate_adapters(model: nn.Module, names: list[str]) -> None:
    """Replaces the active adapter set of `model`; ValueError when it has no separate adapters or a name is unknown."""
    state = lora_state_of(model)
    if state is None:
        raise ValueError(f"activate_adapters({names!r}): this model has no preloaded LoRA adapters (adapters in "
                         "the ordering file's order are merged unless preload_adapters is given)")
    state.activate(list(names))


def apply_lora(model: nn.Module, ordering, adapters_source: ModelSource, *, token: str | None,
               dtype: torch.dtype, device: torch.device) -> None:
    """Applies the adapters of `ordering` to `model`: merged into the base without `preload_adapters`, otherwise all
    kept separate with those in `order` active."""
    names = model_module_names(model)
    for layer in ordering.layers:
        if layer not in names:
            raise ValueError(f"ordering file: layers names {layer!r}, which is not a layer of the model")
    adapters = [load_lora_adapter(adapters_source, n, dtype=dtype, device=device) for n in ordering.order]
    if ordering.preload_adapters:
        for pre in ordering.preload_adapters:
            if pre.name not in ordering.order:
                source = ModelSource(pre.adapter_model_id, token=token)
                adapters.append(load_lora_adapter(source, pre.name, dtype=dtype, device=device, allow_root=True))
    for adapter in adapters:
        _check_targets(adapter, names)
    if not ordering.preload_adapters:
        for adapter in adapters:
            merge_adapter(model, adapter)
        return
    state = LoraState([a.name for a in adapters])
    for adapter in adapters:
        hook_adapter(model, adapter, state)
    state.activate(ordering.order)
