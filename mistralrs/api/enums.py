"""Enums and small configuration types of the public Python API (REFERENCE §1.2, §1.3, §1.11).

The enums are int-valued like the reference's pyo3 `eq_int` enums: `int(Architecture.Llama) == 3` and
`repr(Architecture.Mistral) == "Architecture.Mistral"`. Each one parses its CLI/TOML spelling with
`from_str` (case-insensitive; the member name itself is accepted too).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar


class _NamedIntEnum(IntEnum):
    """Int-valued enum whose members also carry their CLI/TOML spellings.

    A member is declared as `Name = (ordinal, "cli-name", "other-spelling", ...)`; the first spelling is
    the canonical string form (`member.cli_names[0]`).
    """

    cli_names: tuple[str, ...]

    def __new__(cls, ordinal: int, *cli_names: str) -> "_NamedIntEnum":
        member = int.__new__(cls, ordinal)
        member._value_ = ordinal
        member.cli_names = cli_names
        return member

    def __eq__(self, other: object) -> bool:
        # Members of different enums never compare equal (so `Architecture.Mistral` and
        # `VisionArchitecture.Phi3V` stay distinct dict keys); a plain int compares by value.
        if isinstance(other, _NamedIntEnum) and type(other) is not type(self):
            return False
        return int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return int.__hash__(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __str__(self) -> str:
        return repr(self)

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    @classmethod
    def accepted_names(cls) -> list[str]:
        """The canonical CLI/TOML spelling of every member, in ordinal order."""
        return [member.cli_names[0] for member in cls]

    @classmethod
    def from_str(cls, text: Any) -> Any:
        """Parse a CLI/TOML spelling (case-insensitive) or a member name; a member is returned as is.

        Raises TypeError for a non-string and ValueError listing the accepted names for an unknown one.
        """
        if isinstance(text, cls):
            return text
        if not isinstance(text, str):
            raise TypeError(f"Expected a {cls.__name__} or a string, got {type(text).__name__}.")
        key = text.strip().lower()
        for name, member in cls.__members__.items():
            if key == name.lower() or key in member.cli_names:
                return member
        accepted = ", ".join(cls.accepted_names())
        raise ValueError(f"Unknown {cls.__name__} {text!r}; accepted values: {accepted}.")


class Architecture(_NamedIntEnum):
    """Architecture of a plain text model (`Which.Plain(arch=...)`); None means auto-detect."""

    Mistral = (0, "mistral")
    Gemma = (1, "gemma")
    Mixtral = (2, "mixtral")
    Llama = (3, "llama")
    Phi2 = (4, "phi2")
    Phi3 = (5, "phi3")
    Qwen2 = (6, "qwen2")
    Gemma2 = (7, "gemma2")
    Starcoder2 = (8, "starcoder2")
    Phi3_5MoE = (9, "phi3.5moe")
    DeepseekV2 = (10, "deepseekv2")
    DeepseekV3 = (11, "deepseekv3")


class VisionArchitecture(_NamedIntEnum):
    """Architecture of a vision model (`Which.VisionPlain(arch=...)`, required).

    `LLaVaNext` and `LLaVa` (the seed document's spelling) are aliases of `LLaVANext` and `LLaVA`.
    """

    Phi3V = (0, "phi3v")
    Idefics2 = (1, "idefics2")
    LLaVANext = (2, "llava_next", "llava-next")
    LLaVA = (3, "llava")
    VLlama = (4, "vllama")
    Qwen2VL = (5, "qwen2vl")
    Idefics3 = (6, "idefics3")
    MiniCpmO = (7, "minicpmo")
    Phi4MM = (8, "phi4mm")
    Qwen2_5VL = (9, "qwen2_5vl")
    Gemma3 = (10, "gemma3")
    Mistral3 = (11, "mistral3")
    LLaVaNext = (2, "llava_next")
    LLaVa = (3, "llava")


class DiffusionArchitecture(_NamedIntEnum):
    """Architecture of a diffusion model (`Which.DiffusionPlain(arch=...)`)."""

    Flux = (0, "flux")
    FluxOffloaded = (1, "flux-offloaded", "flux_offloaded")


class ModelDType(_NamedIntEnum):
    """Weight/activation dtype; `Auto` picks BF16, then F16, then F32 (first that runs on every device)."""

    Auto = (0, "auto")
    BF16 = (1, "bf16", "bfloat16")
    F16 = (2, "f16", "float16", "half")
    F32 = (3, "f32", "float32", "float")


class ImageGenerationResponseFormat(_NamedIntEnum):
    """How a generated image is returned: a local PNG path (`Url`) or a base64 data URL (`B64Json`)."""

    Url = (0, "url")
    B64Json = (1, "b64_json", "b64json")


class ToolChoice(_NamedIntEnum):
    """Whether tool calls are parsed from the output (`Auto`) or not (`NoTools`)."""

    NoTools = (0, "none", "no_tools")
    Auto = (1, "auto")


class IsqOrganization(_NamedIntEnum):
    """Which layers ISQ quantizes: all of them (`Default`) or only MoE experts (`MoQE`, arXiv 2310.02410)."""

    Default = (0, "default")
    MoQE = (1, "moqe")


class ToolCallType(_NamedIntEnum):
    """Type of a returned tool call; serialised as `"function"`."""

    Function = (0, "function")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """Return `value` as an int, or raise TypeError/ValueError naming `owner.name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_str_list(owner: str, name: str, value: Any) -> list[str]:
    """Return a copy of a list of strings, or raise TypeError naming `owner.name`."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"{owner}.{name} must be a list of str, got {value!r}.")
    return list(value)


@dataclass(frozen=True)
class TextAutoMapParams:
    """Sizes that guide automatic device mapping of a text model (not hard limits)."""

    max_seq_len: int = 4096  # longest sequence the mapping plans KV memory for
    max_batch_size: int = 1  # sequences running at once that the mapping plans for

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size"):
            object.__setattr__(self, name, _check_int(type(self).__name__, name, getattr(self, name), 1))


@dataclass(frozen=True)
class VisionAutoMapParams:
    """Sizes that guide automatic device mapping of a vision model (not hard limits)."""

    max_seq_len: int = 4096  # longest sequence the mapping plans KV memory for
    max_batch_size: int = 1  # sequences running at once that the mapping plans for
    max_num_images: int = 1  # images per sequence the mapping plans for
    max_image_length: int = 1024  # longest image edge in pixels the mapping plans for

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size", "max_num_images", "max_image_length"):
            object.__setattr__(self, name, _check_int(type(self).__name__, name, getattr(self, name), 1))


class AnyMoeExpertType:
    """Kind of AnyMoE expert: `AnyMoeExpertType.FineTuned()` or `AnyMoeExpertType.LoraAdapter(rank, alpha,
    target_modules)`. Like the reference's complex enum, each variant is a subclass of this class."""

    FineTuned: ClassVar[type["FineTunedExpert"]]
    LoraAdapter: ClassVar[type["LoraAdapterExpert"]]


@dataclass(frozen=True)
class FineTunedExpert(AnyMoeExpertType):
    """Experts are the MLPs of fine-tuned checkpoints (`<prefix>.<layer>.<mlp>` of each model id)."""


@dataclass(frozen=True)
class LoraAdapterExpert(AnyMoeExpertType):
    """Experts are the base MLP plus a LoRA delta read from each adapter model id."""

    rank: int  # LoRA rank r
    alpha: float  # LoRA alpha; the delta is scaled by alpha / rank
    target_modules: list[str]  # MLP projections the adapter applies to, e.g. ["gate_proj"]

    def __post_init__(self) -> None:
        owner = "AnyMoeExpertType.LoraAdapter"
        object.__setattr__(self, "rank", _check_int(owner, "rank", self.rank, 1))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise TypeError(f"{owner}.alpha must be a float, got {type(self.alpha).__name__}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "target_modules", _check_str_list(owner, "target_modules", self.target_modules))


FineTunedExpert.__qualname__ = "AnyMoeExpertType.FineTuned"
LoraAdapterExpert.__qualname__ = "AnyMoeExpertType.LoraAdapter"
AnyMoeExpertType.FineTuned = FineTunedExpert
AnyMoeExpertType.LoraAdapter = LoraAdapterExpert


@dataclass
class AnyMoeConfig:
    """Turns the loaded model into an AnyMoE model (REFERENCE §1.11, §8.10); runtime defaults of v0.5.0."""

    hidden_size: int  # hidden size of the base model (input width of each gate)
    dataset_json: str  # path of {"rows": [{"prompt", "expert", "image_urls"?}]} used to train the gates
    prefix: str  # module path of the decoder layers, e.g. "model.layers"
    mlp: str  # name of the MLP module inside a layer, e.g. "mlp"
    model_ids: list[str]  # expert sources (expert 0 is the base MLP; these are experts 1..n)
    expert_type: AnyMoeExpertType  # FineTuned() or LoraAdapter(...)
    layers: list[int] = field(default_factory=list)  # decoder layers that get an MoE; empty = all
    lr: float = 1e-3  # AdamW learning rate of the gates
    epochs: int = 100  # passes over the dataset
    batch_size: int = 4  # prompts per gate-training step
    gate_model_id: str | None = None  # where gates are saved (training) or loaded from (training=False)
    training: bool = True  # train the gates (True) or load them from gate_model_id (False)
    loss_csv_path: str | None = None  # optional `.csv` file for per-step gate losses

    def __post_init__(self) -> None:
        owner = "AnyMoeConfig"
        self.hidden_size = _check_int(owner, "hidden_size", self.hidden_size, 1)
        for name in ("dataset_json", "prefix", "mlp"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{owner}.{name} must be a str, got {getattr(self, name)!r}.")
        self.model_ids = _check_str_list(owner, "model_ids", self.model_ids)
        if not self.model_ids:
            raise ValueError(f"{owner}.model_ids must name at least one expert model.")
        if not isinstance(self.expert_type, AnyMoeExpertType):
            raise TypeError(f"{owner}.expert_type must be an AnyMoeExpertType, got {self.expert_type!r}.")
        if not isinstance(self.layers, (list, tuple)):
            raise TypeError(f"{owner}.layers must be a list of int, got {self.layers!r}.")
        self.layers = [_check_int(owner, "layers", layer, 0) for layer in self.layers]
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not self.lr > 0:
            raise ValueError(f"{owner}.lr must be a float > 0, got {self.lr!r}.")
        self.lr = float(self.lr)
        self.epochs = _check_int(owner, "epochs", self.epochs, 1)
        self.batch_size = _check_int(owner, "batch_size", self.batch_size, 1)
        if self.gate_model_id is not None and not isinstance(self.gate_model_id, str):
            raise TypeError(f"{owner}.gate_model_id must be a str or None, got {self.gate_model_id!r}.")
        if not isinstance(self.training, bool):
            raise TypeError(f"{owner}.training must be a bool, got {self.training!r}.")
        if not self.training and self.gate_model_id is None:
            raise ValueError(f"{owner}.gate_model_id is required when training=False (gates are loaded from it).")
        if self.loss_csv_path is not None:
            if not isinstance(self.loss_csv_path, str):
                raise TypeError(f"{owner}.loss_csv_path must be a str or None, got {self.loss_csv_path!r}.")
            if not self.loss_csv_path.endswith(".csv"):
                raise ValueError(f"{owner}.loss_csv_path must end with '.csv', got {self.loss_csv_path!r}.")
