"""From a `Which` selection to a loaded model and tokenizer, ready for the engine."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from mistralrs.adapters.lora import apply_lora
from mistralrs.adapters.xlora import apply_xlora
from mistralrs.adapters.ordering import read_ordering, same_model_id
from mistralrs.api.enums import IsqOrganization, ModelDType
from mistralrs.api.which import Which
from mistralrs.loader.ggml_loader import open_ggml
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.loader.source import ModelSource, resolve_token
from mistralrs.loader.tokenizer import TokenizerBundle, load_tokenizer_bundle
from mistralrs.quant.gguf_linear import GGUFQuantConfig
from mistralrs.quant.gguf_moe import GGUFModelQuantConfig
from mistralrs.quant.isq import IsqQuantConfig, isq_config_from_options
from mistralrs.quant.isq_types import parse_isq_type
from mistralrs.quant.topology import Topology
from mistralrs.quant.uqff import (
    COPIED_FILES, RESIDUAL_FILENAME, UqffQuantConfig, check_uqff_path, resolve_uqff_path, write_model_uqff,
)
from mistralrs.worker.device_map import DeviceMapSpec

logger = logging.getLogger(__name__)

# Which variants whose capability is not built yet, and what they need.
_NOT_BUILT = {
    "VisionPlain": "vision models", "DiffusionPlain": "FLUX diffusion models",
}


@dataclass
class LoadedModel:
    """A model on its device with everything the engine needs to serve it."""

    model: nn.Module
    tokenizer: TokenizerBundle
    model_id: str                  # shown as `model` in responses
    max_model_len: int             # the model's context length (max_position_embeddings)
    dtype: torch.dtype             # activation / weight dtype
    device: torch.device
    isq: IsqQuantConfig | None = None  # the in-situ quantization applied (re-ISQ keeps its topology and MoQE)
    quantized_file: bool = False   # loaded from GGUF/GGML blocks: re-ISQ does not apply


def resolve_dtype(dtype: ModelDType, device: torch.device) -> torch.dtype:
    """`ModelDType.Auto` tries BF16, then F16, then F32, keeping the first the device runs (REFERENCE §1.2)."""
    explicit = {ModelDType.BF16: torch.bfloat16, ModelDType.F16: torch.float16, ModelDType.F32: torch.float32}
    if dtype in explicit:
        return explicit[dtype]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16
        return torch.float16 if (major, minor) >= (5, 3) else torch.float32
    for candidate in (torch.bfloat16, torch.float16):
        try:
            probe = torch.ones(4, 4, dtype=candidate, device=device)
            if torch.isfinite(probe @ probe).all():
                return candidate
        except RuntimeError:
            continue
    return torch.float32


def default_device() -> torch.device:
    """CUDA device 0 when available, otherwise the CPU (REFERENCE §1.4)."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def _progress(items: Iterable, total: int | None, show: bool | None, desc: str) -> Iterator:
    """Wrap with a tqdm bar on a terminal (or when asked); plain iteration otherwise."""
    if show is None:
        show = sys.stderr.isatty() and os.environ.get("MISTRALRS_NO_PROGRESS", "") in ("", "0")
    if not show:
        return iter(items)
    from tqdm import tqdm
    return iter(tqdm(items, total=total, desc=desc, unit="tensor", leave=False))


