"""Starcoder2 (`Starcoder2ForCausalLM`) over packed tokens and paged KV.

A pre-norm decoder like Llama's but with LayerNorms that have a bias (`norm_epsilon`), biases on every
projection (`use_bias`, default true), a plain GELU MLP `c_proj(gelu_tanh(c_fc(x)))`, a sliding window on
every layer when `sliding_window` is set, and an LM head tied to the embedding by default. The attention is
`LlamaAttention` (q/k/v fused on load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import aligned_range, column_shard, row_shard
from mistralrs.models.base import CausalLM, DecoderModel, QKV_PARAMS
from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.layers.norm import LayerNorm
from mistralrs.layers.rotary import RotaryEmbedding
from mistralrs.models.config import TextModelConfig, extra_key, read_family_extras
from mistralrs.models.llama import LlamaAttention
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch

# Checkpoint module name -> (our fused module, shard index).
STACKED_PARAMS = QKV_PARAMS


@dataclass(frozen=True)
class Starcoder2Extras:
    """Starcoder2's config.json fields beyond `TextModelConfig` (defaults: transformers' Starcoder2Config)."""

    use_bias: bool | None = True  # biases on every projection (null: none)
    norm_epsilon: float = extra_key(1e-5, falsy_is_default=True)  # LayerNorm epsilon (null or 0: the default)

    def __post_init__(self) -> None:
        eps = self.norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"config field 'norm_epsilon' must be a positive number, got {eps!r}")


class Starcoder2MLP(nn.Module):
    """`c_proj(act(c_fc(x)))`, biases when `use_bias` (tensor-parallel: c_fc column-, c_proj row-parallel)."""

    def __init__(self, config: TextModelConfig, bias: bool, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        group = current_group()
        rows = aligned_range(config.intermediate_size, group)
        self.c_fc = Linear(config.hidden_size, config.intermediate_size, bias=bias, dtype=dtype, device=device,
                           prefix=f"{prefix}.c_fc", tp=column_shard(group, [rows]))
        self.c_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias, dtype=dtype, device=device,
                             prefix=f"{prefix}.c_proj", tp=row_shard(group, rows))
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act_fn(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    """Pre-norm block with LayerNorms: `h += attn(ln1(h)); h += mlp(ln2(h))`."""

    def __init__(self, config: TextModelConfig, layer_idx: int, *, bias: bool, eps: float, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                        sliding_window=config.sliding_window, prefix=f"{prefix}.self_attn",
                                        dtype=dtype, device=device)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = Starcoder2MLP(config, bias, prefix=f"{prefix}.mlp", dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, fb)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Starcoder2Model(DecoderModel):
    """Embedding, decoder layers and final LayerNorm (the `model.` checkpoint prefix)."""

    def __init__(self, config: TextModelConfig, extras: Starcoder2Extras, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        bias, eps = bool(extras.use_bias), float(extras.norm_epsilon)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Starcoder2DecoderLayer(config, i, bias=bias, eps=eps, dtype=dtype, device=device)
            for i in range(config.num_hidden_layers)
        )
        self.norm = LayerNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device=device)


class Starcoder2ForCausalLM(CausalLM):
    """Starcoder2 decoder with LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32.
    """

    STACKED_PARAMS = STACKED_PARAMS

    # transformers' Starcoder2Config defaults where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True}

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        config = config.with_family_defaults(**self.FAMILY_DEFAULTS)
        self.config = config
        self.extras = read_family_extras(Starcoder2Extras, config)
        self.dtype = dtype
        self.model = Starcoder2Model(config, self.extras, dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device)


register(Starcoder2ForCausalLM, hf_architectures=("Starcoder2ForCausalLM",), arch_names=("Starcoder2",),
         gguf_architectures=("starcoder2",))
