"""From a `Which` selection to a loaded model and tokenizer, ready for the engine."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.adapters.lora import apply_lora
from mistralrs.adapters.ordering import read_ordering, same_model_id
from mistralrs.api.enums import ModelDType
from mistralrs.api.which import Which
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.loader.source import ModelSource, resolve_token
from mistralrs.loader.tokenizer import TokenizerBundle, load_tokenizer_bundle
from mistralrs.quant.gguf_linear import GGUFQuantConfig

logger = logging.getLogger(__name__)

# Which variants whose capability is not built yet, and what they need.
_NOT_BUILT = {
    "XLora": "X-LoRA adapters", "LoraGGUF": "LoRA adapters on GGUF models",
    "XLoraGGUF": "X-LoRA adapters on GGUF models", "LoraGGML": "LoRA adapters on GGML models",
    "XLoraGGML": "X-LoRA adapters on GGML models", "GGML": "the legacy GGML (GGJT) file loader",
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


def _load_plain(which, token, device, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    source = ModelSource(which.model_id, token=token)
    config = _read_json(source.get("config.json"))
    dtype = resolve_dtype(which.dtype, device)
    arch_name = which.arch.name if which.arch is not None else None
    weights = _progress(iter_safetensors(_safetensors_paths(source), dtype), None, show_progress, "loading")
    model = load_model(config, weights, arch_name=arch_name, dtype=dtype, device=device)
    tokenizer = _tokenizer_from_repo(source, which.tokenizer_json, None, chat_template, jinja_explicit)
    return LoadedModel(model, tokenizer, which.model_id, int(config.get("max_position_embeddings", 4096)),
                       dtype, device)


def _load_gguf(which, token, device, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    source = ModelSource(which.quantized_model_id, token=token)
    filenames = [which.quantized_filename] if isinstance(which.quantized_filename, str) else which.quantized_filename
    gguf = open_gguf([source.get(name) for name in filenames])
    dtype = resolve_dtype(which.dtype, device)
    weights = _progress(gguf.iter_weights(dtype, keep_quantized=True), len(gguf.tensor_types), show_progress,
                        "loading")
    model = load_model(gguf.config, weights, arch_name=None, dtype=dtype, device=device,
                       quant_config=GGUFQuantConfig())
    if which.tok_model_id is not None:
        tok_source = ModelSource(which.tok_model_id, token=token)
        tokenizer = _tokenizer_from_repo(tok_source, None, gguf.metadata, chat_template, jinja_explicit)
    else:
        tokenizer = load_tokenizer_bundle(
            tokenizer_json=None, tokenizer_config=None, generation_config=None, gguf_metadata=gguf.metadata,
            chat_template_arg=chat_template, jinja_explicit=jinja_explicit, repo_chat_template=None)
    max_len = int(gguf.config.get("max_position_embeddings", 4096))
    return LoadedModel(model, tokenizer, which.quantized_model_id, max_len, dtype, device)


def _load_lora(which, token, device, show_progress, chat_template, jinja_explicit) -> LoadedModel:
    """The base model (safetensors) with the ordering file's LoRA adapters merged or hooked in (REFERENCE §6)."""
    if which.from_uqff is not None or which.write_uqff is not None or which.topology is not None:
        raise ValueError("Which.Lora: from_uqff, write_uqff and topology are not supported yet")
    ordering = read_ordering(which.order)
    model_id = which.model_id if which.model_id is not None else ordering.base_model_id
    if not same_model_id(model_id, ordering.base_model_id):
        raise ValueError(f"Which.Lora: model_id {model_id!r} disagrees with the ordering file's base_model_id "
                         f"{ordering.base_model_id!r}")
    base = Which.Plain(model_id=model_id, arch=which.arch, tokenizer_json=which.tokenizer_json, dtype=which.dtype)
    loaded = _load_plain(base, token, device, show_progress, chat_template, jinja_explicit)
    apply_lora(loaded.model, ordering, ModelSource(which.adapters_model_id, token=token), token=token,
               dtype=loaded.dtype, device=device)
    return loaded


def load_pipeline(which, *, token_source: str = "cache", chat_template: str | None = None,
                  jinja_explicit: str | None = None, show_progress: bool | None = None,
                  device: torch.device | None = None) -> LoadedModel:
    """Load the model and tokenizer that `which` selects."""
    variant = type(which).__name__
    if variant in _NOT_BUILT:
        raise ValueError(f"Which.{variant} is not supported yet: {_NOT_BUILT[variant]} are not built in this "
                         "version (supported: Which.Plain, Which.GGUF, Which.Lora)")
    device = device or default_device()
    token = resolve_token(token_source)
    if isinstance(which, Which.Plain):
        if which.from_uqff is not None or which.write_uqff is not None:
            raise ValueError("Which.Plain: from_uqff/write_uqff are not supported yet (UQFF is not built)")
        if which.topology is not None or which.imatrix is not None or which.calibration_file is not None:
            raise ValueError("Which.Plain: topology, imatrix and calibration_file need ISQ, which is not built yet")
        return _load_plain(which, token, device, show_progress, chat_template, jinja_explicit)
    if isinstance(which, Which.Lora):
        return _load_lora(which, token, device, show_progress, chat_template, jinja_explicit)
    if isinstance(which, Which.GGUF):
        if which.topology is not None:
            raise ValueError("Which.GGUF: topology is not supported yet")
        return _load_gguf(which, token, device, show_progress, chat_template, jinja_explicit)
    raise TypeError(f"which must be a Which variant, got {type(which).__name__}")
