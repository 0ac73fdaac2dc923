"""From a `LoadSpec` to a loaded model and tokenizer, ready for the engine: `load(spec)`."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from mistralrs.adapters.lora import apply_lora
from mistralrs.adapters.ordering import OrderingFile, read_ordering, same_model_id
from mistralrs.adapters.xlora import apply_xlora
from mistralrs.distributed.group import current_group
from mistralrs.loader.adapter_files import lora_files, xlora_files
from mistralrs.loader.anymoe_training import apply_anymoe, check_anymoe
from mistralrs.loader.ggml_loader import open_ggml
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.loader.source import ModelSource
from mistralrs.loader.spec import AdapterKind, IsqSpec, LoadKind, LoadSpec
from mistralrs.loader.tokenizer import TokenizerBundle, load_tokenizer_bundle
from mistralrs.quant.gguf_linear import GGUFQuantConfig
from mistralrs.quant.gguf_moe import GGUFModelQuantConfig
from mistralrs.quant.isq import IsqQuantConfig, isq_config_from_options
from mistralrs.quant.topology import Topology
from mistralrs.quant.uqff import (
    COPIED_FILES, RESIDUAL_FILENAME, UqffQuantConfig, check_uqff_path, resolve_uqff_path, write_model_uqff,
)
from mistralrs.worker.auto_device_map import AutoMapParams
from mistralrs.worker.device_map import DeviceMapSpec

if TYPE_CHECKING:  # the vision and diffusion loaders are imported by the loaders of those kinds only
    from mistralrs.loader.diffusion_loader import LoadedDiffusion
    from mistralrs.vision.base import VisionProcessor

logger = logging.getLogger(__name__)


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
    vision_processor: VisionProcessor | None = None  # a vision model's image processor (None: a text model)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A torch dtype as it is; "auto" tries BF16, then F16, then F32, keeping the first the device runs
    (REFERENCE §1.2)."""
    if isinstance(dtype, torch.dtype):
        return dtype
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


def _isq_config(spec: LoadSpec, device_map: DeviceMapSpec) -> IsqQuantConfig | None:
    """The ISQ the spec asks for, with the topology's `isq` entries (None: no quantization)."""
    return isq_config_from_options(spec.isq.isq_type, topology=device_map.topology, moqe=spec.isq.moqe,
                                   imatrix=spec.isq.imatrix, calibration_file=spec.isq.calibration_file,
                                   use_fast_kernels=spec.execution.fast_kernels)


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


