"""Model registry: finds the model class for an HF architecture, an `Architecture` enum name, or a GGUF arch.

Each model file calls `register(...)` for its classes at import time; `mistralrs/models/__init__.py` imports
every model file, so importing this module (which imports the package) fills the registry.
Keys are plain strings so that this module depends on nothing above it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

_BY_HF_ARCHITECTURE: dict[str, type[nn.Module]] = {}  # "LlamaForCausalLM" -> class
_BY_ARCH_NAME: dict[str, type[nn.Module]] = {}  # lower-cased enum name or CLI name ("llama", "phi3.5moe") -> class
_ARCH_NAME_SPELLING: dict[str, str] = {}  # lower-cased -> the spelling it was registered with (for messages)
_BY_GGUF_ARCHITECTURE: dict[str, type[nn.Module]] = {}  # GGUF general.architecture ("llama", "qwen2") -> class
_HF_ARCHITECTURE_OF: dict[type[nn.Module], str] = {}  # class -> its first HF architecture name
_TEXT_IN_MULTIMODAL: dict[str, TextInMultimodal] = {}  # "Gemma3ForConditionalGeneration" -> where its text model is


@dataclass(frozen=True)
class TextInMultimodal:
    """Where a multimodal checkpoint keeps its text decoder, so that `Which.Plain` loads it text-only."""

    text_architecture: str  # the registered text class's HF architecture, e.g. "Gemma3ForCausalLM"
    text_defaults: dict[str, Any]  # transformers' text-config defaults for keys the sparse `text_config` omits
    weight_prefixes: tuple[tuple[str, str], ...]  # checkpoint name prefix -> the text model's prefix
    skipped_prefixes: tuple[str, ...]  # the other modalities' weights (vision tower, projector): not loaded

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The text model's config dict: `text_config` over the defaults, naming the text architecture."""
        return {**self.text_defaults, **(config.get("text_config") or {}), "architectures": [self.text_architecture]}

    def text_weights(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The text model's weights under its own names (other names pass unchanged, to be reported)."""
        for name, tensor in weights:
            if name.startswith(self.skipped_prefixes):
                continue
            old = next((p for p in self.weight_prefixes if name.startswith(p[0])), None)
            yield (name if old is None else old[1] + name[len(old[0]):]), tensor


def register_text_in_multimodal(hf_architecture: str, view: TextInMultimodal) -> None:
    """Declares where the multimodal architecture `hf_architecture` keeps a registered text model."""
    _TEXT_IN_MULTIMODAL[hf_architecture] = view


def text_in_multimodal(hf_architectures: list[str] | None) -> TextInMultimodal | None:
    """The text view of a multimodal `architectures` entry, None for any other checkpoint."""
    if not hf_architectures or len(hf_architectures) != 1:
        return None
    return _TEXT_IN_MULTIMODAL.get(hf_architectures[0])


def register(
    cls: type[nn.Module],
    *,
    hf_architectures: tuple[str, ...] = (),
    arch_names: tuple[str, ...] = (),
    gguf_architectures: tuple[str, ...] = (),
) -> type[nn.Module]:
    """Registers `cls` under its HF architecture strings, `Architecture` enum / CLI names, and GGUF arch names.

    A key that is already registered for another class is a ValueError (two families cannot share one key).
    """
    tables = (
        (_BY_HF_ARCHITECTURE, hf_architectures, lambda k: k),
        (_BY_ARCH_NAME, arch_names, str.lower),
        (_BY_GGUF_ARCHITECTURE, gguf_architectures, str.lower),
    )
    for table, keys, normalize in tables:
        for key in keys:
            existing = table.get(normalize(key))
            if existing is not None and existing is not cls:
                raise ValueError(f"model key {key!r} is already registered for {existing.__name__}")
            table[normalize(key)] = cls
    for name in arch_names:
        _ARCH_NAME_SPELLING.setdefault(name.lower(), name)
    if hf_architectures:
        _HF_ARCHITECTURE_OF.setdefault(cls, hf_architectures[0])
    return cls


def supported_hf_architectures() -> list[str]:
    """HF `architectures` strings with a model class."""
    return sorted(_BY_HF_ARCHITECTURE)


def supported_arch_names() -> list[str]:
    """`Architecture` enum and CLI names with a model class, as registered."""
    return sorted(_ARCH_NAME_SPELLING.values())


def supported_gguf_architectures() -> list[str]:
    """GGUF `general.architecture` values with a model class."""
    return sorted(_BY_GGUF_ARCHITECTURE)


def model_class_for(hf_architectures: list[str] | None, arch_name: Any = None) -> type[nn.Module]:
    """The model class to build.

    Args:
        hf_architectures: `config.json["architectures"]`; must hold exactly one entry when `arch_name` is None.
        arch_name: `Architecture` enum name ("Mistral", "Llama", "Qwen2", ...) or CLI name ("mistral"), or an
            object with such a `.name`, when the user forced the architecture; it takes precedence.
    Raises ValueError naming the field and the supported values.
    """
    if arch_name is not None:
        name = arch_name if isinstance(arch_name, str) else getattr(arch_name, "name", str(arch_name))
        cls = _BY_ARCH_NAME.get(name.lower())
        if cls is None:
            raise ValueError(f"arch {name!r} is not supported; supported architectures: {supported_arch_names()}")
        return cls
    if not hf_architectures or len(hf_architectures) != 1:
        raise ValueError(
            f"config.json 'architectures' must hold exactly one entry, got {hf_architectures!r}; "
            f"supported: {supported_hf_architectures()}"
        )
    cls = _BY_HF_ARCHITECTURE.get(hf_architectures[0])
    if cls is None:
        raise ValueError(
            f"config.json architecture {hf_architectures[0]!r} is not supported; "
            f"supported: {supported_hf_architectures()}"
        )
    return cls


def model_class_for_gguf(gguf_architecture: str) -> type[nn.Module]:
    """The model class for a GGUF `general.architecture`; ValueError listing the supported ones."""
    cls = _BY_GGUF_ARCHITECTURE.get(gguf_architecture.lower())
    if cls is None:
        raise ValueError(f"Unsupported architecture: GGUF general.architecture {gguf_architecture!r}; "
                         f"supported: {supported_gguf_architectures()}")
    return cls


def hf_architecture_of(cls: type[nn.Module]) -> str:
    """The HF architecture string a registered class answers to (e.g. for building a config dict from GGUF)."""
    try:
        return _HF_ARCHITECTURE_OF[cls]
    except KeyError:
        raise ValueError(f"{cls.__name__} has no registered HF architecture") from None
