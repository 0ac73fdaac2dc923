"""Manual device mapping: which device each decoder layer lives on (REFERENCE §5 topology `device`, §8.13).

Two user settings ask for it:
- `num_device_layers` (deprecated in the reference, still accepted): `["N"]` puts the first N decoder layers on
  CUDA device 0 and the rest on the CPU; `["0:16", "1:16"]` (ORD:NUM pairs) gives consecutive runs of layers to
  each CUDA ordinal and the rest to the CPU. On a CPU model it changes nothing (the reference ignores it there too).
- a topology's `device` entries, which override `num_device_layers` for the layers they cover.
Without either, a CUDA model's layers are placed by the automatic map (worker/auto_device_map.py) when the spec
carries `auto_map` (the loader measures the model and builds the same `DeviceMap`).

The model's own device (`main`) keeps everything that is not a decoder layer: embeddings, final norm, LM head,
the sampler's tensors. A `DeviceMap` is applied in two steps around weight loading:
1. `place_layers(model)` right after the model is built with its dense weights on the meta device: every Linear
   and FusedMoE of layer i gets layer i's device as its `params_device` (so a quant method creates and packs its
   weights there, and no layer is ever allocated on the main device first) and the layer's other small tensors
   (norm weights) move there.
2. `install_hooks(model)` after loading: a forward pre-hook on each decoder layer moves its tensor arguments
   (hidden states, RoPE tables) and the ForwardBatch (`ForwardBatch.on`) to the layer's device, and a hook on the
   last layer brings the hidden states back to `main`. Model files stay device-agnostic.

Each layer's KV cache is allocated on its layer's device (`layer_devices`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.layers.linear import Linear
from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.topology import Topology
from mistralrs.worker.auto_device_map import AutoMapParams
from mistralrs.worker.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

_PAIR_RE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class DeviceMapSpec:
    """What the user asked for, before the model's layer count is known."""

    main: torch.device                                   # the model's device (embeddings, final norm, LM head)
    topology: Topology | None = None                     # per-layer `device` entries (override the rest)
    num_device_layers: tuple[str, ...] | None = None     # `["N"]` or `["ORD:NUM", ...]` (see module doc)
    auto_map: AutoMapParams | None = None                # plan a CUDA model's layers when no manual map is given
    #                                                      (None: never; every layer on `main`)

    def __post_init__(self) -> None:
        if self.num_device_layers is not None:
            _parse_num_device_layers(self.num_device_layers)   # malformed values fail before any loading

    def plans_automatically(self) -> bool:
        """True when the automatic map places the layers: a CUDA model, `auto_map` given, and neither
        `num_device_layers` nor a topology `device` entry."""
        manual = self.num_device_layers is not None or (self.topology is not None and any(
            entry is not None and entry.device is not None for entry in self.topology.layers))
        return self.auto_map is not None and self.main.type == "cuda" and not manual

    def resolve(self, num_layers: int) -> DeviceMap | None:
        """Each decoder layer's device; None when every layer stays on `main` (nothing to place)."""
        devices = [self.main] * num_layers
        if self.num_device_layers is not None:
            if self.main.type != "cuda":
                logger.info("num_device_layers=%s ignored: the model runs on %s (the map places layers on CUDA "
                            "devices)", list(self.num_device_layers), self.main)
            else:
                devices = _devices_from_counts(_parse_num_device_layers(self.num_device_layers), num_layers)
        if self.topology is not None:
            for i in range(num_layers):
                entry = self.topology.layer(i)
                if entry is not None and entry.device is not None:
                    devices[i] = entry.device
        if all(d == self.main for d in devices):
            return None
        return DeviceMap(self.main, tuple(devices))


