"""Reading `.safetensors` checkpoints and building a model from a config dict plus `(hf_name, tensor)` pairs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mistralrs.layers.linear import (
    Linear,
    UnquantizedLinearMethod,
    dense_weights_on_meta,
)
from mistralrs.layers.moe import FusedMoE, UnquantizedMoEMethod
from mistralrs.models.config import TextModelConfig
from mistralrs.models.registry import model_class_for
from mistralrs.quant.config import QuantConfig
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.worker.device_map import DeviceMapSpec

_MAX_LISTED_NAMES = 20  # names quoted in a missing/unexpected-weights error before it is cut short


def iter_safetensors(paths: list[str], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` for every tensor of `paths` in file order; floating tensors cast to `dtype` if given.

    Tensors are read one at a time (memory-mapped), so a model loads without holding two full copies.
    """
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                yield name, tensor


def _listed(names: set[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:_MAX_LISTED_NAMES])
    more = len(ordered) - _MAX_LISTED_NAMES
    return f"{shown} (and {more} more)" if more > 0 else shown


def materialize_meta_weights(model: nn.Module) -> None:
    """Layers still holding dense weights on the meta device (a quant config left them unquantized, e.g. the
    non-expert layers under MoQE) get real storage on their own device, before any weight is loaded."""
    for module in model.modules():
        if isinstance(module, Linear) and isinstance(module.quant_method, UnquantizedLinearMethod) \
                and module.weight.is_meta:
            module.set_quant_method(UnquantizedLinearMethod())
        elif isinstance(module, FusedMoE) and isinstance(module.quant_method, UnquantizedMoEMethod) \
                and module.w13.is_meta:
            module.set_quant_method(UnquantizedMoEMethod())


def load_all_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | GGMLTensor]]) -> None:
    """`model.load_weights(weights)`; ValueError listing the checkpoint names that are missing or that the model
    does not use."""
    provided: set[str] = set()

    def recorded() -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        for name, tensor in weights:
            provided.add(name)
            yield name, tensor

    consumed = model.load_weights(recorded())
    missing = model.expected_weight_names() - consumed
    unexpected = provided - consumed
    problems = []
    if missing:
        problems.append(f"missing weights: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_listed(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(problems))


def load_model(
    config_dict: dict[str, Any],
    weights: Iterable[tuple[str, torch.Tensor | GGMLTensor]],
    *,
    arch_name: Any = None,
    dtype: torch.dtype,
    device: torch.device | str,
    quant_config: QuantConfig | None = None,
    device_map: DeviceMapSpec | None = None,
) -> nn.Module:
    """Builds the registered model class for `config_dict` (or the forced `arch_name`) and loads `weights`.

    With `quant_config`, every Linear gets the config's quant method before loading (e.g. GGUF blocks kept
    quantized); without, Linear weights are dense in `dtype` (GGML blocks given anyway are dequantized).
    With a `device_map` that places decoder layers on other devices than `device`, each layer's weights are
    created and loaded on its own device (mistralrs/worker/device_map.py).

    Raises ValueError listing the checkpoint names that are missing or that the model does not use
    (a tied LM head may be absent; rotary `inv_freq` buffers are ignored). Returns the model in eval mode.
    """
    config = TextModelConfig.from_hf_dict(config_dict)
    cls = model_class_for(config.architectures, arch_name)
    placement = device_map.resolve(config.num_hidden_layers) if device_map is not None else None
    if quant_config is None and placement is None:
        model = cls(config, dtype=dtype, device=device)
    else:
        with dense_weights_on_meta():
            model = cls(config, dtype=dtype, device=device)
        if placement is not None:
            placement.place_layers(model)
        if quant_config is not None:
            quant_config.prepare(model)
        materialize_meta_weights(model)
    load_all_weights(model, weights)
    if placement is not None:
        placement.install_hooks(model)
    return model.eval()
