"""Phi-3.5-MoE (`PhiMoEForCausalLM`; `PhimoeForCausalLM` in `transformers`): the Mixtral decoder of
`models/mixtral.py` with four differences.

- Routing is sparsemixer at inference (`layers.moe.sparsemixer_routing`): top-2, each expert weighted by its
  softmax over the router logits within relative distance `2 * router_jitter_noise` of the current maximum.
- LayerNorm with bias (eps `rms_norm_eps`) in place of RMSNorm, for the layer norms and the final norm.
- Biases on q/k/v/o when `attention_bias`, on the LM head when `lm_head_bias`.
- LongRoPE: short or long factors per sequence and step, as Phi-3 (`layers/rotary.py`), with the cos/sin scale
  `short_mscale`/`long_mscale` (they must be equal, as in the released model; ValueError otherwise).
  `transformers`' Phimoe rotary always uses the short factors; see docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.layers.norm import LayerNorm
from mistralrs.layers.rotary import LONGROPE_TYPES
from mistralrs.models.config import TextModelConfig
from mistralrs.models.mixtral import MixtralExtras, MixtralForCausalLM
from mistralrs.models.registry import register


def _longrope_mscale(config: TextModelConfig) -> float | None:
    """The cos/sin scale Phi-3.5-MoE's LongRoPE configs give (None when not LongRoPE or not given)."""
    scaling = config.rope_scaling
    if config.rope_type not in LONGROPE_TYPES or scaling is None or "short_mscale" not in scaling:
        return None
    short, long = scaling["short_mscale"], scaling.get("long_mscale", scaling["short_mscale"])
    if short != long:
        raise ValueError(f"rope_scaling.long_mscale ({long}) must equal rope_scaling.short_mscale ({short}) for "
                         f"Phi-3.5-MoE; accepted values: equal numbers")
    return float(short)


@dataclass(frozen=True)
class PhiMoEExtras(MixtralExtras):
    """Phi-3.5-MoE's config.json fields beyond `TextModelConfig`: Mixtral's (same defaults) and these."""

    lm_head_bias: bool | None = False  # the LM head has a bias (null: none)
    router_jitter_noise: float = 0.01  # sparsemixer's jitter epsilon (transformers' PhimoeConfig default)

    def __post_init__(self) -> None:
        value = self.router_jitter_noise
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"config field 'router_jitter_noise' must be a number >= 0, got {value!r}")
        super().__post_init__()


class PhiMoEForCausalLM(MixtralForCausalLM):
    """Phi-3.5-MoE decoder with LM head over packed tokens (interface of `MixtralForCausalLM`)."""

    ROUTING: ClassVar[str] = "sparsemixer"
    EXTRAS: ClassVar[type[MixtralExtras]] = PhiMoEExtras
    # transformers' PhimoeConfig defaults where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                                 "max_position_embeddings": 4096 * 32}

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(config, dtype=dtype, device=device)
        mscale = _longrope_mscale(self.config)
        if mscale is not None:
            self.model.rotary_emb.attention_factor = mscale

    @classmethod
    def make_norm(cls, config: TextModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        return LayerNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    @classmethod
    def attention_has_bias(cls, config: TextModelConfig) -> bool:
        return config.attention_bias

    @classmethod
    def lm_head_has_bias(cls, extras: PhiMoEExtras) -> bool:
        return bool(extras.lm_head_bias)

    @classmethod
    def jitter_eps(cls, extras: PhiMoEExtras) -> float:
        return float(extras.router_jitter_noise)


register(PhiMoEForCausalLM, hf_architectures=("PhiMoEForCausalLM", "PhimoeForCausalLM"),
         arch_names=("Phi3_5MoE", "phi3.5moe"))