@dataclass(frozen=True)
class DeviceMap:
    """A device per decoder layer, at least one of them not `main`."""

    main: torch.device                      # where everything outside the decoder layers lives
    layers: tuple[torch.device, ...]        # decoder layer i runs on layers[i]
    kv_tokens: int | None = None            # an automatic map: the KV tokens it left room for on every device
    #                                         (the default KV capacity); None: a manual map

    def place_layers(self, model: nn.Module) -> None:
        """Step 1 (module doc): retargets each decoder layer before its weights are created and loaded."""
        for layer, device in zip(_decoder_layers(model, len(self.layers)), self.layers):
            if device == self.main:
                continue
            for module in layer.modules():
                if isinstance(module, (Linear, FusedMoE)):
                    module.params_device = device
                _move_own_tensors(module, device)

    def install_hooks(self, model: nn.Module) -> None:
        """Step 2 (module doc): moves each layer's inputs to its device and the last output back to `main`."""
        layers = _decoder_layers(model, len(self.layers))
        for layer, device in zip(layers, self.layers):
            layer.register_forward_pre_hook(_inputs_to(device))
        if self.layers[-1] != self.main:
            layers[-1].register_forward_hook(_output_to(self.main))
        model.device_map = self

    def describe(self) -> str:
        """Runs of layers per device, e.g. `layers 0-3: cuda:0, layers 4-7: cpu`."""
        runs: list[tuple[int, int, torch.device]] = []
        for i, device in enumerate(self.layers):
            if runs and runs[-1][2] == device:
                runs[-1] = (runs[-1][0], i, device)
            else:
                runs.append((i, i, device))
        return ", ".join(f"layers {a}-{b}: {d}" if a != b else f"layer {a}: {d}" for a, b, d in runs)


def layer_devices(model: nn.Module, num_layers: int, main: torch.device) -> list[torch.device]:
    """The device of each of the model's `num_layers` KV-cache layers: its DeviceMap's, else `main` for all."""
    device_map: DeviceMap | None = getattr(model, "device_map", None)
    if device_map is None:
        return [main] * num_layers
    if len(device_map.layers) != num_layers:
        raise ValueError(f"the device map covers {len(device_map.layers)} layers, the KV cache {num_layers}")
    return list(device_map.layers)


def _parse_num_device_layers(values: Sequence[str]) -> list[tuple[int, int]]:
    """`["N"]` -> [(0, N)]; `["ORD:NUM", ...]` -> [(ORD, NUM), ...]; ValueError naming num_device_layers."""
    values = [str(v).strip() for v in values]
    if len(values) == 1 and values[0].isdigit():
        return [(0, int(values[0]))]
    pairs = []
    for value in values:
        match = _PAIR_RE.match(value)
        if match is None:
            raise ValueError(f"num_device_layers: {value!r} must be a layer count 'N' (alone) or an 'ORD:NUM' pair; "
                             f"got {list(values)}")
        pairs.append((int(match.group(1)), int(match.group(2))))
    ordinals = [o for o, _ in pairs]
    if len(set(ordinals)) != len(ordinals):
        raise ValueError(f"num_device_layers: each CUDA ordinal may appear once, got {list(values)}")
    return pairs


def _devices_from_counts(pairs: list[tuple[int, int]], num_layers: int) -> list[torch.device]:
    """Consecutive runs of layers per CUDA ordinal, the remaining layers on the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices: list[torch.device] = []
    for ordinal, layers in pairs:
        if ordinal >= count:
            raise ValueError(f"num_device_layers: CUDA ordinal {ordinal} does not exist (this machine has {count})")
        devices += [torch.device("cuda", ordinal)] * layers
    devices = devices[:num_layers]
    return devices + [torch.device("cpu")] * (num_layers - len(devices))


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != num_layers:
        raise ValueError(f"{type(model).__name__}: device mapping needs `model.layers` with {num_layers} decoder "
                         "layers")
    return layers


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Moves the module's own (not its children's) materialized parameters and buffers to `device`; meta ones
    are left for their quant method to create on the module's `params_device`."""
    for name, param in module.named_parameters(recurse=False):
        if not param.is_meta and param.device != device:
            setattr(module, name, nn.Parameter(param.to(device), requires_grad=False))
    for name, buffer in module.named_buffers(recurse=False):
        if not buffer.is_meta and buffer.device != device:
            module._buffers[name] = buffer.to(device)


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, ForwardBatch):
        return value.on(device)
    return value


def _inputs_to(device: torch.device):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(_moved(a, device) for a in args)
    return hook


def _output_to(device: torch.device):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(device)
    return hook
