"""Mixtral (`MixtralForCausalLM`): the Mistral decoder with a sparse mixture-of-experts block in place of the MLP.

Each layer's `block_sparse_moe` has a router (`gate`, a `Linear` hidden -> num_local_experts) and the experts
(`experts`, a `layers.moe.FusedMoE`): softmax over the router logits, top `num_experts_per_tok`, weights
renormalised over the selected experts. The decoder here is shared with Phi-3.5-MoE (`models/phimoe.py`), which
changes the norm, biases, routing and rope through the class attributes and hooks below.
Checkpoint names are the Hugging Face ones; per-expert `experts.{e}.w1/w3/w2.weight` go into the stacked
expert weights (`load_moe_weights`), q/k/v into the fused `qkv_proj`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.models.base import QKV_PARAMS, CausalLM, DecoderModel
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import (
    Linear,
    load_checkpoint_weights,
)
from mistralrs.layers.moe import FusedMoE, load_moe_weights
from mistralrs.layers.norm import RMSNorm
from mistralrs.layers.rotary import RotaryEmbedding
from mistralrs.models.config import TextModelConfig, read_family_extras
from mistralrs.models.llama import LlamaAttention
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch

STACKED_PARAMS = QKV_PARAMS


@dataclass(frozen=True)
class MixtralExtras:
    """Mixtral's config.json fields beyond `TextModelConfig` (defaults: transformers' MixtralConfig)."""

    num_local_experts: int = 8  # experts per MoE layer
    num_experts_per_tok: int = 2  # experts each token is routed to

    def __post_init__(self) -> None:
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")


class SparseMoeBlock(nn.Module):
    """Router (`gate`) then the experts: `[num_tokens, hidden] -> [num_tokens, hidden]`."""

    def __init__(self, config: TextModelConfig, extras: MixtralExtras, *, routing: str, jitter_eps: float,
                 prefix: str, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        num_experts, top_k = extras.num_local_experts, extras.num_experts_per_tok
        self.gate = Linear(config.hidden_size, num_experts, bias=False, dtype=dtype, device=device,
                           prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, top_k, config.hidden_size, config.intermediate_size,
                                hidden_act=config.hidden_act, routing=routing, checkpoint_names=("w1", "w3", "w2"),
                                jitter_eps=jitter_eps, dtype=dtype, device=device, prefix=f"{prefix}.experts")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))


class MoeDecoderLayer(nn.Module):
    """Pre-norm block: `h += attn(norm(h)); h += moe(norm(h))`."""

    def __init__(self, config: TextModelConfig, extras: MixtralExtras, layer_idx: int,
                 family: type[MixtralForCausalLM], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        bias = family.attention_has_bias(config)
        self.input_layernorm = family.make_norm(config, dtype, device)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                        sliding_window=config.sliding_window, prefix=f"{prefix}.self_attn",
                                        dtype=dtype, device=device)
        self.post_attention_layernorm = family.make_norm(config, dtype, device)
        self.block_sparse_moe = SparseMoeBlock(config, extras, routing=family.ROUTING,
                                               jitter_eps=family.jitter_eps(extras),
                                               prefix=f"{prefix}.block_sparse_moe", dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, fb)
        return hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))


class MoeModel(DecoderModel):
    """Embedding, MoE decoder layers and final norm (the `model.` prefix of the checkpoint)."""

    def __init__(self, config: TextModelConfig, extras: MixtralExtras, family: type[MixtralForCausalLM], *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(MoeDecoderLayer(config, extras, i, family, dtype=dtype, device=device)
                                    for i in range(config.num_hidden_layers))
        self.norm = family.make_norm(config, dtype, device)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device=device)


class MixtralForCausalLM(CausalLM):
    """Mixtral decoder with LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32.
    """

    STACKED_PARAMS = STACKED_PARAMS

    ROUTING: ClassVar[str] = "softmax_renorm"  # FusedMoE routing of the family
    EXTRAS: ClassVar[type[MixtralExtras]] = MixtralExtras  # the family's config.json fields beyond TextModelConfig
    # transformers' MixtralConfig defaults where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                                 "max_position_embeddings": 4096 * 32}

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        config = config.with_family_defaults(**self.FAMILY_DEFAULTS)
        self.config = config
        self.extras = read_family_extras(self.EXTRAS, config)
        self.dtype = dtype
        self.model = MoeModel(config, self.extras, type(self), dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device, bias=self.lm_head_has_bias(self.extras))

    @classmethod
    def make_norm(cls, config: TextModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """The family's norm layer."""
        return RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    @classmethod
    def attention_has_bias(cls, config: TextModelConfig) -> bool:
        """Whether q/k/v/o projections have biases."""
        return False

    @classmethod
    def lm_head_has_bias(cls, extras: MixtralExtras) -> bool:
        """Whether the LM head has a bias."""
        return False

    @classmethod
    def jitter_eps(cls, extras: MixtralExtras) -> float:
        """The routing's jitter epsilon (read by sparsemixer; unused by softmax routing)."""
        return 0.0


    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors (stacking the experts, fusing q/k/v); returns the names consumed."""
        return load_moe_weights(self, weights, lambda rest: load_checkpoint_weights(
            self, rest, STACKED_PARAMS, self._not_in_checkpoint))


register(MixtralForCausalLM, hf_architectures=("MixtralForCausalLM",), arch_names=("Mixtral",))
