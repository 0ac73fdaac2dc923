"""Building a vision-language model (`LoadKind.VISION`) from its checkpoint: the registered
`*ForConditionalGeneration` class and its processor (mistralrs/vision/registry.py).

In-situ quantization, UQFF, the topology's device map and the imatrix apply to the text decoder
(`model.language_model`) only, as in the reference (REFERENCE §8.11: "device mapping and topology apply only to
the text model's layers"): the vision tower and projector are plain torch modules, which no quant config sees;
they stay in the model dtype on the model's device. Checkpoint names are taken to the published layout
(`canonical_weights`) before anything reads them, so ISQ/UQFF layer names are `language_model.model.layers.N...`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mistralrs.layers.linear import dense_weights_on_meta
from mistralrs.loader.safetensors_loader import load_all_weights, materialize_meta_weights
from mistralrs.loader.source import ModelSource
from mistralrs.quant.config import QuantConfig
from mistralrs.vision.base import ProcessorFiles, VisionCausalLM, VisionProcessor
from mistralrs.vision.registry import VisionFamily, vision_family_for
from mistralrs.worker.device_map import DeviceMapSpec


def _json_file(source: ModelSource, name: str) -> dict[str, Any]:
    path = source.maybe_get(name)
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_processor_files(source: ModelSource) -> ProcessorFiles:
    """The checkpoint's preprocessor_config.json, processor_config.json and tokenizer_config.json (absent: {})."""
    return ProcessorFiles(_json_file(source, "preprocessor_config.json"), _json_file(source, "processor_config.json"),
                          _json_file(source, "tokenizer_config.json"))


def vision_family(config: dict[str, Any], arch_name: str | None) -> VisionFamily:
    """The registered family of a checkpoint (`arch_name` forced, else config.json's `architectures`)."""
    return vision_family_for(config.get("architectures"), arch_name)


def build_vision_model(family: VisionFamily, config: dict[str, Any],
                       weights: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype, device: torch.device,
                       quant_config: QuantConfig | None = None,
                       device_map: DeviceMapSpec | None = None) -> VisionCausalLM:
    """The family's model with `weights` (published names: see `canonical_weights`) loaded; the quant config
    (ISQ, UQFF) and the device map applied to its text decoder. ValueError naming missing or unexpected
    checkpoint names."""
    if quant_config is None and device_map is None:
        model = family.model_cls(config, dtype=dtype, device=device)
        placement = None
    else:
        with dense_weights_on_meta():  # the decoder's dense weights wait for their device and quant method
            model = family.model_cls(config, dtype=dtype, device=device)
        decoder = model.language_model
        placement = device_map.resolve(decoder.config.num_hidden_layers) if device_map is not None else None
        if placement is not None:
            placement.place_layers(decoder)
        if quant_config is not None:
            quant_config.prepare(model)
        materialize_meta_weights(model)
    load_all_weights(model, weights)
    if placement is not None:
        placement.install_hooks(decoder)
    return model.eval()


def canonical_weights(family: VisionFamily, weights: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with their names in the published layout (the family's `WEIGHT_RENAMES`)."""
    for name, tensor in weights:
        yield family.model_cls.canonical_weight_name(name), tensor


def vision_processor(family: VisionFamily, files: ProcessorFiles, config: dict[str, Any],
                     max_edge: int | None) -> VisionProcessor:
    """The family's processor for the checkpoint."""
    return family.processor_cls.from_checkpoint(files, config, max_edge)


def vision_context_length(model: nn.Module) -> int:
    """The text decoder's trained context length."""
    return int(model.language_model.config.max_position_embeddings)
