"""Measuring a model for the automatic device map (the planner is `worker/auto_device_map.py`, REFERENCE §8.13).

`load_model` builds the model with its dense linear and expert weights on the meta device (shapes, no storage),
then `auto_placement` measures it: every weight at the bytes it takes once stored (`weight_bytes_rule`: the model
dtype, the ISQ type of its layer, the UQFF file's average, or the GGUF tensor's GGML type), each decoder layer's
KV cache for the planned tokens, and the activation room; plans against the free memory of the GPUs measured
before the model was built; logs the plan; and returns the `DeviceMap` (None when every layer stays on the main
device).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from mistralrs.formats.gguf_format import GGML_TYPES
from mistralrs.layers.linear import Linear
from mistralrs.layers.moe import FusedMoE
from mistralrs.models.config import TextModelConfig
from mistralrs.quant.config import QuantConfig
from mistralrs.quant.hqq import HQQ_GROUP_SIZE
from mistralrs.quant.isq import IsqQuantConfig, isq_layers
from mistralrs.quant.isq_types import IsqType
from mistralrs.quant.uqff import UqffQuantConfig
from mistralrs.worker.auto_device_map import (
    PREFILL_CHUNK,
    AutoMapParams,
    ModelSizes,
    log_plan,
    plan_layers,
)
from mistralrs.worker.device_map import DeviceMap

# (module path, module) of a Linear or FusedMoE -> bytes per weight once stored; None: as allocated (model dtype)
WeightBytes = Callable[[str, nn.Module], "float | None"]

_GGML_BYTES = {t.name: t.type_size / t.block_size for t in GGML_TYPES.values()}  # GGML type name -> bytes/weight
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)(?:\.|$)")
_FLOAT32_BYTES = 4


def gpu_free_memory(main: torch.device) -> list[tuple[torch.device, int]]:
    """(device, free bytes) of every CUDA device, `main` first; empty when the model does not run on CUDA."""
    if main.type != "cuda":
        return []
    main_index = main.index if main.index is not None else torch.cuda.current_device()
    devices = [torch.device("cuda", main_index)] + [
        torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != main_index]
    return [(device, torch.cuda.mem_get_info(device)[0]) for device in devices]


def isq_bytes_per_weight(isq: IsqType | None) -> float | None:
    """Bytes one weight takes quantized to `isq` (None: not quantized)."""
    if isq is None:
        return None
    if isq.kind == "ggml":
        return _GGML_BYTES[isq.ggml_type]
    if isq.kind == "hqq":
        return isq.bits / 8 + 4 / HQQ_GROUP_SIZE   # plus an f16 scale and an f16 zero per group
    return 1.0                                      # FP8: one byte, one scale per tensor


def weight_bytes_rule(model: nn.Module, quant_config: QuantConfig | None,
                      stored_types: Mapping[str, str] | None) -> WeightBytes:
    """How many bytes a weight of each linear / expert module takes once loaded: from the GGUF file's types
    (`stored_types`: checkpoint tensor name -> GGML type name), the ISQ type of its layer, the UQFF file's size
    spread over the layers it holds, or (None) the model dtype."""
    if stored_types is not None:
        names = {id(layer.module): layer.names for layer in isq_layers(model)}

        def from_file(_path: str, module: nn.Module) -> float | None:
            found = [_GGML_BYTES.get(stored_types.get(f"{name}.weight", ""))
                     for name in names.get(id(module), ())]
            found = [value for value in found if value is not None]
            return sum(found) / len(found) if found else None
        return from_file
    if isinstance(quant_config, UqffQuantConfig):
        layers = isq_layers(model, quant_config.moqe)
        weights = sum(_weight_numel(layer.module) for layer in layers)
        per_weight = os.path.getsize(quant_config.path) / max(weights, 1)
        held = {id(layer.module) for layer in layers}
        return lambda _path, module: per_weight if id(module) in held else None
    if isinstance(quant_config, IsqQuantConfig):
        types = {id(layer.module): quant_config.type_for(layer.layer_index)
                 for layer in isq_layers(model, quant_config.moqe)}
        return lambda _path, module: isq_bytes_per_weight(types.get(id(module)))
    return lambda _path, _module: None


def _weight_numel(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters(recurse=False) if name != "bias")


def measure_model(model: nn.Module, config: TextModelConfig, dtype: torch.dtype, params: AutoMapParams,
                  weight_bytes: WeightBytes) -> ModelSizes:
    """The planner's `ModelSizes` of a model built with its dense weights on the meta device (module doc)."""
    num_layers = config.num_hidden_layers
    layer_bytes = [0] * num_layers
    non_layer = 0
    seen: set[int] = set()
    for path, module in model.named_modules():
        packed = isinstance(module, (Linear, FusedMoE))
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen:   # a tied LM head is its embedding's Parameter
                continue
            seen.add(id(tensor))
            per_weight = weight_bytes(path, module) if packed and name != "bias" else None
            nbytes = int(tensor.numel() * (per_weight if per_weight is not None else tensor.element_size()))
            match = _LAYER_PATH.match(path)
            if match is not None and int(match.group(1)) < num_layers:
                layer_bytes[int(match.group(1))] += nbytes
            else:
                non_layer += nbytes
    kv = model.kv_cache_spec()
    kv_per_layer = kv.bytes_per_block(1, dtype) // kv.num_layers * params.kv_tokens
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = min(params.max_seq_len, PREFILL_CHUNK)
    # one prefill chunk per sequence: float32 attention scores against the whole context, plus the hidden states
    # and MLP intermediates of the chunk's tokens
    activation = params.max_batch_size * chunk * (
        config.num_attention_heads * params.max_seq_len * _FLOAT32_BYTES
        + (4 * config.hidden_size + 3 * config.intermediate_size) * itemsize)
    logits = 2 * params.max_batch_size * config.vocab_size * _FLOAT32_BYTES
    # a vision encoder's attention over one image's patches, for every image of every sequence
    images = (params.max_batch_size * params.max_num_images * params.image_patches ** 2
              * config.num_attention_heads * _FLOAT32_BYTES)
    return ModelSizes(tuple(b + kv_per_layer for b in layer_bytes), non_layer + logits + images, activation)


def auto_placement(model: nn.Module, config: TextModelConfig, dtype: torch.dtype, main: torch.device,
                   params: AutoMapParams, gpus: list[tuple[torch.device, int]], quant_config: QuantConfig | None,
                   stored_types: Mapping[str, str] | None) -> DeviceMap | None:
    """Measures the model, plans its layers over `gpus` (module doc), logs the plan and returns the map (None:
    every layer on `main`)."""
    sizes = measure_model(model, config, dtype, params, weight_bytes_rule(model, quant_config, stored_types))
    plan = plan_layers(sizes, gpus)
    log_plan(plan, sizes, gpus, params)
    if all(device == main for device in plan):
        return None
    return DeviceMap(main, plan, kv_tokens=params.kv_tokens)