def _read_json(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _repo_chat_template(source: ModelSource) -> str | None:
    """The repo's own `chat_template.json` or `chat_template.jinja` (REFERENCE §8.8, source 2)."""
    data = _read_json(source.maybe_get("chat_template.json"))
    if data is not None and data.get("chat_template"):
        return data["chat_template"]
    return _read_text(source.maybe_get("chat_template.jinja"))


def _tokenizer_from_repo(source: ModelSource, tokenizer_json: str | None, gguf_metadata: dict | None,
                         chat_template: str | None, jinja_explicit: str | None) -> TokenizerBundle:
    return load_tokenizer_bundle(
        tokenizer_json=tokenizer_json or source.maybe_get("tokenizer.json"),
        tokenizer_config=_read_json(source.maybe_get("tokenizer_config.json")),
        generation_config=_read_json(source.maybe_get("generation_config.json")),
        gguf_metadata=gguf_metadata, chat_template_arg=chat_template, jinja_explicit=jinja_explicit,
        repo_chat_template=_repo_chat_template(source))


def _safetensors_paths(source: ModelSource) -> list[str]:
    index = source.maybe_get("model.safetensors.index.json")
    if index is not None:
        names = sorted(set(_read_json(index)["weight_map"].values()))
        return [source.get(name) for name in names]
    names = sorted(f for f in source.list_files() if f.endswith(".safetensors"))
    if not names:
        raise ValueError(f"model_id {source.model_id!r}: no .safetensors weights found")
    return [source.get(name) for name in names]


def _isq_config(which, in_situ_quant: str | None, device_map: DeviceMapSpec) -> IsqQuantConfig | None:
    """The ISQ of a Plain/Lora selection with the Runner's `in_situ_quant` (None: no quantization)."""
    return isq_config_from_options(
        in_situ_quant, topology=device_map.topology,
        moqe=getattr(which, "organization", None) == IsqOrganization.MoQE,
        imatrix=getattr(which, "imatrix", None), calibration_file=getattr(which, "calibration_file", None))


def _calibrate(model: nn.Module, tokenizer: TokenizerBundle, config: dict, isq: IsqQuantConfig, path: str,
               device: torch.device, dtype: torch.dtype) -> IsqQuantConfig:
    """Collects an imatrix from the text at `path` on the dense model (written as `collected-<N>.cimatrix`),
    then quantizes the model with it (REFERENCE §3)."""
    from mistralrs.quant.imatrix import calibrate

    bos = tokenizer.tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else config.get("bos_token_id")
    vectors = calibrate(model, _read_text(path), lambda text: tokenizer.tokenizer.encode(
        text, add_special_tokens=False).ids, bos if isinstance(bos, int) else None, device=device, dtype=dtype,
        moqe=isq.moqe)
    isq = replace(isq, imatrix=vectors)
    isq.quantize_loaded(model)
    return isq


def _load_plain(which, token, device_map: DeviceMapSpec, show_progress, chat_template, jinja_explicit,
                in_situ_quant: str | None = None) -> LoadedModel:
    source = ModelSource(which.model_id, token=token)
    config = _read_json(source.get("config.json"))
    device = device_map.main
    dtype = resolve_dtype(which.dtype, device)
    arch_name = which.arch.name if which.arch is not None else None
    isq = _isq_config(which, in_situ_quant, device_map)
    uqff = _uqff_config(which, source, isq)
    if uqff is not None:
        isq = None  # from_uqff: any ISQ setting is ignored (REFERENCE §4.1)
    calibration_file = getattr(which, "calibration_file", None)
    weights = _progress(iter_safetensors(_weight_paths(source, uqff), dtype), None, show_progress, "loading")
    model = load_model(config, uqff.checkpoint_weights(weights) if uqff is not None else weights,
                       arch_name=arch_name, dtype=dtype, device=device, device_map=device_map,
                       quant_config=uqff or (isq if calibration_file is None else None))
    tokenizer = _tokenizer_from_repo(source, which.tokenizer_json, None, chat_template, jinja_explicit)
    if isq is not None and calibration_file is not None:
        isq = _calibrate(model, tokenizer, config, isq, calibration_file, device, dtype)
    if getattr(which, "write_uqff", None) is not None:
        _write_uqff(which, source, model, dtype, isq)
    return LoadedModel(model, tokenizer, which.model_id, int(config.get("max_position_embeddings", 4096)),
                       dtype, device, isq=isq)


def _uqff_config(which, source: ModelSource, isq: IsqQuantConfig | None) -> UqffQuantConfig | None:
    """The `from_uqff` loader (the file resolved in the model repo), after checking `write_uqff` (REFERENCE §4.1)."""
    write_uqff, from_uqff = getattr(which, "write_uqff", None), getattr(which, "from_uqff", None)
    if write_uqff is not None:
        check_uqff_path(write_uqff)
        if from_uqff is not None:
            raise ValueError("Which.Plain: write_uqff cannot be combined with from_uqff (from_uqff ignores ISQ, "
                             "which write_uqff needs)")
        if isq is None:
            raise ValueError(f"Which.Plain: write_uqff {write_uqff!r} needs in-situ quantization: set "
                             "Runner(in_situ_quant=...) or a topology with `isq` entries")
    if from_uqff is None:
        return None
    return UqffQuantConfig(resolve_uqff_path(source, from_uqff),
                           moqe=getattr(which, "organization", None) == IsqOrganization.MoQE)


def _weight_paths(source: ModelSource, uqff: UqffQuantConfig | None) -> list[str]:
    """The checkpoint files; with `from_uqff`, residual.safetensors among them (it may be the only one)."""
    residual = source.maybe_get(RESIDUAL_FILENAME) if uqff is not None else None
    if residual is None:
        return _safetensors_paths(source)
    others = [f for f in source.list_files() if f.endswith(".safetensors") and f != RESIDUAL_FILENAME]
    paths = _safetensors_paths(source) if others else []
    return paths + ([residual] if residual not in paths else [])


def _write_uqff(which, source: ModelSource, model: nn.Module, dtype: torch.dtype, isq: IsqQuantConfig) -> None:
    """`write_uqff`: the ISQ layers, the residual weights (in the model dtype) and the config/tokenizer files."""
    files = {name: source.maybe_get(name) for name in COPIED_FILES}
    if which.tokenizer_json is not None:
        files["tokenizer.json"] = which.tokenizer_json
    write_model_uqff(which.write_uqff, model, _safetensors_paths(source), dtype, files, moqe=isq.moqe)


def _load_gguf(which, token, device_map: DeviceMapSpec, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    source = ModelSource(which.quantized_model_id, token=token)
    device = device_map.main
    filenames = [which.quantized_filename] if isinstance(which.quantized_filename, str) else which.quantized_filename
    gguf = open_gguf([source.get(name) for name in filenames])
    dtype = resolve_dtype(which.dtype, device)
    weights = _progress(gguf.iter_weights(dtype, keep_quantized=True), len(gguf.tensor_types), show_progress,
                        "loading")
    model = load_model(gguf.config, weights, arch_name=None, dtype=dtype, device=device, device_map=device_map,
                       quant_config=GGUFModelQuantConfig())
    if which.tok_model_id is not None:
        tok_source = ModelSource(which.tok_model_id, token=token)
        tokenizer = _tokenizer_from_repo(tok_source, None, gguf.metadata, chat_template, jinja_explicit)
    else:
        tokenizer = load_tokenizer_bundle(
            tokenizer_json=None, tokenizer_config=None, generation_config=None, gguf_metadata=gguf.metadata,
            chat_template_arg=chat_template, jinja_explicit=jinja_explicit, repo_chat_template=None)
    max_len = int(gguf.config.get("max_position_embeddings", 4096))
    return LoadedModel(model, tokenizer, which.quantized_model_id, max_len, dtype, device, quantized_file=True)


def _load_ggml(which, token, device_map: DeviceMapSpec, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    """A legacy GGML llama file (REFERENCE §7); the tokenizer always comes from `tok_model_id`."""
    if which.topology is not None or device_map.num_device_layers is not None:
        raise ValueError("Which.GGML: a manual device map (topology, num_device_layers) is not supported for GGML "
                         "models")
    device = device_map.main
    if not which.tok_model_id:
        raise ValueError("Which.GGML: tok_model_id is required (GGML files carry no usable tokenizer)")
    source = ModelSource(which.quantized_model_id, token=token)
    ggml = open_ggml(source.get(which.quantized_filename), gqa=which.gqa)
    dtype = resolve_dtype(which.dtype, device)
    weights = _progress(ggml.iter_weights(dtype, keep_quantized=True), len(ggml.tensor_types), show_progress,
                        "loading")
    model = load_model(ggml.config, weights, arch_name=None, dtype=dtype, device=device,
                       quant_config=GGUFQuantConfig())
    tokenizer = _tokenizer_from_repo(ModelSource(which.tok_model_id, token=token), which.tokenizer_json, None,
                                     chat_template, jinja_explicit)
    return LoadedModel(model, tokenizer, which.quantized_model_id, int(ggml.config["max_position_embeddings"]),
                       dtype, device, quantized_file=True)


def _load_lora(which, token, device_map: DeviceMapSpec, show_progress, chat_template, jinja_explicit,
               in_situ_quant: str | None = None) -> LoadedModel:
    """The base model (safetensors) with the ordering file's LoRA adapters merged or hooked in (REFERENCE §6);
    with ISQ, quantized after the merge."""
    if which.from_uqff is not None or which.write_uqff is not None:
        raise ValueError("Which.Lora: from_uqff and write_uqff are not supported yet")
    isq = _isq_config(which, in_situ_quant, device_map)
    ordering = read_ordering(which.order)
    model_id = which.model_id if which.model_id is not None else ordering.base_model_id
    if not same_model_id(model_id, ordering.base_model_id):
        raise ValueError(f"Which.Lora: model_id {model_id!r} disagrees with the ordering file's base_model_id "
                         f"{ordering.base_model_id!r}")
    base = Which.Plain(model_id=model_id, arch=which.arch, tokenizer_json=which.tokenizer_json, dtype=which.dtype)
    loaded = _on_one_device(_load_plain(base, token, _without_topology(device_map, which), show_progress,
                                        chat_template, jinja_explicit), which)
    apply_lora(loaded.model, ordering, ModelSource(which.adapters_model_id, token=token), token=token,
               dtype=loaded.dtype, device=loaded.device)
    if isq is not None:
        isq.quantize_loaded(loaded.model)
        loaded.isq = isq
    return loaded


def _ordering_and_base(which, model_id: str | None):
    """The ordering file of an adapter variant and its base model id (`model_id`, else the file's
    `base_model_id`); ValueError when the two disagree."""
    variant = type(which).__name__
    ordering = read_ordering(which.order)
    base_id = model_id if model_id is not None else ordering.base_model_id
    if not same_model_id(base_id, ordering.base_model_id):
        raise ValueError(f"Which.{variant}: model id {base_id!r} disagrees with the ordering file's base_model_id "
                         f"{ordering.base_model_id!r}")
    return ordering, base_id


def _load_xlora(which, token, device_map: DeviceMapSpec, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    """The base model (safetensors) with the X-LoRA experts hooked in and its classifier (REFERENCE §6.3)."""
    if which.from_uqff is not None or which.write_uqff is not None or which.topology is not None:
        raise ValueError("Which.XLora: from_uqff, write_uqff and topology are not supported yet")
    ordering, model_id = _ordering_and_base(which, which.model_id)
    base = Which.Plain(model_id=model_id, arch=which.arch, tokenizer_json=which.tokenizer_json, dtype=which.dtype)
    loaded = _on_one_device(_load_plain(base, token, device_map, show_progress, chat_template, jinja_explicit),
                            which)
    apply_xlora(loaded.model, ordering, ModelSource(which.xlora_model_id, token=token), dtype=loaded.dtype,
                device=loaded.device, non_granular_index=which.tgt_non_granular_index)
    return loaded


def _load_gguf_adapters(which, token, device_map: DeviceMapSpec, show_progress, chat_template,
                        jinja_explicit) -> LoadedModel:
    """A GGUF or GGML base that stays quantized, with LoRA (kept separate: quantized weights cannot be merged;
    those in `order` active) or X-LoRA adapters in the activation dtype. The tokenizer comes from `tok_model_id`,
    else the ordering file's `base_model_id` (REFERENCE §1.3)."""
    if which.topology is not None:
        raise ValueError(f"Which.{type(which).__name__}: topology is not supported yet")
    ordering, tok_model_id = _ordering_and_base(which, None)
    if which.tok_model_id is not None:
        tok_model_id = which.tok_model_id
    if isinstance(which, (Which.LoraGGML, Which.XLoraGGML)):
        base = Which.GGML(quantized_model_id=which.quantized_model_id, quantized_filename=which.quantized_filename,
                          tok_model_id=tok_model_id, tokenizer_json=which.tokenizer_json, gqa=which.gqa,
                          dtype=which.dtype)
        loaded = _load_ggml(base, token, device_map, show_progress, chat_template, jinja_explicit)
    else:
        base = Which.GGUF(quantized_model_id=which.quantized_model_id, quantized_filename=which.quantized_filename,
                          tok_model_id=tok_model_id, dtype=which.dtype)
        loaded = _on_one_device(_load_gguf(base, token, device_map, show_progress, chat_template, jinja_explicit),
                                which)
    device = loaded.device
    if isinstance(which, (Which.XLoraGGUF, Which.XLoraGGML)):
        apply_xlora(loaded.model, ordering, ModelSource(which.xlora_model_id, token=token), dtype=loaded.dtype,
                    device=device, non_granular_index=which.tgt_non_granular_index)
    else:
        apply_lora(loaded.model, ordering, ModelSource(which.adapters_model_id, token=token), token=token,
                   dtype=loaded.dtype, device=device, mergeable=False)
    return loaded


def load_pipeline(which, *, token_source: str = "cache", chat_template: str | None = None,
                  jinja_explicit: str | None = None, show_progress: bool | None = None,
                  device: torch.device | None = None, in_situ_quant: str | None = None,
                  num_device_layers: list[str] | None = None) -> LoadedModel:
    """Load the model and tokenizer that `which` selects, quantized in situ to `in_situ_quant` if given, its
    decoder layers spread over devices as `num_device_layers` and the topology's `device` entries say."""
    variant = type(which).__name__
    if in_situ_quant is not None:
        try:
            parse_isq_type(in_situ_quant)
        except ValueError as exc:
            raise ValueError(f"in_situ_quant: {exc}") from None
    if in_situ_quant is not None and not isinstance(which, (Which.Plain, Which.Lora)):
        raise ValueError(f"in_situ_quant: ISQ applies to full-precision models (Which.Plain, Which.Lora), not "
                         f"Which.{variant}" + (" (its weights are quantized already)" if "GG" in variant else ""))
    if variant in _NOT_BUILT:
        raise ValueError(f"Which.{variant} is not supported yet: {_NOT_BUILT[variant]} are not built in this "
                         "version (supported: Which.Plain, Which.GGUF, Which.Lora, Which.XLora, "
                         "Which.LoraGGUF, Which.XLoraGGUF, Which.GGML, Which.LoraGGML, Which.XLoraGGML)")
    device_map = _device_map_spec(which, device or default_device(), num_device_layers)
    token = resolve_token(token_source)
    if isinstance(which, Which.Plain):
        return _load_plain(which, token, device_map, show_progress, chat_template, jinja_explicit, in_situ_quant)
    if isinstance(which, Which.Lora):
        return _load_lora(which, token, device_map, show_progress, chat_template, jinja_explicit, in_situ_quant)
    if isinstance(which, Which.XLora):
        return _load_xlora(which, token, device_map, show_progress, chat_template, jinja_explicit)
    if isinstance(which, (Which.LoraGGUF, Which.XLoraGGUF, Which.LoraGGML, Which.XLoraGGML)):
        return _load_gguf_adapters(which, token, device_map, show_progress, chat_template, jinja_explicit)
    if isinstance(which, Which.GGUF):
        return _load_gguf(which, token, device_map, show_progress, chat_template, jinja_explicit)
    if isinstance(which, Which.GGML):
        return _load_ggml(which, token, device_map, show_progress, chat_template, jinja_explicit)
    raise TypeError(f"which must be a Which variant, got {type(which).__name__}")


def _device_map_spec(which, device: torch.device, num_device_layers: list[str] | None) -> DeviceMapSpec:
    """The model's device with the selection's topology (parsed once: its `isq` entries drive ISQ, its `device`
    entries the device map) and `num_device_layers`."""
    path = getattr(which, "topology", None)
    topology = Topology.from_yaml(path) if path is not None else None
    if isinstance(which, Which.GGUF) and topology is not None and any(
            entry is not None and entry.isq is not None for entry in topology.layers):
        raise ValueError(f"Which.GGUF: topology {path!r} has `isq` entries; a GGUF model's weights are quantized "
                         "already (only `device` entries apply)")
    return DeviceMapSpec(device, topology, tuple(num_device_layers) if num_device_layers is not None else None)


def _without_topology(device_map: DeviceMapSpec, which) -> DeviceMapSpec:
    """The spec for the base of a Lora selection, whose topology ISQ applies after the merge: without the topology,
    which may name no other device than the model's (see `_on_one_device`)."""
    others = device_map.topology.devices() - {device_map.main} if device_map.topology is not None else set()
    if others:
        raise ValueError(f"Which.{type(which).__name__}: adapters need every decoder layer on the model's device "
                         f"{device_map.main}, but the topology names {sorted(str(d) for d in others)}")
    return replace(device_map, topology=None)


def _on_one_device(loaded: LoadedModel, which) -> LoadedModel:
    """`loaded` when its decoder layers all run on its device; ValueError for an adapter model, whose adapter
    weights live on the model's device, when a device map spread them."""
    device_map = getattr(loaded.model, "device_map", None)
    if device_map is not None:
        raise ValueError(f"Which.{type(which).__name__}: adapters need every decoder layer on the model's device "
                         f"{loaded.device}, but the device map puts {device_map.describe()}")
    return loaded
