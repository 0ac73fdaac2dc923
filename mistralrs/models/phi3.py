"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`): the Llama decoder with three differences.

- The checkpoint already stores the fused `self_attn.qkv_proj` and `mlp.gate_up_proj` (q, k, v and gate, up
  rows in that order); they load directly into our fused layers, with no stacking table.
- LongRoPE (`rope_scaling` type "longrope", legacy "su"): short factors while a sequence is within
  `original_max_position_embeddings`, long factors beyond, chosen per sequence and step (see
  `mistralrs/layers/rotary.py`); partial rotary where configured (Phi-4-mini rotates 3/4 of each head).
- `sliding_window`, when set, applies to every layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import LlamaForCausalLM
from mistralrs.models.registry import register


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 decoder with LM head over packed tokens (interface of `LlamaForCausalLM`)."""

    STACKED_PARAMS = ()  # qkv_proj and gate_up_proj are fused in the checkpoint already

    # transformers' Phi3Config defaults where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-5}

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(config.with_family_defaults(**self.FAMILY_DEFAULTS), dtype=dtype, device=device)

    @classmethod
    def projection_biases(cls, config: TextModelConfig) -> tuple[bool, bool]:
        return False, False

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig) -> list[int | None]:
        """Phi-3: `sliding_window` (when set) on every layer."""
        return [config.sliding_window] * config.num_hidden_layers



register(Phi3ForCausalLM, hf_architectures=("Phi3ForCausalLM",), arch_names=("Phi3",),
         gguf_architectures=("phi3",))
