"""The Llama family: Llama, Mistral (sliding window) and Qwen2 (q/k/v bias), over packed tokens and paged KV.

One decoder for the three; a subclass only says where biases sit and which layers use a sliding window.
Checkpoint names are the Hugging Face ones (`model.layers.N.self_attn.q_proj.weight`, ...); q/k/v and
gate/up are fused on load through `STACKED_PARAMS`.
"""

from __future__ import annotations


import torch
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import HeadShard, aligned_range, column_shard, head_shard, qkv_ranges, row_shard
from mistralrs.models.base import CausalLM, DecoderModel, GATE_UP_PARAMS, QKV_PARAMS
from mistralrs.layers.activation import act_and_mul, get_act_fn
from mistralrs.layers.attention import PagedAttention
from mistralrs.layers.decoder_layout import PreNormDecoderLayout
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.layers.norm import RMSNorm
from mistralrs.layers.rotary import RotaryEmbedding, apply_rotary
from mistralrs.models.config import TextModelConfig
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch

# Checkpoint module name -> (our fused module, shard index).
STACKED_PARAMS = QKV_PARAMS + GATE_UP_PARAMS


class LlamaMLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))` with gate and up fused into one projection (tensor-parallel: each
    rank a range of the intermediate width, gate/up column-parallel and down row-parallel)."""

    def __init__(self, config: TextModelConfig, *, prefix: str, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        inter, group = config.intermediate_size, current_group()
        rows = aligned_range(inter, group)
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], bias=config.mlp_bias, dtype=dtype,
                                   device=device, prefix=f"{prefix}.gate_up_proj", tp=column_shard(group, [rows, rows]))
        self.down_proj = Linear(inter, config.hidden_size, bias=config.mlp_bias, dtype=dtype, device=device,
                                prefix=f"{prefix}.down_proj", tp=row_shard(group, rows))
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act_fn))


def attention_projections(config: TextModelConfig, *, qkv_bias: bool, o_bias: bool, o_name: str, prefix: str,
                          dtype: torch.dtype, device: torch.device | str) -> tuple[Linear, Linear, HeadShard]:
    """The fused qkv projection and the output projection (named `o_name`) of a multi-head attention, and the
    heads they compute: all of them, or under a tensor-parallel group this rank's (qkv column-parallel by heads,
    the output row-parallel over the same heads)."""
    group, head_dim = current_group(), config.head_dim
    heads = head_shard(config.num_attention_heads, config.num_key_value_heads, group)
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias, dtype=dtype, device=device,
                      prefix=f"{prefix}.qkv_proj", tp=column_shard(group, qkv_ranges(heads, head_dim)))
    o_proj = Linear(q_size, config.hidden_size, bias=o_bias, dtype=dtype, device=device, prefix=f"{prefix}.{o_name}",
                    tp=row_shard(group, (heads.q_start * head_dim, heads.num_heads * head_dim)))
    return qkv_proj, o_proj, heads


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, RoPE on q and k together, paged attention, output projection."""

    def __init__(
        self,
        config: TextModelConfig,
        layer_idx: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        sliding_window: int | None,
        prefix: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__()
        self.qkv_proj, self.o_proj, heads = attention_projections(config, qkv_bias=qkv_bias, o_bias=o_bias,
                                                                  o_name="o_proj", prefix=prefix, dtype=dtype,
                                                                  device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, config.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx=layer_idx,
                                   scale=self.head_dim**-0.5, sliding_window=sliding_window)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        rotated = apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin)
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        return self.o_proj(self.attn(q, k, v, fb))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: `h += attn(norm(h)); h += mlp(norm(h))`.

    `decoder_layout` declares the modules, for the fused twin the model runner may attach in front of `forward`.
    """

    def __init__(self, config: TextModelConfig, layer_idx: int, *, qkv_bias: bool, o_bias: bool,
                 sliding_window: int | None, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias=qkv_bias, o_bias=o_bias,
                                        sliding_window=sliding_window, prefix=f"{prefix}.self_attn",
                                        dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, prefix=f"{prefix}.mlp", dtype=dtype, device=device)

    def decoder_layout(self) -> PreNormDecoderLayout | None:
        """The layer's modules in the pre-norm layout (mistralrs/layers/decoder_layout.py)."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, LlamaMLP):   # replaced, e.g. by an AnyMoE mixture: no fused twin
            return None
        return PreNormDecoderLayout((self.input_layernorm, self.post_attention_layernorm),
                                    (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj), attn.attn,
                                    mlp.act_fn)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, fb)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(DecoderModel):
    """Embedding, decoder layers and final norm (the `model.` prefix of the checkpoint)."""

    def __init__(self, config: TextModelConfig, layer_options: list[dict], *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, **options, dtype=dtype, device=device)
            for i, options in enumerate(layer_options)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device=device)


class LlamaForCausalLM(CausalLM):
    """Llama decoder with LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32.
    """

    STACKED_PARAMS = STACKED_PARAMS

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        self.dtype = dtype
        qkv_bias, o_bias = self.projection_biases(config)
        layer_options = [dict(qkv_bias=qkv_bias, o_bias=o_bias, sliding_window=window)
                         for window in self.layer_sliding_windows(config)]
        self.model = LlamaModel(config, layer_options, dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device)

    @classmethod
    def projection_biases(cls, config: TextModelConfig) -> tuple[bool, bool]:
        """(q/k/v projections have bias, o_proj has bias)."""
        return config.attention_bias, config.attention_bias

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig) -> list[int | None]:
        """Sliding window of each layer (None: full attention). Llama: windows only where layer_types say so."""
        if config.layer_types is None or config.sliding_window is None:
            return [None] * config.num_hidden_layers
        return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with a sliding window on every layer when `sliding_window` is set."""

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig) -> list[int | None]:
        if config.layer_types is not None:
            return super().layer_sliding_windows(config)
        return [config.sliding_window] * config.num_hidden_layers


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: biases on q/k/v (never on o_proj); sliding window only with `use_sliding_window`, from layer
    `max_window_layers` on (or as `layer_types` say)."""

    @classmethod
    def projection_biases(cls, config: TextModelConfig) -> tuple[bool, bool]:
        return True, False

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig) -> list[int | None]:
        if not config.use_sliding_window or config.sliding_window is None:
            return [None] * config.num_hidden_layers
        if config.layer_types is not None:
            return super().layer_sliding_windows(config)
        first_sliding = config.max_window_layers if config.max_window_layers is not None else 0
        return [config.sliding_window if i >= first_sliding else None for i in range(config.num_hidden_layers)]


register(LlamaForCausalLM, hf_architectures=("LlamaForCausalLM",), arch_names=("Llama",),
         gguf_architectures=("llama",))
register(MistralForCausalLM, hf_architectures=("MistralForCausalLM",), arch_names=("Mistral",))
register(Qwen2ForCausalLM, hf_architectures=("Qwen2ForCausalLM",), arch_names=("Qwen2",),
         gguf_architectures=("qwen2",))
