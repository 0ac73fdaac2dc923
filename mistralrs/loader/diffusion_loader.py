"""Loading a FLUX checkpoint in the diffusers layout: `load_flux(spec, device, dtype)`.

The layout (a local directory or a hub repo): `model_index.json`; `text_encoder/` (CLIP) and `text_encoder_2/`
(T5), each a transformers `config.json` plus safetensors; `tokenizer/` and `tokenizer_2/`; `transformer/` and
`vae/`, each a diffusers `config.json` plus `diffusion_pytorch_model*.safetensors`; `scheduler/
scheduler_config.json`. Checkpoint names are the truth: every component fails loudly on a weight it lacks or does
not use (the VAE's encoder half, which text-to-image never runs, is skipped). ISQ (`spec.isq.isq_type`) quantizes
every linear layer of the transformer's blocks and of T5's blocks once the model is on its device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.diffusion.clip_text import ClipTextConfig, ClipTextEncoder
from mistralrs.diffusion.flux_transformer import FluxConfig, FluxTransformer
from mistralrs.diffusion.pipeline import FluxImagePipeline, FluxModels
from mistralrs.diffusion.scheduler import SchedulerConfig
from mistralrs.diffusion.t5 import T5Config, T5Encoder
from mistralrs.diffusion.text_tokenizers import load_clip_tokenizer, load_t5_tokenizer
from mistralrs.diffusion.vae import VaeConfig, VaeDecoder
from mistralrs.layers.linear import expected_checkpoint_names, load_checkpoint_weights
from mistralrs.loader.safetensors_loader import iter_safetensors
from mistralrs.loader.source import ModelSource
from mistralrs.loader.spec import LoadSpec
from mistralrs.quant.isq import IsqQuantConfig

T5_MAX_SEQUENCE_LENGTH = 512  # T5 tokens per prompt (diffusers' FluxPipeline default)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "spiece.model")
_MAX_LISTED = 10  # names quoted in a missing/unexpected-weights error


@dataclass
class LoadedDiffusion:
    """A FLUX model on its device, ready for the engine's image commands."""

    pipeline: FluxImagePipeline  # prompt -> image
    model_id: str  # shown as `model` by the server
    dtype: torch.dtype  # weight / activation dtype
    device: torch.device  # where it computes


def _read_json(source: ModelSource, name: str, component: str) -> dict:
    path = source.maybe_get(name)
    if path is None:
        raise ValueError(f"{component}: model {source.model_id!r} has no {name} (a FLUX model in the diffusers "
                         "layout has model_index.json, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, "
                         "transformer/, vae/ and scheduler/)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _weight_paths(source: ModelSource, component: str) -> list[str]:
    """The component's safetensors files (through its index file when it has one)."""
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = source.maybe_get(f"{component}/{index_name}")
        if index is not None:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [source.get(f"{component}/{name}") for name in names]
    names = [f for f in source.list_files() if f.startswith(f"{component}/") and f.endswith(".safetensors")
             and f.count("/") == 1]
    if not names:
        raise ValueError(f"{component}: model {source.model_id!r} has no .safetensors weights in {component}/")
    return [source.get(name) for name in names]


def _listed(names: set[str]) -> str:
    ordered = sorted(names)
    more = len(ordered) - _MAX_LISTED
    return ", ".join(ordered[:_MAX_LISTED]) + (f" (and {more} more)" if more > 0 else "")


def _load_weights(module: nn.Module, source: ModelSource, component: str, dtype: torch.dtype,
                  rename: Callable[[str], str] = lambda name: name,
                  skipped: Callable[[str], bool] = lambda name: False) -> None:
    """Loads the component's checkpoint into `module`; ValueError naming the component and the weights that are
    missing or unused."""
    provided: set[str] = set()

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_safetensors(_weight_paths(source, component), dtype):
            if not skipped(name):
                provided.add(rename(name))
                yield rename(name), tensor

    consumed = load_checkpoint_weights(module, weights(), (), lambda name: False)
    missing = expected_checkpoint_names(module, (), lambda name: False) - consumed
    problems = ([f"missing weights: {_listed(missing)}"] if missing else []) + (
        [f"unexpected weights: {_listed(provided - consumed)}"] if provided - consumed else [])
    if problems:
        raise ValueError(f"{component}: checkpoint does not match: " + "; ".join(problems))
    module.eval()


def _tokenizer_folder(source: ModelSource, component: str) -> str:
    found = [path for name in _TOKENIZER_FILES if (path := source.maybe_get(f"{component}/{name}")) is not None]
    if not found:
        raise ValueError(f"{component}: model {source.model_id!r} has no tokenizer files in {component}/")
    return os.path.dirname(found[0])


def _t5_name(name: str) -> str:
    """transformers writes the tied T5 embedding as `shared.weight` or `encoder.embed_tokens.weight`."""
    return "shared.weight" if name == "encoder.embed_tokens.weight" else name


def _clip_name(name: str) -> str:
    """transformers writes CLIPTextModel's weights with or without the `text_model.` prefix (the FLUX repos: with)."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def load_flux(spec: LoadSpec, device: torch.device, dtype: torch.dtype) -> LoadedDiffusion:
    """The FLUX model of `spec.model_id` on `device` in `dtype` (FluxOffloaded when `spec.arch` says so)."""
    source = ModelSource(spec.model_id, token=spec.token)
    offload = spec.arch == "FluxOffloaded"
    home = torch.device("cpu") if offload else device   # built where it will live: no second full copy
    index = _read_json(source, "model_index.json", "model_index.json")
    if "Flux" not in str(index.get("_class_name", "")):
        raise ValueError(f"model_index.json: _class_name {index.get('_class_name')!r} is not a FLUX pipeline")
    clip = ClipTextEncoder(ClipTextConfig.from_dict(_read_json(source, "text_encoder/config.json", "text_encoder")),
                           dtype=dtype, device=home)
    _load_weights(clip, source, "text_encoder", dtype, rename=_clip_name, skipped=lambda n: n.endswith("position_ids"))
    t5 = T5Encoder(T5Config.from_dict(_read_json(source, "text_encoder_2/config.json", "text_encoder_2")),
                   dtype=dtype, device=home)
    _load_weights(t5, source, "text_encoder_2", dtype, rename=_t5_name)
    transformer = FluxTransformer(FluxConfig.from_dict(_read_json(source, "transformer/config.json", "transformer")),
                                  dtype=dtype, device=home)
    _load_weights(transformer, source, "transformer", dtype)
    vae = VaeDecoder(VaeConfig.from_dict(_read_json(source, "vae/config.json", "vae")), dtype=dtype, device=home)
    _load_weights(vae, source, "vae", dtype, skipped=lambda n: n.startswith(("encoder.", "quant_conv.")))
    scheduler = SchedulerConfig.from_dict(_read_json(source, "scheduler/scheduler_config.json", "scheduler"))
    models = FluxModels(clip, load_clip_tokenizer(_tokenizer_folder(source, "tokenizer")), t5,
                        load_t5_tokenizer(_tokenizer_folder(source, "tokenizer_2"), T5_MAX_SEQUENCE_LENGTH),
                        transformer, vae, scheduler)
    pipeline = FluxImagePipeline(models, device=device, dtype=dtype, offload=offload)
    if spec.isq.isq_type is not None:   # on the device: the quantized states do not move with `.to`
        isq = IsqQuantConfig(isq=spec.isq.isq_type, use_fast_kernels=spec.execution.fast_kernels)
        for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks, t5.encoder.block):
            isq.quantize_loaded(blocks)
    return LoadedDiffusion(pipeline, spec.model_id, dtype, device)
