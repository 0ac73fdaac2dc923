"""A vision checkpoint (`*ForConditionalGeneration`) loaded as its text decoder alone, for `Which.Plain`.

The config becomes the decoder's (the family's `text_config_dict`), and the weights its `language_model.*` tensors
under the names a `models/` class reads (`model.*`, `lm_head.*`), in either checkpoint layout; the vision tower's and
projector's tensors are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mistralrs.vision.base import VisionCausalLM
from mistralrs.vision.registry import vision_family_for

TEXT_PREFIX = "language_model."


def vision_model_class(config: dict[str, Any]) -> type[VisionCausalLM] | None:
    """The registered vision class of a config.json with a `text_config`, else None (a text checkpoint)."""
    if not isinstance(config.get("text_config"), dict):
        return None
    try:
        return vision_family_for(config.get("architectures"), None).model_cls
    except ValueError:
        return None


def text_only_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config.json dict of a vision checkpoint; `config` itself for a text checkpoint."""
    model_cls = vision_model_class(config)
    return config if model_cls is None else model_cls.text_config_dict(config)


def text_only_weights(config: dict[str, Any], weights: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterable[tuple[str, torch.Tensor]]:
    """The decoder's `(name, tensor)` pairs of a vision checkpoint, renamed as the text model reads them;
    `weights` themselves for a text checkpoint."""
    model_cls = vision_model_class(config)
    if model_cls is None:
        return weights
    return _decoder_weights(model_cls, weights)


def _decoder_weights(model_cls: type[VisionCausalLM], weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        canonical = model_cls.canonical_weight_name(name)
        if canonical.startswith(TEXT_PREFIX):
            yield canonical[len(TEXT_PREFIX):], tensor
