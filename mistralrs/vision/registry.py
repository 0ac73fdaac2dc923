"""Vision model registry: the `*ForConditionalGeneration` class and processor of each vision architecture.

Each family file under `mistralrs/vision/` calls `register_vision(...)` at import time; the lookups below import
every family file first (`_register_families`), so the registry is full whenever it is read, and nothing of the
vision models is imported before a lookup. Keys: the `VisionArchitecture` enum name
(lower-cased, as `api/enums.py` spells it) and the HF `architectures` string.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistralrs.vision.base import VisionCausalLM, VisionProcessor


@dataclass(frozen=True)
class VisionFamily:
    """One registered vision architecture."""

    arch_name: str  # the VisionArchitecture enum name, e.g. "LLaVA"
    model_cls: type[VisionCausalLM]  # built as model_cls(config_dict, dtype=..., device=...)
    processor_cls: type[VisionProcessor]  # built with processor_cls.from_checkpoint(files, config, max_edge)


_BY_ARCH_NAME: dict[str, VisionFamily] = {}  # lower-cased enum name -> family
_BY_HF_ARCHITECTURE: dict[str, VisionFamily] = {}  # "LlavaForConditionalGeneration" -> family


def register_vision(arch_name: str, hf_architectures: tuple[str, ...], model_cls: type[VisionCausalLM],
                    processor_cls: type[VisionProcessor]) -> VisionFamily:
    """Registers a vision architecture under its enum name and HF architecture strings; a key already taken by
    another family is a ValueError."""
    family = VisionFamily(arch_name, model_cls, processor_cls)
    for table, key in [(_BY_ARCH_NAME, arch_name.lower())] + [(_BY_HF_ARCHITECTURE, a) for a in hf_architectures]:
        existing = table.get(key)
        if existing is not None and existing != family:
            raise ValueError(f"vision key {key!r} is already registered for {existing.arch_name}")
        table[key] = family
    return family


def _register_families() -> None:
    """Imports every family file (each registers itself on its first import)."""
    from mistralrs.vision import (  # noqa: F401  (imported to register)
        gemma3, idefics2, idefics3, llava, llava_next, minicpmo, mistral3, mllama, phi3v, phi4mm, qwen2_5_vl,
        qwen2_vl,
    )


def supported_vision_archs() -> list[str]:
    """The registered VisionArchitecture names."""
    _register_families()
    return sorted(family.arch_name for family in set(_BY_ARCH_NAME.values()))


def vision_family_for(architectures: list[str] | None, arch_name: str | None) -> VisionFamily:
    """The family of a forced `arch_name` (a VisionArchitecture name), else of the config's `architectures`;
    ValueError naming what is supported when there is none."""
    _register_families()
    if arch_name is not None:
        family = _BY_ARCH_NAME.get(str(arch_name).lower())
        if family is None:
            raise ValueError(f"vision architecture {arch_name!r} is not supported; supported: "
                             f"{', '.join(supported_vision_archs())}")
        return family
    for name in architectures or ():
        if name in _BY_HF_ARCHITECTURE:
            return _BY_HF_ARCHITECTURE[name]
    raise ValueError(f"config.json architectures {architectures!r} name no supported vision model; supported: "
                     f"{', '.join(sorted(_BY_HF_ARCHITECTURE))}")
