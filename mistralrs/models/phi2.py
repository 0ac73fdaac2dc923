"""Phi-2 (`PhiForCausalLM`): parallel attention and MLP over packed tokens and paged KV.

One LayerNorm (with bias) feeds both branches: `h = h + attn(ln(h)) + mlp(ln(h))`. Every projection has a bias,
the LM head too; RoPE rotates only the first `partial_rotary_factor` of each head (0.4 on Phi-2; 0.5 is the
`transformers` default); the MLP is `fc2(gelu_new(fc1(x)))`. q/k/v are fused on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import aligned_range, column_shard, row_shard
from mistralrs.models.base import CausalLM, QKV_PARAMS
from mistralrs.models.llama import attention_projections
from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.attention import PagedAttention
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.layers.norm import LayerNorm
from mistralrs.layers.rotary import RotaryEmbedding, apply_rotary
from mistralrs.models.config import TextModelConfig, extra_key, read_family_extras
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch

# Checkpoint module name -> (our fused module, shard index).
STACKED_PARAMS = QKV_PARAMS


@dataclass(frozen=True)
class PhiExtras:
    """Phi-2's config.json fields beyond `TextModelConfig` (defaults: transformers' PhiConfig)."""

    layer_norm_eps: float = extra_key(1e-5, falsy_is_default=True)  # LayerNorm epsilon (null or 0: the default)
    qk_layernorm: bool | None = False  # per-head q/k LayerNorms: not supported, must be false (or null)

    def __post_init__(self) -> None:
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"config field 'layer_norm_eps' must be a positive number, got {eps!r}")
        if self.qk_layernorm:
            raise ValueError("config field 'qk_layernorm' must be false: Phi q/k LayerNorms are not supported")


class PhiAttention(nn.Module):
    """Self-attention with biased q/k/v (fused) and output (`dense`) projections and partial RoPE."""

    def __init__(self, config: TextModelConfig, layer_idx: int, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.qkv_proj, self.dense, heads = attention_projections(config, qkv_bias=True, o_bias=True, o_name="dense",
                                                                 prefix=prefix, dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, config.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx=layer_idx,
                                   scale=self.head_dim**-0.5)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin)  # first rotary_dim only
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        return self.dense(self.attn(q, k, v, fb))


class PhiMLP(nn.Module):
    """`fc2(act(fc1(x)))` with biases (tensor-parallel: fc1 column-, fc2 row-parallel)."""

    def __init__(self, config: TextModelConfig, *, prefix: str, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        group = current_group()
        rows = aligned_range(config.intermediate_size, group)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, device=device,
                          prefix=f"{prefix}.fc1", tp=column_shard(group, [rows]))
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True, dtype=dtype, device=device,
                          prefix=f"{prefix}.fc2", tp=row_shard(group, rows))
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """Parallel block: `h + attn(ln(h)) + mlp(ln(h))` with one shared LayerNorm."""

    def __init__(self, config: TextModelConfig, layer_idx: int, eps: float, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = PhiAttention(config, layer_idx, prefix=f"{prefix}.self_attn", dtype=dtype, device=device)
        self.mlp = PhiMLP(config, prefix=f"{prefix}.mlp", dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        return hidden + self.self_attn(normed, cos, sin, fb) + self.mlp(normed)


class PhiModel(nn.Module):
    """Embedding, decoder layers and final LayerNorm (the `model.` checkpoint prefix)."""

    def __init__(self, config: TextModelConfig, extras: PhiExtras, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        eps = float(extras.layer_norm_eps)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            PhiDecoderLayer(config, i, eps, dtype=dtype, device=device) for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = LayerNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)  # [num_tokens, 1, rotary_dim]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, fb)
        return self.final_layernorm(hidden)


class PhiForCausalLM(CausalLM):
    """Phi-2 decoder with a biased LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32.
    """

    STACKED_PARAMS = STACKED_PARAMS

    # transformers' PhiConfig defaults where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "gelu_new", "partial_rotary_factor": 0.5}

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        config = config.with_family_defaults(**self.FAMILY_DEFAULTS)
        self.config = config
        self.extras = read_family_extras(PhiExtras, config)
        self.dtype = dtype
        self.model = PhiModel(config, self.extras, dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device, bias=True)


register(PhiForCausalLM, hf_architectures=("PhiForCausalLM",), arch_names=("Phi2",),
         gguf_architectures=("phi2",))
