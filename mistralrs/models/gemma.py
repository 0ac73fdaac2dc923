"""The Gemma family: Gemma, Gemma 2 and Gemma 3 (text), over packed tokens and paged KV.

What the three share: embeddings scaled by sqrt(hidden_size) (rounded to the model dtype, as `transformers`
does), `(1 + w)` RMSNorms (`GemmaRMSNorm`), a GeGLU MLP (tanh gelu), a head_dim independent of the hidden size,
and a tied LM head by default. What each adds:

- Gemma 2: "sandwich" norms (a norm after attention and around the MLP), attention scale
  `query_pre_attn_scalar ** -0.5`, tanh soft-capping of attention scores and of the final logits, and sliding
  window layers alternating with global ones (layer 0 slides).
- Gemma 3: Gemma 2's layout with RMS-normalised queries and keys per head, no attention soft-capping, a
  sliding-window pattern (`layer_types`, or every `sliding_window_pattern`-th layer global), and two RoPE
  tables: `rope_local_base_freq` for sliding layers, `rope_theta` (+ `rope_scaling`) for global ones.

Checkpoint names are the Hugging Face ones; q/k/v and gate/up are fused on load through `STACKED_PARAMS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.models.base import CausalLM
from mistralrs.layers.attention import PagedAttention
from mistralrs.layers.decoder_layout import PreNormDecoderLayout
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.layers.norm import GemmaRMSNorm
from mistralrs.layers.rotary import RotaryEmbedding, apply_rotary, rope_type_of
from mistralrs.models.config import TextModelConfig, extra_key, read_family_extras
from mistralrs.models.llama import STACKED_PARAMS, LlamaMLP, attention_projections
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch


@dataclass(frozen=True)
class GemmaLayerOptions:
    """How one decoder layer of the family differs from plain Gemma."""

    sliding_window: int | None  # attention window in tokens; None: global attention
    scale: float  # softmax scale of the attention scores
    logit_softcap: float | None  # tanh cap on attention scores (Gemma 2); None: no cap
    qk_norm: bool  # RMS-normalise each query and key head before RoPE (Gemma 3)
    sandwich_norms: bool  # norms after attention and before/after the MLP (Gemma 2 and 3)
    local_rope: bool  # use the model's local (sliding-layer) RoPE table (Gemma 3 sliding layers)


@dataclass(frozen=True)
class GemmaExtras:
    """The family's config.json fields beyond `TextModelConfig` (defaults: transformers' Gemma 2/3 configs; the
    soft-caps' defaults differ by version and come from the class, `EXTRA_DEFAULTS`). Gemma reads only
    `use_bidirectional_attention`, Gemma 2 the activation, scalar and soft-caps, Gemma 3 the rest."""

    use_bidirectional_attention: bool | None = None  # must be false or absent for a causal LM
    hidden_activation: str = extra_key("gelu_pytorch_tanh", falsy_is_default=True)  # MLP activation (Gemma 2/3)
    query_pre_attn_scalar: float = 256  # attention scale is its inverse square root
    attn_logit_softcapping: float | None = None  # tanh cap on attention scores; None: no cap
    final_logit_softcapping: float | None = None  # tanh cap on the output logits; None: no cap
    # every n-th layer is global, the rest slide, when `layer_types` is not given (older spelling with a "_")
    sliding_window_pattern: int = extra_key(6, aliases=("_sliding_window_pattern",), falsy_is_default=True)
    rope_local_base_freq: float = extra_key(10000.0, falsy_is_default=True)  # RoPE base of the sliding layers
    # newer configs: RoPE per layer type, {"full_attention": {...}, "sliding_attention": {...}} (a flat dict, one
    # RoPE for all layers, is read by TextModelConfig and has no effect here)
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.use_bidirectional_attention:
            raise ValueError("config field 'use_bidirectional_attention' must be false or absent for a causal LM")
        pattern = int(self.sliding_window_pattern)
        if pattern <= 0:
            raise ValueError(f"config field 'sliding_window_pattern' must be a positive integer, got {pattern}")


@dataclass(frozen=True)
class RopeTable:
    """One RoPE table's parameters."""

    theta: float  # RoPE base
    scaling: dict[str, Any] | None  # HF rope_scaling dict, None for plain RoPE


class GemmaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional per-head q/k norms, RoPE, paged attention, output."""

    def __init__(self, config: TextModelConfig, layer_idx: int, options: GemmaLayerOptions, *, prefix: str,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        bias = config.attention_bias
        self.qkv_proj, self.o_proj, heads = attention_projections(config, qkv_bias=bias, o_bias=bias, o_name="o_proj",
                                                                  prefix=prefix, dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, config.head_dim
        self.q_norm = self.k_norm = None
        if options.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype, device=device)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx=layer_idx,
                                   scale=options.scale, sliding_window=options.sliding_window,
                                   logit_softcap=options.logit_softcap)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rotated = apply_rotary(torch.cat((q, k), dim=1), cos, sin)
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, fb))


class GemmaDecoderLayer(nn.Module):
    """Gemma: `h += attn(norm(h)); h += mlp(norm(h))`. With sandwich norms (Gemma 2/3):
    `h += post_attn_norm(attn(norm(h))); h += post_ff_norm(mlp(pre_ff_norm(h)))`.

    `decoder_layout` declares the modules, for the fused twin the model runner may attach in front of `forward`.
    """

    def __init__(self, config: TextModelConfig, layer_idx: int, options: GemmaLayerOptions, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.local_rope = options.local_rope

        def norm() -> GemmaRMSNorm:
            return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(config, layer_idx, options, prefix=f"{prefix}.self_attn", dtype=dtype,
                                        device=device)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if options.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(config, prefix=f"{prefix}.mlp", dtype=dtype, device=device)

    def decoder_layout(self) -> PreNormDecoderLayout | None:
        """The layer's modules in the pre-norm layout with Gemma's additions (mistralrs/layers/decoder_layout.py)."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, LlamaMLP):   # replaced, e.g. by an AnyMoE mixture: no fused twin
            return None
        feedforward_norms = None
        if self.pre_feedforward_layernorm is not None:
            feedforward_norms = (self.pre_feedforward_layernorm, self.post_feedforward_layernorm)
        return PreNormDecoderLayout(
            (self.input_layernorm, self.post_attention_layernorm),
            (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj), attn.attn, mlp.act_fn,
            feedforward_norms=feedforward_norms,
            qk_norms=None if attn.q_norm is None else (attn.q_norm, attn.k_norm), concat_qk=True)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden), cos, sin, fb)
        if self.pre_feedforward_layernorm is None:
            hidden = hidden + attn_out
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attn_out)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers, final norm and the RoPE table(s) (the `model.` checkpoint prefix)."""

    def __init__(self, config: TextModelConfig, layer_options: list[GemmaLayerOptions], rope_global: RopeTable,
                 rope_local: RopeTable | None, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        # sqrt(hidden) rounded to the model dtype first (bf16: sqrt(3072) = 55.5), as transformers does.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5, dtype=dtype, device=device),
                             persistent=False)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, options, dtype=dtype, device=device) for i, options in enumerate(layer_options)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

        def rotary(table: RopeTable) -> RotaryEmbedding:
            return RotaryEmbedding(config.rotary_dim, table.theta, table.scaling, config.max_position_embeddings,
                                   device=device)

        self.rotary_emb = rotary(rope_global)
        self.rotary_emb_local = None if rope_local is None else rotary(rope_local)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        tables = {False: self.rotary_emb.cos_sin(positions, hidden.dtype)}  # by layer.local_rope
        if self.rotary_emb_local is not None:
            tables[True] = self.rotary_emb_local.cos_sin(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, *tables[layer.local_rope], fb)
        return self.norm(hidden)


class GemmaForCausalLM(CausalLM):
    """Gemma decoder with LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32 (soft-capped where the config says so).
    Subclasses change the class-level switches and the classmethods below, nothing else.
    """

    STACKED_PARAMS = STACKED_PARAMS

    # transformers' defaults for this family where they differ from TextModelConfig's.
    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "gelu_pytorch_tanh", "head_dim": 256,
                                                 "tie_word_embeddings": True}
    SANDWICH_NORMS = False  # Gemma 2/3 layer layout
    QK_NORM = False  # Gemma 3 per-head q/k norms
    EXTRA_DEFAULTS: ClassVar[dict[str, Any]] = {}  # this version's GemmaExtras defaults where they differ

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        config = config.with_family_defaults(**self.FAMILY_DEFAULTS)
        self.extras = extras = read_family_extras(GemmaExtras, config, self.EXTRA_DEFAULTS)
        config = replace(config, hidden_act=self.activation_name(config, extras), mlp_bias=False)
        self.config = config
        self.dtype = dtype
        self.final_logit_softcap = self.final_logit_softcapping(extras)
        rope_global, rope_local = self.rope_tables(config, extras)
        options = [
            GemmaLayerOptions(sliding_window=window, scale=self.attention_scale(config, extras),
                              logit_softcap=self.attention_softcapping(extras), qk_norm=self.QK_NORM,
                              sandwich_norms=self.SANDWICH_NORMS,
                              local_rope=rope_local is not None and window is not None)
            for window in self.layer_sliding_windows(config, extras)
        ]
        self.model = GemmaModel(config, options, rope_global, rope_local, dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device)

    @classmethod
    def activation_name(cls, config: TextModelConfig, extras: GemmaExtras) -> str:
        """The MLP activation. Gemma reads `hidden_act`, whose legacy value "gelu" means the tanh form."""
        return "gelu_pytorch_tanh" if config.hidden_act == "gelu" else config.hidden_act

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig, extras: GemmaExtras) -> list[int | None]:
        """Sliding window of each layer (None: global attention). Gemma: none."""
        return [None] * config.num_hidden_layers

    @classmethod
    def attention_scale(cls, config: TextModelConfig, extras: GemmaExtras) -> float:
        """Softmax scale of the attention scores."""
        return config.head_dim**-0.5

    @classmethod
    def attention_softcapping(cls, extras: GemmaExtras) -> float | None:
        """tanh cap on the attention scores, None for none."""
        return None

    @classmethod
    def final_logit_softcapping(cls, extras: GemmaExtras) -> float | None:
        """tanh cap on the output logits, None for none."""
        return None

    @classmethod
    def rope_tables(cls, config: TextModelConfig, extras: GemmaExtras) -> tuple[RopeTable, RopeTable | None]:
        """(global RoPE table, local table for sliding layers or None when they share the global one)."""
        return RopeTable(config.rope_theta, config.rope_scaling), None


    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[rows, hidden_size]` -> `[rows, vocab_size]` float32, `cap * tanh(logits / cap)` when capped."""
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    """Gemma 2: sandwich norms, soft-capping, query_pre_attn_scalar, alternating sliding/global layers."""

    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {**GemmaForCausalLM.FAMILY_DEFAULTS, "sliding_window": 4096}
    SANDWICH_NORMS = True
    # transformers' Gemma2Config soft-caps
    EXTRA_DEFAULTS: ClassVar[dict[str, Any]] = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}

    @classmethod
    def activation_name(cls, config: TextModelConfig, extras: GemmaExtras) -> str:
        """Gemma 2 and 3 read `hidden_activation` (default: tanh gelu), not `hidden_act`."""
        return extras.hidden_activation

    @classmethod
    def layer_types(cls, config: TextModelConfig, extras: GemmaExtras) -> list[str]:
        """"sliding_attention" / "full_attention" per layer: `layer_types`, else even layers slide."""
        if config.layer_types is not None:
            return config.layer_types
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]

    @classmethod
    def layer_sliding_windows(cls, config: TextModelConfig, extras: GemmaExtras) -> list[int | None]:
        return [config.sliding_window if t == "sliding_attention" else None for t in cls.layer_types(config, extras)]

    @classmethod
    def attention_scale(cls, config: TextModelConfig, extras: GemmaExtras) -> float:
        return float(extras.query_pre_attn_scalar) ** -0.5

    @classmethod
    def attention_softcapping(cls, extras: GemmaExtras) -> float | None:
        return extras.attn_logit_softcapping

    @classmethod
    def final_logit_softcapping(cls, extras: GemmaExtras) -> float | None:
        return extras.final_logit_softcapping


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: q/k norms, a sliding-window pattern, local and global RoPE bases, no attention soft-cap
    (`transformers` ignores `attn_logit_softcapping` for Gemma 3; the final cap applies when set)."""

    FAMILY_DEFAULTS: ClassVar[dict[str, Any]] = {**Gemma2ForCausalLM.FAMILY_DEFAULTS, "rope_theta": 1_000_000.0}
    QK_NORM = True
    EXTRA_DEFAULTS: ClassVar[dict[str, Any]] = {}  # no soft-caps unless the config sets them

    @classmethod
    def layer_types(cls, config: TextModelConfig, extras: GemmaExtras) -> list[str]:
        """`layer_types`, else every `sliding_window_pattern`-th layer is global (the rest slide)."""
        if config.layer_types is not None:
            return config.layer_types
        pattern = int(extras.sliding_window_pattern)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config.num_hidden_layers)]

    @classmethod
    def attention_softcapping(cls, extras: GemmaExtras) -> float | None:
        return None

    @classmethod
    def rope_tables(cls, config: TextModelConfig, extras: GemmaExtras) -> tuple[RopeTable, RopeTable | None]:
        """Global: `rope_theta` + `rope_scaling`; local: `rope_local_base_freq`, plain. The nested
        `rope_parameters` form ({"full_attention": {...}, "sliding_attention": {...}}) overrides both."""
        global_table = RopeTable(config.rope_theta, config.rope_scaling)
        local_table = RopeTable(float(extras.rope_local_base_freq), None)
        nested = extras.rope_parameters
        if isinstance(nested, dict):
            global_table = _nested_rope_table(nested.get("full_attention"), global_table)
            local_table = _nested_rope_table(nested.get("sliding_attention"), local_table)
        return global_table, local_table


def _nested_rope_table(params: dict[str, Any] | None, fallback: RopeTable) -> RopeTable:
    """A RopeTable from one layer type's entry of a nested `rope_parameters` dict."""
    if not params:
        return fallback
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(params.get("rope_theta", fallback.theta))
    return RopeTable(theta, scaling if rope_type_of(scaling) != "default" else None)


register(GemmaForCausalLM, hf_architectures=("GemmaForCausalLM",), arch_names=("Gemma",),
         gguf_architectures=("gemma",))
register(Gemma2ForCausalLM, hf_architectures=("Gemma2ForCausalLM",), arch_names=("Gemma2",),
         gguf_architectures=("gemma2",))
# No `Architecture` enum name: the 0.5.0 text enum has no Gemma 3 (VisionArchitecture.Gemma3 is the vision model).
register(Gemma3ForCausalLM, hf_architectures=("Gemma3ForCausalLM",), gguf_architectures=("gemma3",))