def _load_plain(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """A safetensors model, quantized in situ (`spec.isq`, the topology) or read from UQFF as the spec asks."""
    from mistralrs.loader.text_only import text_only_config, text_only_weights

    source = ModelSource(spec.model_id, token=spec.token)
    checkpoint_config = _read_json(source.get("config.json"))
    config = text_only_config(checkpoint_config)  # a vision checkpoint loads as its text decoder
    if config is not checkpoint_config and (spec.from_uqff is not None or spec.write_uqff is not None):
        raise ValueError(f"{spec.label}: from_uqff and write_uqff are not supported for the text decoder of a vision "
                         f"checkpoint ({checkpoint_config['architectures'][0]})")
    device = device_map.main
    dtype = resolve_dtype(spec.dtype, device)
    isq, uqff = _safetensors_quant(spec, source, device_map)
    calibration_file = spec.isq.calibration_file
    weights = _progress(text_only_weights(checkpoint_config, iter_safetensors(_weight_paths(source, uqff), dtype)),
                        None, spec.show_progress, "loading")
    model = load_model(config, uqff.checkpoint_weights(weights) if uqff is not None else weights,
                       arch_name=spec.arch, dtype=dtype, device=device, device_map=device_map,
                       quant_config=uqff or (isq if calibration_file is None else None))
    tokenizer = _tokenizer_from_repo(source, spec.tokenizer_json, None, spec.chat_template, spec.jinja_explicit)
    if isq is not None and calibration_file is not None:
        isq = _calibrate(model, tokenizer, config, isq, calibration_file, device, dtype)
    if spec.write_uqff is not None:
        _write_uqff(spec, source, model, dtype, isq)
    return LoadedModel(model, tokenizer, spec.model_id, int(config.get("max_position_embeddings", 4096)),
                       dtype, device, isq=isq)


def _safetensors_quant(spec: LoadSpec, source: ModelSource, device_map: DeviceMapSpec
                       ) -> tuple[IsqQuantConfig | None, UqffQuantConfig | None]:
    """A safetensors model's ISQ config and its `from_uqff` loader; with `from_uqff`, any ISQ setting is ignored
    (REFERENCE §4.1)."""
    isq = _isq_config(spec, device_map)
    uqff = _uqff_config(spec, source, isq)
    return (None if uqff is not None else isq), uqff


def _uqff_config(spec: LoadSpec, source: ModelSource, isq: IsqQuantConfig | None) -> UqffQuantConfig | None:
    """The `from_uqff` loader (the file resolved in the model repo), after checking `write_uqff` (REFERENCE §4.1)."""
    if spec.write_uqff is not None:
        check_uqff_path(spec.write_uqff)
        if spec.from_uqff is not None:
            raise ValueError(f"{spec.label}: write_uqff cannot be combined with from_uqff (from_uqff ignores ISQ, "
                             "which write_uqff needs)")
        if isq is None:
            raise ValueError(f"{spec.label}: write_uqff {spec.write_uqff!r} needs in-situ quantization: set "
                             "Runner(in_situ_quant=...) or a topology with `isq` entries")
    if spec.from_uqff is None:
        return None
    return UqffQuantConfig(resolve_uqff_path(source, spec.from_uqff), moqe=spec.isq.moqe,
                           use_fast_kernels=spec.execution.fast_kernels)


def _weight_paths(source: ModelSource, uqff: UqffQuantConfig | None) -> list[str]:
    """The checkpoint files; with `from_uqff`, residual.safetensors among them (it may be the only one)."""
    residual = source.maybe_get(RESIDUAL_FILENAME) if uqff is not None else None
    if residual is None:
        return _safetensors_paths(source)
    others = [f for f in source.list_files() if f.endswith(".safetensors") and f != RESIDUAL_FILENAME]
    paths = _safetensors_paths(source) if others else []
    return paths + ([residual] if residual not in paths else [])


def _write_uqff(spec: LoadSpec, source: ModelSource, model: nn.Module, dtype: torch.dtype,
                isq: IsqQuantConfig) -> None:
    """`write_uqff`: the ISQ layers, the residual weights (in the model dtype) and the config/tokenizer files."""
    files = {name: source.maybe_get(name) for name in COPIED_FILES}
    if spec.tokenizer_json is not None:
        files["tokenizer.json"] = spec.tokenizer_json
    rename = getattr(model, "canonical_weight_name", None)  # a vision model's residual: published names
    write_model_uqff(spec.write_uqff, model, _safetensors_paths(source), dtype, files, moqe=isq.moqe, rename=rename)


def _load_gguf(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """A GGUF model whose weights stay quantized; the tokenizer from `tokenizer_model_id`, else the GGUF metadata."""
    source = ModelSource(spec.model_id, token=spec.token)
    device = device_map.main
    gguf = open_gguf([source.get(name) for name in spec.filenames])
    dtype = resolve_dtype(spec.dtype, device)
    # the tokenizer first: building a large vocabulary's (Gemma 3: 262k tokens, 513k merges) takes ~100 MB for a
    # moment, which then does not come on top of the packed weights
    tokenizer = _quantized_file_tokenizer(spec, gguf.metadata)
    weights = _progress(gguf.iter_weights(dtype, keep_quantized=True), len(gguf.tensor_types), spec.show_progress,
                        "loading")
    model = load_model(gguf.config, weights, arch_name=None, dtype=dtype, device=device, device_map=device_map,
                       quant_config=GGUFModelQuantConfig(use_fast_kernels=spec.execution.fast_kernels),
                       stored_types=gguf.tensor_types)
    max_len = int(gguf.config.get("max_position_embeddings", 4096))
    return LoadedModel(model, tokenizer, spec.model_id, max_len, dtype, device, quantized_file=True)


def _quantized_file_tokenizer(spec: LoadSpec, gguf_metadata: dict | None) -> TokenizerBundle:
    """A GGUF/GGML model's tokenizer: from `tokenizer_model_id`'s files when given, else from `tokenizer_json`
    and the GGUF metadata."""
    if spec.tokenizer_model_id is not None:
        return _tokenizer_from_repo(ModelSource(spec.tokenizer_model_id, token=spec.token), spec.tokenizer_json,
                                    gguf_metadata, spec.chat_template, spec.jinja_explicit)
    return load_tokenizer_bundle(
        tokenizer_json=spec.tokenizer_json, tokenizer_config=None, generation_config=None, gguf_metadata=gguf_metadata,
        chat_template_arg=spec.chat_template, jinja_explicit=spec.jinja_explicit, repo_chat_template=None)


def _load_ggml(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """A legacy GGML llama file (REFERENCE §7); the tokenizer comes from `tokenizer_model_id`'s files, or from
    `tokenizer_json` alone."""
    device = device_map.main
    if not spec.tokenizer_model_id and not spec.tokenizer_json:
        raise ValueError(f"{spec.label}: tok_model_id or tokenizer_json is required (GGML files carry no usable "
                         "tokenizer)")
    source = ModelSource(spec.model_id, token=spec.token)
    ggml = open_ggml(source.get(spec.filenames[0]), gqa=spec.gqa)
    dtype = resolve_dtype(spec.dtype, device)
    weights = _progress(ggml.iter_weights(dtype, keep_quantized=True), len(ggml.tensor_types), spec.show_progress,
                        "loading")
    model = load_model(ggml.config, weights, arch_name=None, dtype=dtype, device=device,
                       quant_config=GGUFQuantConfig(use_fast_kernels=spec.execution.fast_kernels))
    tokenizer = _quantized_file_tokenizer(spec, None)
    return LoadedModel(model, tokenizer, spec.model_id, int(ggml.config["max_position_embeddings"]),
                       dtype, device, quantized_file=True)


def _load_vision(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """A safetensors vision-language model and its image processor; ISQ (`spec.isq`, the topology), UQFF, the
    imatrix or calibration, and the device map apply to its text decoder (mistralrs/loader/vision_loader.py)."""
    from mistralrs.loader.vision_loader import (build_vision_model, canonical_weights, read_processor_files,
                                                vision_context_length, vision_family, vision_processor)

    source = ModelSource(spec.model_id, token=spec.token)
    config = _read_json(source.get("config.json"))
    family = vision_family(config, spec.arch)
    device = device_map.main
    dtype = resolve_dtype(spec.dtype, device)
    isq, uqff = _safetensors_quant(spec, source, device_map)
    calibration_file = spec.isq.calibration_file
    weights = canonical_weights(family, _progress(iter_safetensors(_weight_paths(source, uqff), dtype), None,
                                                  spec.show_progress, "loading"))
    model = build_vision_model(family, config, uqff.checkpoint_weights(weights) if uqff is not None else weights,
                               dtype=dtype, device=device, device_map=device_map,
                               quant_config=uqff or (isq if calibration_file is None else None))
    tokenizer = _tokenizer_from_repo(source, spec.tokenizer_json, None, spec.chat_template, spec.jinja_explicit)
    if isq is not None and calibration_file is not None:
        isq = _calibrate(model, tokenizer, config, isq, calibration_file, device, dtype)
    if spec.write_uqff is not None:
        _write_uqff(spec, source, model, dtype, isq)
    processor = vision_processor(family, read_processor_files(source), config, spec.max_edge)
    return LoadedModel(model, tokenizer, spec.model_id, vision_context_length(model), dtype, device, isq=isq,
                       vision_processor=processor)


def _load_diffusion(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedDiffusion:
    """A FLUX image model (diffusers layout) on the model's device."""
    from mistralrs.loader.diffusion_loader import load_flux

    return load_flux(spec, device_map.main, resolve_dtype(spec.dtype, device_map.main))


# The loader of each kind of model (without its adapters).
_LOADERS = {LoadKind.PLAIN: _load_plain, LoadKind.GGUF: _load_gguf, LoadKind.GGML: _load_ggml,
            LoadKind.VISION: _load_vision, LoadKind.DIFFUSION: _load_diffusion}


def _ordering_and_base(spec: LoadSpec, base_id: str | None) -> tuple[OrderingFile, str]:
    """The ordering file of an adapter spec and its base model id (`base_id`, else the file's `base_model_id`);
    ValueError when the two disagree."""
    ordering = read_ordering(spec.adapters.order)
    if base_id is None:
        return ordering, ordering.base_model_id
    if not same_model_id(base_id, ordering.base_model_id):
        raise ValueError(f"{spec.label}: model_id {base_id!r} disagrees with the ordering file's base_model_id "
                         f"{ordering.base_model_id!r}")
    return ordering, base_id


def _load_base(spec: LoadSpec, device_map: DeviceMapSpec) -> tuple[LoadedModel, OrderingFile]:
    """The base model of an adapter spec (its weights as they are: ISQ, if any, comes after the adapters) and the
    ordering file. A safetensors base is `model_id` (else the ordering's `base_model_id`); a GGUF/GGML base takes its
    tokenizer from `tokenizer_model_id`, else from the ordering's `base_model_id` (REFERENCE §1.3)."""
    if spec.kind is LoadKind.PLAIN:
        ordering, model_id = _ordering_and_base(spec, spec.model_id)
        base = replace(spec, model_id=model_id, adapters=None, isq=IsqSpec(), topology=None)
        if spec.adapters.kind is AdapterKind.LORA:
            device_map = _without_topology(device_map, spec.label)
    else:
        ordering, tok_model_id = _ordering_and_base(spec, None)
        base = replace(spec, adapters=None, tokenizer_model_id=spec.tokenizer_model_id or tok_model_id)
    loaded = _LOADERS[spec.kind](base, device_map)
    return _on_one_device(loaded, spec.label), ordering


def _load_with_adapters(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """The base model with the ordering file's LoRA adapters (merged into a dense base, else hooked in; those in
    `order` active) or X-LoRA experts and classifier (REFERENCE §6); a safetensors LoRA model is then quantized in
    situ when the spec asks (after the merge)."""
    adapters = spec.adapters
    isq = _isq_config(spec, device_map) if adapters.kind is AdapterKind.LORA else None
    loaded, ordering = _load_base(spec, device_map)
    if adapters.kind is AdapterKind.XLORA:
        apply_xlora(loaded.model, ordering, xlora_files(adapters.model_id, spec.token), dtype=loaded.dtype,
                    device=loaded.device, non_granular_index=adapters.non_granular_index)
        return loaded
    apply_lora(loaded.model, ordering, lora_files(ordering, adapters.model_id, spec.token), dtype=loaded.dtype,
               device=loaded.device, mergeable=spec.kind is LoadKind.PLAIN)
    if isq is not None:
        isq.quantize_loaded(loaded.model)
        loaded.isq = isq
    return loaded


def _load_with_anymoe(spec: LoadSpec, device_map: DeviceMapSpec) -> LoadedModel:
    """The base model made an AnyMoE model (loader/anymoe_training.py: experts, gates trained or read), then
    quantized in situ when the spec asks (after training, REFERENCE §8.10)."""
    label = f"{spec.label} with anymoe_config"
    config = _read_json(ModelSource(spec.model_id, token=spec.token).get("config.json"))
    rows = check_anymoe(spec.anymoe, config, spec.arch)
    isq = _isq_config(spec, device_map)
    base = replace(spec, anymoe=None, isq=IsqSpec(), topology=None)
    loaded = _on_one_device(_load_plain(base, _without_topology(device_map, label)), label)
    apply_anymoe(loaded.model, loaded.tokenizer, spec.anymoe, rows, token=spec.token, dtype=loaded.dtype,
                 device=loaded.device, max_len=loaded.max_model_len)
    if isq is not None:
        isq.quantize_loaded(loaded.model)
        loaded.isq = isq
    return loaded


def load(spec: LoadSpec) -> LoadedModel | LoadedDiffusion:
    """Load the model and tokenizer that `spec` describes, quantized in situ if it asks, its decoder layers spread
    over devices as `num_device_layers` and the topology's `device` entries say (a DIFFUSION spec: the image
    pipeline, `LoadedDiffusion`).

    Called inside `distributed.group.building_for(group)` (on the thread that loads), the model is built for that
    tensor-parallel group: every rank calls `load` with the same spec and holds its shard of each weight, on the
    spec's device (no device map); see docs/architecture.md, "Tensor parallelism"."""
    _check_tensor_parallel(spec)
    device_map = _device_map_spec(spec)
    if spec.adapters is not None:
        return _load_with_adapters(spec, device_map)
    if spec.anymoe is not None:
        return _load_with_anymoe(spec, device_map)
    return _LOADERS[spec.kind](spec, device_map)


def _check_tensor_parallel(spec: LoadSpec) -> None:
    """ValueError naming the option when a tensor-parallel load asks for something not sharded."""
    group = current_group()
    if group is None:
        return
    if spec.write_uqff is not None:
        raise ValueError(f"{spec.label}: write_uqff cannot be combined with tensor parallelism ({group.world_size} "
                         "ranks; each holds a shard, and the file is the whole model): write it in one process "
                         "without tensor parallelism, then load it with from_uqff under tensor parallelism")
    refused = {
        "image generation (a diffusion model)": spec.kind is LoadKind.DIFFUSION,
        "anymoe_config": spec.anymoe is not None,
        "calibration_file": spec.isq.calibration_file is not None,
        "num_device_layers": spec.num_device_layers is not None,
    }
    for option, asked in refused.items():
        if asked:
            raise ValueError(f"{spec.label}: {option} cannot be combined with tensor parallelism "
                             f"({group.world_size} ranks)")


def _device_map_spec(spec: LoadSpec) -> DeviceMapSpec:
    """The model's device with the spec's topology (parsed once: its `isq` entries drive ISQ, its `device`
    entries the device map), `num_device_layers`, and the automatic map's parameters (the defaults when the
    spec gives none: a CUDA model without a manual map is always planned, REFERENCE §8.13; never an adapter or
    AnyMoE model, whose adapters and experts live on the model's device, nor a tensor-parallel rank's shard)."""
    topology = Topology.from_yaml(spec.topology) if spec.topology is not None else None
    if spec.kind is LoadKind.GGUF and topology is not None and any(
            entry is not None and entry.isq is not None for entry in topology.layers):
        raise ValueError(f"{spec.label}: topology {spec.topology!r} has `isq` entries; a GGUF model's weights are "
                         "quantized already (only `device` entries apply)")
    main = spec.device or default_device()
    sharded = current_group() is not None
    if sharded and topology is not None and topology.devices() - {main}:
        raise ValueError(f"{spec.label}: topology {spec.topology!r} has `device` entries; a tensor-parallel rank "
                         f"keeps its whole shard on {main}")
    on_one_device = spec.adapters is not None or spec.anymoe is not None or sharded
    if spec.auto_map is not None and (main.type != "cuda" or on_one_device):
        reason = (f"the model runs on {main}" if main.type != "cuda" else
                  "a tensor-parallel rank keeps its shard on its device" if sharded else
                  "adapters need every layer on one device")
        logger.info("%s: auto_map_params plan a map over CUDA devices; %s, every layer on %s", spec.label, reason,
                    main)
    auto_map = None if on_one_device else spec.auto_map or AutoMapParams()
    return DeviceMapSpec(main, topology, spec.num_device_layers, auto_map=auto_map)


def _without_topology(device_map: DeviceMapSpec, label: str) -> DeviceMapSpec:
    """The spec for the base of a LoRA model, whose topology ISQ applies after the merge: without the topology,
    which may name no other device than the model's (see `_on_one_device`)."""
    others = device_map.topology.devices() - {device_map.main} if device_map.topology is not None else set()
    if others:
        raise ValueError(f"{label}: adapters need every decoder layer on the model's device "
                         f"{device_map.main}, but the topology names {sorted(str(d) for d in others)}")
    return replace(device_map, topology=None)


def _on_one_device(loaded: LoadedModel, label: str) -> LoadedModel:
    """`loaded` when its decoder layers all run on its device; ValueError for an adapter model, whose adapter
    weights live on the model's device, when a device map spread them."""
    device_map = getattr(loaded.model, "device_map", None)
    if device_map is not None:
        raise ValueError(f"{label}: adapters need every decoder layer on the model's device "
                         f"{loaded.device}, but the device map puts {device_map.describe()}")
    return loaded
