"""`Which`: the model selector handed to `Runner` (REFERENCE §1.3).

Every variant is a class nested in `Which` (`Which.Plain`, `Which.GGUF`, ...) and a subclass of it, with the
exact runtime signature of mistralrs 0.5.0 (positional or keyword). Variants are frozen dataclasses: fields
read back as attributes, `repr` is readable and equal selectors compare equal. Construction validates
every field: a wrong type raises TypeError naming the field, a bad value ValueError naming the field and the
accepted values. Architecture, dtype and ISQ organization may be given as enum members or as their
CLI/TOML strings (`arch="llama"`, `dtype="bf16"`, `organization="moqe"`); they are stored as enum members.
Paths and model ids may be `os.PathLike`; they are stored as `str`.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

from .enums import (
    Architecture,
    DiffusionArchitecture,
    IsqOrganization,
    ModelDType,
    TextAutoMapParams,
    VisionArchitecture,
    VisionAutoMapParams,
)


class Which:
    """Model selector. Construct one of its variants, e.g. `Which.Plain(model_id="...")` or
    `Which.GGUF(quantized_model_id=..., quantized_filename=..., tok_model_id=...)`."""

    Plain: ClassVar[type["Plain"]]
    XLora: ClassVar[type["XLora"]]
    Lora: ClassVar[type["Lora"]]
    GGUF: ClassVar[type["GGUF"]]
    XLoraGGUF: ClassVar[type["XLoraGGUF"]]
    LoraGGUF: ClassVar[type["LoraGGUF"]]
    GGML: ClassVar[type["GGML"]]
    XLoraGGML: ClassVar[type["XLoraGGML"]]
    LoraGGML: ClassVar[type["LoraGGML"]]
    VisionPlain: ClassVar[type["VisionPlain"]]
    DiffusionPlain: ClassVar[type["DiffusionPlain"]]

    # Per-variant validation settings, overridden by the variants.
    _arch_enum: ClassVar[type | None] = None  # enum that `arch` must belong to
    _auto_map_type: ClassVar[type | None] = None  # class of `auto_map_params`
    _multi_file: ClassVar[bool] = False  # `quantized_filename` may be a list (GGUF only)

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.default is None:
                continue
            owner = f"{type(self).__qualname__}.{spec.name}"
            object.__setattr__(self, spec.name, _RULES[spec.name](self, owner, value))


def _path(_: Which, owner: str, value: Any) -> str:
    """A model id, file or directory path: str or os.PathLike, stored as a non-empty str."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{owner} must be a str (model id or path), got {type(value).__name__}.")
    if not value:
        raise ValueError(f"{owner} must not be empty.")
    return value


