"""X-LoRA (REFERENCE §6.3, arXiv 2402.07148): a classifier mixes LoRA experts per token and per LoRA layer.

An X-LoRA repo holds `xlora_config.json`, `xlora_classifier.safetensors` (`inner.{i}.weight/bias`, then
`last.weight/bias`) and one PEFT LoRA folder per adapter. The adapters are hooked into `Linear.adapters` like
switchable LoRA adapters (mistralrs/adapters/lora.py); each step the `AdapterRuntime` (runtime.py) runs the scaling
pass, this classifier, and the real pass with the scalings as the per-token adapter weights.

Where peft's `XLoraModel` differs (peft is the test oracle for a full-sequence forward):
- peft's classifier always puts a ReLU between its linears when `xlora_depth > 1`; the reference does so only with
  `enable_relu_and_dropout` (followed here). Dropout is inactive at inference in both.
- peft saves its classifier inside `adapter_model.safetensors` as `internal_xlora_classifier.layers.{k}` with
  `adapter_config.json`; the reference reads `xlora_config.json` and `xlora_classifier.safetensors` (read here).
- The reference's default `xlora_size` is 1 (peft: 2048); it only matters for `xlora_depth > 1`, where the size is
  taken from the classifier's weights when the config leaves it out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from safetensors.torch import load_file
from torch import nn

from mistralrs.adapters.lora import (
    AdapterFiles, LoraState, check_ordering_layers, check_targets, hook_adapter, load_lora_adapter,
    lora_layer_indices, shard_adapter,
)
from mistralrs.adapters.ordering import same_model_id

CONFIG_FILE = "xlora_config.json"
CLASSIFIER_FILE = "xlora_classifier.safetensors"


@dataclass(frozen=True)
class XLoraConfig:
    """`xlora_config.json` (REFERENCE §6.3); keys not listed here (peft's bookkeeping) are ignored."""

    hidden_size: int  # hidden size of the base model (the classifier's input)
    adapters: tuple[str, ...]  # adapter names (a list, or the keys of a dict)
    base_model_id: str | None = None  # the base the experts were trained on; checked against the ordering file
    layerwise_scalings: bool = False  # one scaling per LoRA layer (else one broadcast to every layer)
    enable_relu_and_dropout: bool = False  # ReLU (and dropout, inactive here) after each inner linear
    xlora_depth: int = 1  # linears in the classifier (inner ones plus `last`)
    xlora_size: int | None = None  # width of the inner linears; None: from the classifier weights
    xlora_dropout_p: float = 0.2  # dropout probability (training only)
    enable_softmax: bool = True  # softmax over the adapter axis
    enable_softmax_topk: bool = False  # softmax over the top-k only: not implemented (as in the reference)
    softmax_temperature: float = 1.0  # logits are divided by it before the softmax
    scaling_pass_value: float = 0.0  # every scaling during the scaling pass (0: the base model alone)
    use_bias: bool = True  # the classifier's linears have biases
    global_scaling_weight: float = 1.0  # multiplies every adapter's output in the real pass
    top_k_lora: int | None = None  # keep the k largest scalings per token and layer, zero the rest

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"xlora_config.json: hidden_size must be a positive int, got {self.hidden_size!r}")
        if not self.adapters:
            raise ValueError("xlora_config.json: adapters must name at least one adapter")
        if not isinstance(self.xlora_depth, int) or self.xlora_depth < 1:
            raise ValueError(f"xlora_config.json: xlora_depth must be an int >= 1, got {self.xlora_depth!r}")
        if self.enable_softmax_topk:
            raise ValueError("xlora_config.json: enable_softmax_topk=true is not implemented (accepted: false)")
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= len(self.adapters):
            raise ValueError(f"xlora_config.json: top_k_lora must be in [1, {len(self.adapters)}] or null, "
                             f"got {self.top_k_lora!r}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"xlora_config.json: softmax_temperature must be > 0, got {self.softmax_temperature!r}")


def parse_xlora_config(data: dict) -> XLoraConfig:
    """Validates the JSON object of `xlora_config.json`."""
    if not isinstance(data, dict):
        raise ValueError(f"xlora_config.json must hold a JSON object, got {type(data).__name__}")
    adapters = data.get("adapters")
    if isinstance(adapters, dict):
        adapters = list(adapters)
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"xlora_config.json: adapters must be a list of names or a dict, got {adapters!r}")
    known = {f.name for f in fields(XLoraConfig)} - {"adapters", "hidden_size"}
    values = {k: v for k, v in data.items() if k in known and v is not None}
    return XLoraConfig(hidden_size=data.get("hidden_size"), adapters=tuple(adapters), **values)


