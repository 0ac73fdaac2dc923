"""Automatic device mapping (REFERENCE §8.13): which device each decoder layer lives on when the user gave no
manual map (no `num_device_layers`, no topology `device` entries) and the model runs on CUDA.

The planner is a pure function of three inputs, so it is tested on the CPU against made-up device sizes:
- `ModelSizes`: each decoder layer's bytes (its weights as stored after ISQ/UQFF/GGUF packing plus its KV cache for
  `max_seq_len` x `max_batch_size` tokens), the bytes that stay on the main device (embeddings, final norm, LM head,
  the logits; for a vision model the image activations), and the activation room every GPU that runs layers keeps;
- the free memory of each GPU, the main device first;
- nothing else: `plan_layers` fills the GPUs in that order with consecutive layers (the main GPU after its
  non-layer part) and spills the remaining layers to the CPU.

`loader/auto_map.py` measures a model for it; `DeviceMapSpec` (worker/device_map.py) carries the `AutoMapParams`
and the loader turns the plan into the same `DeviceMap` a manual map makes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
DEFAULT_MAX_SEQ_LEN = 4096      # TextAutoMapParams / VisionAutoMapParams defaults (REFERENCE §1.3)
DEFAULT_MAX_BATCH_SIZE = 1
PREFILL_CHUNK = 512             # the default prompt chunk: the most tokens one prefill step computes per sequence
IMAGE_PATCH = 14                # pixels per patch edge assumed for a vision encoder's sequence length
GIB = 2**30


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"AutoMapParams.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"AutoMapParams.{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class AutoMapParams:
    """What the automatic map reserves room for (the API's `TextAutoMapParams` / `VisionAutoMapParams` as plain
    values); a guide for the plan, not a limit on requests."""

    max_seq_len: int = DEFAULT_MAX_SEQ_LEN        # tokens of one sequence the KV cache and activations plan for
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # sequences running at once
    max_num_images: int = 0                       # vision: images per sequence (0: a text model)
    max_image_length: int = 0                     # vision: longest image edge in pixels (0: a text model)

    def __post_init__(self) -> None:
        _check_count("max_seq_len", self.max_seq_len, 1)
        _check_count("max_batch_size", self.max_batch_size, 1)
        _check_count("max_num_images", self.max_num_images, 0)
        _check_count("max_image_length", self.max_image_length, 0)

    @property
    def kv_tokens(self) -> int:
        """Tokens each layer's KV cache is planned for: every running sequence at its longest."""
        return self.max_seq_len * self.max_batch_size

    @property
    def image_patches(self) -> int:
        """Encoder positions of one image at its largest (0 for a text model)."""
        return math.ceil(self.max_image_length / IMAGE_PATCH) ** 2 if self.max_num_images else 0


@dataclass(frozen=True)
class ModelSizes:
    """The bytes the planner places (module doc)."""

    layer_bytes: tuple[int, ...]  # decoder layer i: its stored weights plus its KV cache for `kv_tokens`
    non_layer_bytes: int          # what stays on the main device: embeddings, final norm, LM head, logits, images
    activation_bytes: int         # working room kept free on every GPU that runs decoder layers

    def __post_init__(self) -> None:
        if not self.layer_bytes:
            raise ValueError("ModelSizes.layer_bytes: a model has at least one decoder layer")
        for name, value in (("layer_bytes", min(self.layer_bytes)), ("non_layer_bytes", self.non_layer_bytes),
                            ("activation_bytes", self.activation_bytes)):
            if value < 0:
                raise ValueError(f"ModelSizes.{name} must be >= 0, got {value}")


def plan_layers(sizes: ModelSizes, gpus: Sequence[tuple[torch.device, int]]) -> tuple[torch.device, ...]:
    """A device per decoder layer: the GPUs of `gpus` ((device, free bytes), the main device first) filled in order
    with consecutive layers, the rest on the CPU; every layer on the CPU when `gpus` is empty. ValueError when the
    main GPU cannot even hold the model's non-layer part and its activations."""
    num_layers = len(sizes.layer_bytes)
    devices: list[torch.device] = []
    for index, (device, free) in enumerate(gpus):
        budget = free - sizes.activation_bytes
        if index == 0:
            budget -= sizes.non_layer_bytes
            if budget < 0:
                raise ValueError(
                    f"automatic device map: the model's embeddings, LM head and activations need "
                    f"{_gib(sizes.non_layer_bytes + sizes.activation_bytes)}, more than the {_gib(free)} free on "
                    f"{device}; run on the CPU (--cpu) or lower max_seq_len / max_batch_size")
        while len(devices) < num_layers and sizes.layer_bytes[len(devices)] <= budget:
            budget -= sizes.layer_bytes[len(devices)]
            devices.append(device)
    return tuple(devices) + (CPU,) * (num_layers - len(devices))


def plan_summary(plan: Sequence[torch.device], sizes: ModelSizes,
                 gpus: Sequence[tuple[torch.device, int]]) -> list[str]:
    """One line per device that runs layers (the main GPU always): its layers, the bytes planned, its free bytes."""
    free = dict(gpus)
    main = [gpus[0][0]] if gpus else []
    lines = []
    for device in dict.fromkeys([*main, *plan]):
        indices = [i for i, d in enumerate(plan) if d == device]
        planned = sum(sizes.layer_bytes[i] for i in indices)
        if device.type == "cuda" and indices:
            planned += sizes.activation_bytes
        if device in main:
            planned += sizes.non_layer_bytes
        room = f" of {_gib(free[device])} free" if device in free else ""
        lines.append(f"{device}: {_layer_runs(indices)} ({_gib(planned)} planned{room})")
    return lines


def log_plan(plan: Sequence[torch.device], sizes: ModelSizes, gpus: Sequence[tuple[torch.device, int]],
             params: AutoMapParams) -> None:
    """Logs the chosen map, one line per device (INFO)."""
    logger.info("automatic device map for max_seq_len %d x max_batch_size %d (%d layers):", params.max_seq_len,
                params.max_batch_size, len(plan))
    for line in plan_summary(plan, sizes, gpus):
        logger.info("  %s", line)


def _layer_runs(indices: list[int]) -> str:
    """`[0, 1, 2, 5]` -> "layers 0-2, 5"; "no layers" for none."""
    if not indices:
        return "no layers"
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
    return f"layers {text}" if len(indices) > 1 else f"layer {text}"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