def _filenames(which: Which, owner: str, value: Any) -> str | list[str]:
    """A GGUF/GGML file name, or (GGUF variants only) a non-empty list of file names."""
    if isinstance(value, (list, tuple)):
        if not which._multi_file:
            raise TypeError(f"{owner} must be a single str for {type(which).__qualname__} (lists are GGUF only).")
        if not value:
            raise ValueError(f"{owner} must not be an empty list.")
        return [_path(which, f"{owner}[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, str) or isinstance(value, os.PathLike):
        return _path(which, owner, value)
    accepted = "a str or a non-empty list of str" if which._multi_file else "a str"
    raise TypeError(f"{owner} must be {accepted}, got {type(value).__name__}.")


def _enum_value(enum: Any, owner: str, value: Any) -> Any:
    """An enum member, or its CLI/TOML string converted with `enum.from_str`."""
    if isinstance(value, enum):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{owner} must be {enum.__name__} or its string name, got {value!r}.")
    try:
        return enum.from_str(value)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def _arch(which: Which, owner: str, value: Any) -> Any:
    return _enum_value(which._arch_enum, owner, value)


def _dtype(_: Which, owner: str, value: Any) -> ModelDType:
    return _enum_value(ModelDType, owner, value)


def _organization(_: Which, owner: str, value: Any) -> IsqOrganization:
    return _enum_value(IsqOrganization, owner, value)


def _int_at_least(minimum: int) -> Callable[[Which, str, Any], int]:
    def check(_: Which, owner: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{owner} must be an int, got {type(value).__name__}.")
        if value < minimum:
            raise ValueError(f"{owner} must be >= {minimum}, got {value}.")
        return int(value)

    return check


def _auto_map(which: Which, owner: str, value: Any) -> Any:
    if not isinstance(value, which._auto_map_type):
        raise TypeError(f"{owner} must be a {which._auto_map_type.__name__} or None, got {value!r}.")
    return value


# Field name -> validator(variant, "Variant.field", value) returning the stored value.
_RULES: dict[str, Callable[[Which, str, Any], Any]] = {
    "model_id": _path,
    "xlora_model_id": _path,
    "adapters_model_id": _path,
    "quantized_model_id": _path,
    "tok_model_id": _path,
    "order": _path,
    "tokenizer_json": _path,
    "topology": _path,
    "write_uqff": _path,
    "from_uqff": _path,
    "imatrix": _path,
    "calibration_file": _path,
    "quantized_filename": _filenames,
    "arch": _arch,
    "dtype": _dtype,
    "organization": _organization,
    "tgt_non_granular_index": _int_at_least(0),
    "gqa": _int_at_least(1),
    "max_edge": _int_at_least(1),
    "auto_map_params": _auto_map,
}


@dataclass(frozen=True)
class Plain(Which):
    """A Hugging Face safetensors text model (local directory or hub repo)."""

    _arch_enum = Architecture
    _auto_map_type = TextAutoMapParams

    model_id: str  # hub repo id or local directory
    arch: Architecture | None = None  # None: detected from config.json "architectures"
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    topology: str | None = None  # per-layer ISQ/device YAML (§5)
    organization: IsqOrganization | None = None  # ISQ organization (Default or MoQE)
    write_uqff: str | None = None  # write the ISQ-quantized weights to this UQFF file
    from_uqff: str | None = None  # load pre-quantized weights from this UQFF file
    dtype: ModelDType = ModelDType.Auto  # weight/activation dtype
    imatrix: str | None = None  # llama.cpp .imatrix file guiding ISQ
    calibration_file: str | None = None  # text file to collect an imatrix from before ISQ
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class XLora(Which):
    """An X-LoRA model: base safetensors model plus X-LoRA classifier and adapters."""

    _arch_enum = Architecture
    _auto_map_type = TextAutoMapParams

    xlora_model_id: str  # repo or directory holding the X-LoRA classifier and adapters
    order: str  # ordering JSON file (§6.1)
    arch: Architecture | None = None  # None: detected from config.json
    model_id: str | None = None  # base model; None: `base_model_id` of the ordering file
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    tgt_non_granular_index: int | None = None  # token index after which the scalings are frozen
    topology: str | None = None  # per-layer ISQ/device YAML (§5)
    write_uqff: str | None = None  # write the ISQ-quantized weights to this UQFF file
    from_uqff: str | None = None  # load pre-quantized weights from this UQFF file
    dtype: ModelDType = ModelDType.Auto  # weight/activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class Lora(Which):
    """A base safetensors model plus LoRA adapters named by an ordering file."""

    _arch_enum = Architecture
    _auto_map_type = TextAutoMapParams

    adapters_model_id: str  # repo or directory holding the LoRA adapters
    order: str  # ordering JSON file (§6.1)
    arch: Architecture | None = None  # None: detected from config.json
    model_id: str | None = None  # base model; None: `base_model_id` of the ordering file
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    topology: str | None = None  # per-layer ISQ/device YAML (§5)
    write_uqff: str | None = None  # write the ISQ-quantized weights to this UQFF file
    from_uqff: str | None = None  # load pre-quantized weights from this UQFF file
    dtype: ModelDType = ModelDType.Auto  # weight/activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class GGUF(Which):
    """A GGUF model (one file or several split files)."""

    _auto_map_type = TextAutoMapParams
    _multi_file = True

    quantized_model_id: str  # repo or directory holding the GGUF file(s)
    quantized_filename: str | list[str]  # GGUF file name, or the list of its parts
    tok_model_id: str | None = None  # tokenizer/template source; None: read them from the GGUF
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class XLoraGGUF(Which):
    """A GGUF base model plus X-LoRA classifier and adapters."""

    _auto_map_type = TextAutoMapParams
    _multi_file = True

    quantized_model_id: str  # repo or directory holding the GGUF file(s)
    quantized_filename: str | list[str]  # GGUF file name, or the list of its parts
    xlora_model_id: str  # repo or directory holding the X-LoRA classifier and adapters
    order: str  # ordering JSON file (§6.1)
    tok_model_id: str | None = None  # tokenizer source; None: `base_model_id` of the ordering file
    tgt_non_granular_index: int | None = None  # token index after which the scalings are frozen
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class LoraGGUF(Which):
    """A GGUF base model plus LoRA adapters named by an ordering file."""

    _auto_map_type = TextAutoMapParams
    _multi_file = True

    quantized_model_id: str  # repo or directory holding the GGUF file(s)
    quantized_filename: str | list[str]  # GGUF file name, or the list of its parts
    adapters_model_id: str  # repo or directory holding the LoRA adapters
    order: str  # ordering JSON file (§6.1)
    tok_model_id: str | None = None  # tokenizer source; None: `base_model_id` of the ordering file
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class GGML(Which):
    """A legacy GGML (llama.cpp `ggjt`) model; the tokenizer comes from `tok_model_id`, without which the
    load raises ValueError (GGML files carry no usable tokenizer)."""

    _auto_map_type = TextAutoMapParams

    quantized_model_id: str  # repo or directory holding the GGML file
    quantized_filename: str  # GGML file name
    tok_model_id: str | None = None  # tokenizer source; the load needs it
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    gqa: int | None = None  # grouped-query factor: num_heads / num_kv_heads (not in GGML files); None: 1
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class XLoraGGML(Which):
    """A GGML base model plus X-LoRA classifier and adapters."""

    _auto_map_type = TextAutoMapParams

    quantized_model_id: str  # repo or directory holding the GGML file
    quantized_filename: str  # GGML file name
    xlora_model_id: str  # repo or directory holding the X-LoRA classifier and adapters
    order: str  # ordering JSON file (§6.1)
    tok_model_id: str | None = None  # tokenizer source; None: `base_model_id` of the ordering file
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    tgt_non_granular_index: int | None = None  # token index after which the scalings are frozen
    gqa: int | None = None  # grouped-query factor: num_heads / num_kv_heads; None: 1
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class LoraGGML(Which):
    """A GGML base model plus LoRA adapters named by an ordering file."""

    _auto_map_type = TextAutoMapParams

    quantized_model_id: str  # repo or directory holding the GGML file
    quantized_filename: str  # GGML file name
    adapters_model_id: str  # repo or directory holding the LoRA adapters
    order: str  # ordering JSON file (§6.1)
    tok_model_id: str | None = None  # tokenizer source; None: `base_model_id` of the ordering file
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    gqa: int | None = None  # grouped-query factor: num_heads / num_kv_heads; None: 1
    topology: str | None = None  # per-layer device YAML (§5)
    dtype: ModelDType = ModelDType.Auto  # activation dtype
    auto_map_params: TextAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class VisionPlain(Which):
    """A Hugging Face safetensors vision-language model; `arch` is required."""

    _arch_enum = VisionArchitecture
    _auto_map_type = VisionAutoMapParams

    model_id: str  # hub repo id or local directory
    arch: VisionArchitecture  # vision architecture (required)
    tokenizer_json: str | None = None  # local tokenizer.json overriding the repo's
    topology: str | None = None  # per-layer ISQ/device YAML (§5)
    write_uqff: str | None = None  # write the ISQ-quantized weights to this UQFF file
    from_uqff: str | None = None  # load pre-quantized weights from this UQFF file
    dtype: ModelDType = ModelDType.Auto  # weight/activation dtype
    max_edge: int | None = None  # resize images so the longest edge is at most this (Idefics, Qwen2-VL)
    calibration_file: str | None = None  # text file to collect an imatrix from before ISQ
    imatrix: str | None = None  # llama.cpp .imatrix file guiding ISQ
    auto_map_params: VisionAutoMapParams | None = None  # sizes guiding automatic device mapping


@dataclass(frozen=True)
class DiffusionPlain(Which):
    """A diffusion (image generation) model; `arch` is required."""

    _arch_enum = DiffusionArchitecture

    model_id: str  # hub repo id or local directory
    arch: DiffusionArchitecture  # diffusion architecture (required)
    dtype: ModelDType = ModelDType.Auto  # weight/activation dtype


_VARIANTS = (Plain, XLora, Lora, GGUF, XLoraGGUF, LoraGGUF, GGML, XLoraGGML, LoraGGML, VisionPlain, DiffusionPlain)
for _variant in _VARIANTS:
    _variant.__qualname__ = f"Which.{_variant.__name__}"
    setattr(Which, _variant.__name__, _variant)