class XLoraClassifier(nn.Module):
    """The scalings MLP: `inner` linears (ReLU after each with `enable_relu_and_dropout`), then `last`, softmax
    with temperature. `hidden [num_tokens, hidden_size]` -> `[num_tokens, num_adapters]`, or
    `[num_tokens, num_lora_layers, num_adapters]` with `layerwise_scalings`."""

    def __init__(self, config: XLoraConfig, inner_size: int, num_lora_layers: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.num_adapters = len(config.adapters)
        self.num_lora_layers = num_lora_layers
        widths = [config.hidden_size] + [inner_size] * (config.xlora_depth - 1)
        self.inner = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], bias=config.use_bias, dtype=dtype,
                                             device=device) for i in range(config.xlora_depth - 1))
        outputs = self.num_adapters * (num_lora_layers if config.layerwise_scalings else 1)
        self.last = nn.Linear(widths[-1], outputs, bias=config.use_bias, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for linear in self.inner:
            hidden = linear(hidden)
            if self.config.enable_relu_and_dropout:
                hidden = torch.relu(hidden)
        logits = self.last(hidden)
        if self.config.layerwise_scalings:
            logits = logits.view(hidden.shape[0], self.num_lora_layers, self.num_adapters)
        if self.config.enable_softmax:
            logits = torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        return logits


@dataclass
class XLoraSpec:
    """What the runtime needs to run X-LoRA; held by the model's `LoraState`."""

    config: XLoraConfig
    classifier: XLoraClassifier
    non_granular_index: int | None  # tgt_non_granular_index: completion tokens after which scalings freeze

    def finish(self, scalings: torch.Tensor) -> torch.Tensor:
        """Top-k (when set) and the global weight, applied to classifier output or scaling-pass values."""
        k = self.config.top_k_lora
        if k is not None:
            keep = torch.zeros_like(scalings, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(scalings, k=k, dim=-1).indices, True)
            scalings = scalings * keep.to(scalings.dtype)
        return scalings * self.config.global_scaling_weight

    def pass_weights(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Adapter weights of the scaling pass: every scaling `scaling_pass_value`; None when 0 (base only)."""
        value = self.config.scaling_pass_value
        if value == 0:
            return None
        layers = (self.classifier.num_lora_layers,) if self.config.layerwise_scalings else ()
        dtype = self.classifier.last.weight.dtype
        full = torch.full((num_tokens, *layers, self.classifier.num_adapters), float(value), dtype=dtype,
                          device=device)
        return self.finish(full)


@dataclass(frozen=True)
class XLoraFiles:
    """An X-LoRA repo as the loader resolved it: its config, the local files of its experts and its classifier."""

    config: XLoraConfig  # xlora_config.json, parsed
    experts: Mapping[str, AdapterFiles]  # the files of every adapter the config names, by name
    classifier_path: str  # xlora_classifier.safetensors


def read_xlora_config(path: str) -> XLoraConfig:
    """`xlora_config.json` of an X-LoRA repo, at `path`."""
    with open(path, encoding="utf-8") as f:
        return parse_xlora_config(json.load(f))


def load_classifier(path: str, config: XLoraConfig, num_lora_layers: int, *, dtype: torch.dtype,
                    device: torch.device) -> XLoraClassifier:
    """Builds the classifier from `xlora_classifier.safetensors` at `path`; ValueError on a missing, extra or
    misshapen tensor (naming it)."""
    tensors = load_file(path)
    inner_size = config.xlora_size
    if inner_size is None and config.xlora_depth > 1:
        inner_size = tensors["inner.0.weight"].shape[0] if "inner.0.weight" in tensors else 1
    classifier = XLoraClassifier(config, inner_size or 1, num_lora_layers, dtype, device)
    expected = classifier.state_dict()
    for name in sorted(set(tensors) | set(expected)):
        if name not in expected:
            raise ValueError(f"{CLASSIFIER_FILE}: unexpected tensor {name!r} (expected {sorted(expected)})")
        if name not in tensors:
            raise ValueError(f"{CLASSIFIER_FILE}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(expected[name].shape):
            raise ValueError(f"{CLASSIFIER_FILE}: {name!r} has shape {tuple(tensors[name].shape)}, expected "
                             f"{tuple(expected[name].shape)} ({len(config.adapters)} adapters, "
                             f"{num_lora_layers} LoRA layers, layerwise_scalings={config.layerwise_scalings})")
    classifier.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return classifier.eval().requires_grad_(False)


def _check_consistency(config: XLoraConfig, ordering, model: nn.Module) -> None:
    if not ordering.order:
        raise ValueError("ordering file: order is required for X-LoRA (the adapters in training order)")
    if ordering.preload_adapters:
        raise ValueError("ordering file: preload_adapters is for LoRA only, not X-LoRA")
    if sorted(ordering.order) != sorted(config.adapters):
        raise ValueError(f"ordering file: order {ordering.order!r} does not name the adapters of xlora_config.json "
                         f"{list(config.adapters)!r}")
    if config.base_model_id is not None and not same_model_id(config.base_model_id, ordering.base_model_id):
        raise ValueError(f"xlora_config.json: base_model_id {config.base_model_id!r} disagrees with the ordering "
                         f"file's base_model_id {ordering.base_model_id!r}")
    hidden = getattr(getattr(model, "config", None), "hidden_size", config.hidden_size)
    if hidden != config.hidden_size:
        raise ValueError(f"xlora_config.json: hidden_size {config.hidden_size} disagrees with the model's {hidden}")


def apply_xlora(model: nn.Module, ordering, files: XLoraFiles, *, dtype: torch.dtype, device: torch.device,
                non_granular_index: int | None = None) -> LoraState:
    """Hooks the X-LoRA experts in `files` into `model` (adapter j = `ordering.order[j]`, the classifier's class
    j) and attaches the classifier to their `LoraState`."""
    if non_granular_index is not None and non_granular_index < 0:
        raise ValueError(f"tgt_non_granular_index must be >= 0 or None, got {non_granular_index!r}")
    config = files.config
    _check_consistency(config, ordering, model)
    names = check_ordering_layers(model, ordering)
    adapters = [shard_adapter(model, load_lora_adapter(files.experts[n], dtype=dtype, device=device))
                for n in ordering.order]
    for adapter in adapters:
        check_targets(adapter, names)
    used = {module for adapter in adapters for module in adapter.weights}
    indices = lora_layer_indices(model, used, ordering.layers)
    num_lora_layers = max(indices.values()) + 1 if indices else 0
    state = LoraState(list(ordering.order))
    for adapter in adapters:
        hook_adapter(model, adapter, state, indices)
    classifier = load_classifier(files.classifier_path, config, num_lora_layers, dtype=dtype, device=device)
    state.xlora = XLoraSpec(config, classifier, non_granular_index)
    return state
