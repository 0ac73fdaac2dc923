"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention over a paged cache of compressed latents, and MoE.

- Attention (`mistralrs/layers/mla.py`): queries through `q_proj` (V2-Lite, `q_lora_rank` null) or the low-rank
  `q_a_proj -> q_a_layernorm -> q_b_proj`; `kv_a_proj_with_mqa` gives the latent (normalized by
  `kv_a_layernorm`, then cached) and one rotary key shared by all heads (decoupled RoPE). The cache holds
  `kv_lora_rank + qk_rope_head_dim` features per token (`kv_cache_spec`).
- RoPE: DeepSeek rotates interleaved pairs `(x0, x1), (x2, x3), ...` (V2 always; V3 when `rope_interleave`). We
  de-interleave the rotary part of q and k (`[x0, x2, ..; x1, x3, ..]`) and use the NeoX rotation; scores are
  unchanged because q and k are permuted alike. YaRN's `mscale_all_dim` multiplies the softmax scale by
  `yarn_mscale(factor, mscale_all_dim) ** 2`, as in `transformers`.
- MLP: dense for layers below `first_k_dense_replace` (and off the `moe_layer_freq` grid), else routed experts plus
  `n_shared_experts` shared ones. V2 routing: softmax scores, top-k ("greedy") or top-k within the `topk_group`
  groups with the best expert ("group_limited_greedy"), weights times `routed_scaling_factor`. V3 ("noaux_tc"):
  sigmoid scores; experts chosen by score + `e_score_correction_bias` within the `topk_group` groups whose two best
  biased scores sum highest; weights are the unbiased scores, normalized when `norm_topk_prob`, times the factor.
  The routed experts are a `FusedMoE` (grouped by expert, never looping over tokens; quantized through its method)
  fed by the model's own routers (`forward_routed`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import LinearShard, aligned_range, column_shard, head_shard, row_shard
from mistralrs.models.base import CausalLM, DecoderModel, GATE_UP_PARAMS
from mistralrs.layers.activation import act_and_mul, get_act_fn
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import (
    Linear,
    load_checkpoint_weights,
)
from mistralrs.layers.mla import MultiHeadLatentAttention
from mistralrs.layers.moe import FusedMoE, load_moe_weights
from mistralrs.layers.norm import RMSNorm
from mistralrs.layers.rotary import RotaryEmbedding, apply_rotary, rope_type_of
from mistralrs.models.config import TextModelConfig, extra_key, read_family_extras
from mistralrs.models.registry import register
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec

STACKED_PARAMS = GATE_UP_PARAMS
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
V3_TOPK_METHODS = ("noaux_tc",)


@dataclass(frozen=True)
class DeepseekDims:
    """The DeepSeek-specific fields of `config.json` (validated; defaults are the family's `transformers` ones)."""

    kv_lora_rank: int  # width of the cached latent
    q_lora_rank: int | None  # width of the low-rank query; None: one q_proj (V2-Lite)
    qk_nope_head_dim: int  # per-head query/key features without position
    qk_rope_head_dim: int  # per-head rotary features (the rotary key is shared by the heads)
    v_head_dim: int  # per-head value features
    n_routed_experts: int | None  # routed experts; None: every layer dense
    n_shared_experts: int | None  # always-on experts of a MoE layer (their MLP is this many experts wide)
    num_experts_per_tok: int | None  # experts each token is routed to
    moe_intermediate_size: int  # inner width of one expert
    first_k_dense_replace: int  # layers below this index are dense
    moe_layer_freq: int  # from first_k_dense_replace on, every moe_layer_freq-th layer is MoE
    topk_method: str  # routing: "greedy" / "group_limited_greedy" (V2), "noaux_tc" (V3)
    n_group: int | None  # expert groups for grouped routing
    topk_group: int | None  # groups a token may pick experts from
    norm_topk_prob: bool  # renormalize the chosen weights to sum to one
    routed_scaling_factor: float  # multiplies the routed experts' weights
    rope_interleave: bool  # rotary features come in interleaved pairs
    # V3's multi-token-prediction layers after the decoder (null: none); next-token inference drops their weights
    num_nextn_predict_layers: int = extra_key(0, falsy_is_default=True)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                     "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        mtp = self.num_nextn_predict_layers
        if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
            raise ValueError(f"config field 'num_nextn_predict_layers' must be an integer >= 0, got {mtp!r}")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has routed experts."""
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @classmethod
    def from_config(cls, config: TextModelConfig, defaults: dict[str, Any], topk_methods: tuple[str, ...]
                    ) -> DeepseekDims:
        """Reads the fields from `config.extra` (missing ones take `defaults`, a missing or null `topk_method` the
        first of `topk_methods`); ValueError naming a bad field."""
        dims = read_family_extras(cls, config, {**defaults, "topk_method": topk_methods[0]})
        if dims.topk_method is None:
            dims = replace(dims, topk_method=topk_methods[0])
        if dims.topk_method not in topk_methods:
            raise ValueError(f"config field 'topk_method' is {dims.topk_method!r}; accepted values: "
                             f"{list(topk_methods)}")
        dims._validate_groups()
        return dims

    def _validate_groups(self) -> None:
        if self.n_routed_experts is None or self.topk_method == "greedy":
            return
        if not self.n_group or not self.topk_group or self.n_routed_experts % self.n_group:
            raise ValueError(f"config fields 'n_group' ({self.n_group}) and 'topk_group' ({self.topk_group}) must be "
                             f"set, with n_group dividing n_routed_experts ({self.n_routed_experts}), for "
                             f"topk_method {self.topk_method!r}")


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: TextModelConfig, dims: DeepseekDims) -> float:
    """`qk_head_dim ** -0.5`, times `yarn_mscale(factor, mscale_all_dim) ** 2` for scaled rope with mscale_all_dim."""
    scale = dims.qk_head_dim**-0.5
    scaling = config.rope_scaling or {}
    if rope_type_of(scaling) != "default" and scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


class DeepseekMLP(nn.Module):
    """Gated MLP (dense layers and the shared experts), gate and up fused (tensor-parallel: the intermediate width
    split, gate/up column- and down row-parallel)."""

    def __init__(self, config: TextModelConfig, intermediate_size: int, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        group = current_group()
        rows = aligned_range(intermediate_size, group)
        self.gate_up_proj = Linear(config.hidden_size, [intermediate_size] * 2, bias=False, dtype=dtype,
                                   device=device, prefix=f"{prefix}.gate_up_proj", tp=column_shard(group, [rows, rows]))
        self.down_proj = Linear(intermediate_size, config.hidden_size, bias=False, dtype=dtype, device=device,
                                prefix=f"{prefix}.down_proj", tp=row_shard(group, rows))
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act_fn))


class DeepseekRouter(nn.Module):
    """Top-k expert choice (float32 math); `forward(x) -> (weights [tokens, k] float32, expert_ids [tokens, k])`."""

    def __init__(self, hidden_size: int, dims: DeepseekDims, *, scoring: str, device: torch.device | str):
        super().__init__()
        num_experts = dims.n_routed_experts
        self.dims = dims
        self.scoring = scoring  # "softmax" (V2) or "sigmoid" (V3)
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, device=device), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, device=device), requires_grad=False) if scoring == "sigmoid"
            else None)

    def _group_mask(self, scores: torch.Tensor, group_score: str) -> torch.Tensor:
        """`[tokens, experts]` True for experts in the `topk_group` best groups."""
        dims = self.dims
        grouped = scores.view(scores.shape[0], dims.n_group, -1)
        per_group = grouped.max(dim=-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_ids = per_group.topk(dims.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, group_ids, True)
        return mask.unsqueeze(-1).expand_as(grouped).reshape_as(scores)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self.dims
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # [tokens, experts]
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            if dims.topk_method == "group_limited_greedy":
                scores = scores.masked_fill(~self._group_mask(scores, "max"), 0.0)
            weights, expert_ids = scores.topk(dims.num_experts_per_tok, dim=-1, sorted=False)
            if dims.norm_topk_prob and dims.num_experts_per_tok > 1:  # DeepSeek-V2 original; no real V2 sets it
                return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), expert_ids
        else:
            scores = logits.sigmoid()
            biased = scores + self.e_score_correction_bias.float()
            biased = biased.masked_fill(~self._group_mask(biased, "top2"), float("-inf"))
            expert_ids = biased.topk(dims.num_experts_per_tok, dim=-1, sorted=False)[1]
            weights = scores.gather(1, expert_ids)
            if dims.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * dims.routed_scaling_factor, expert_ids


class DeepseekMoE(nn.Module):
    """Routed experts plus the shared experts (an MLP `n_shared_experts` experts wide)."""

    def __init__(self, config: TextModelConfig, dims: DeepseekDims, *, scoring: str, prefix: str,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.gate = DeepseekRouter(config.hidden_size, dims, scoring=scoring, device=device)
        self.experts = FusedMoE(dims.n_routed_experts, dims.num_experts_per_tok, config.hidden_size,
                                dims.moe_intermediate_size, hidden_act=config.hidden_act, routing="external",
                                checkpoint_names=("gate_proj", "up_proj", "down_proj"), dtype=dtype, device=device,
                                prefix=f"{prefix}.experts")
        self.shared_experts = None
        if dims.n_shared_experts:
            self.shared_experts = DeepseekMLP(config, dims.moe_intermediate_size * dims.n_shared_experts,
                                              prefix=f"{prefix}.shared_experts", dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.forward_routed(x, *self.gate(x))
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekAttention(nn.Module):
    """MLA projections around `MultiHeadLatentAttention` (see the module docstring). Tensor-parallel: the heads are
    split (q_proj / q_b_proj and kv_b_proj column-parallel by heads, o_proj row-parallel); the low-rank q_a_proj
    and kv_a_proj_with_mqa, and so the cached latent, stay whole on every rank."""

    def __init__(self, config: TextModelConfig, dims: DeepseekDims, layer_idx: int, *, prefix: str,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.dims = dims
        group = current_group()
        heads = head_shard(config.num_attention_heads, config.num_attention_heads, group)
        self.num_heads = heads.num_heads
        num_heads, hidden, bias = config.num_attention_heads, config.hidden_size, config.attention_bias
        kv_b_width = dims.qk_nope_head_dim + dims.v_head_dim

        def linear(name: str, n_in: int, n_out: int, has_bias: bool = False, tp: LinearShard | None = None) -> Linear:
            return Linear(n_in, n_out, bias=has_bias, dtype=dtype, device=device, prefix=f"{prefix}.{name}", tp=tp)

        def by_heads(width: int) -> tuple[int, int]:
            return heads.q_start * width, heads.num_heads * width

        q_size, q_tp = num_heads * dims.qk_head_dim, column_shard(group, [by_heads(dims.qk_head_dim)])
        if dims.q_lora_rank is None:
            self.q_proj = linear("q_proj", hidden, q_size, tp=q_tp)
        else:
            self.q_a_proj = linear("q_a_proj", hidden, dims.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, 1e-6, dtype=dtype, device=device)
            self.q_b_proj = linear("q_b_proj", dims.q_lora_rank, q_size, tp=q_tp)
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", hidden, dims.kv_lora_rank + dims.qk_rope_head_dim, bias)
        self.kv_a_layernorm = RMSNorm(dims.kv_lora_rank, 1e-6, dtype=dtype, device=device)
        self.kv_b_proj = linear("kv_b_proj", dims.kv_lora_rank, num_heads * kv_b_width,
                                tp=column_shard(group, [by_heads(kv_b_width)]))
        self.o_proj = linear("o_proj", num_heads * dims.v_head_dim, hidden, bias,
                             tp=row_shard(group, by_heads(dims.v_head_dim)))
        self.attn = MultiHeadLatentAttention(self.num_heads, dims.qk_nope_head_dim, dims.qk_rope_head_dim,
                                             dims.v_head_dim, dims.kv_lora_rank, layer_idx=layer_idx,
                                             scale=softmax_scale(config, dims))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.dims.rope_interleave:  # [x0, x1, x2, x3, ..] -> [x0, x2, ..; x1, x3, ..]
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return apply_rotary(x, cos, sin)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        dims, num_tokens = self.dims, hidden.shape[0]
        if dims.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(num_tokens, self.num_heads, dims.qk_head_dim).split(
            [dims.qk_nope_head_dim, dims.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([dims.kv_lora_rank, dims.qk_rope_head_dim], dim=-1)
        q_pe = self._rope(q_pe, cos, sin)
        k_pe = self._rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        out = self.attn(q_nope, q_pe, self.kv_a_layernorm(latent), k_pe, self.kv_b_proj, fb)
        return self.o_proj(out)


class DeepseekDecoderLayer(nn.Module):
    """Pre-norm block: `h += attn(norm(h)); h += mlp_or_moe(norm(h))`."""

    def __init__(self, config: TextModelConfig, dims: DeepseekDims, layer_idx: int, *, scoring: str,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = DeepseekAttention(config, dims, layer_idx, prefix=f"{prefix}.self_attn", dtype=dtype,
                                           device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        if dims.is_moe_layer(layer_idx):
            self.mlp = DeepseekMoE(config, dims, scoring=scoring, prefix=f"{prefix}.mlp", dtype=dtype, device=device)
        else:
            self.mlp = DeepseekMLP(config, config.intermediate_size, prefix=f"{prefix}.mlp", dtype=dtype,
                                   device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, fb)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekModel(DecoderModel):
    """Embedding, decoder layers and final norm (the `model.` prefix of the checkpoint)."""

    def __init__(self, config: TextModelConfig, dims: DeepseekDims, *, scoring: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, dims, i, scoring=scoring, dtype=dtype, device=device)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(dims.qk_rope_head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings, device=device)


class DeepseekV2ForCausalLM(CausalLM):
    """DeepSeek-V2 (and V2-Lite) with LM head over packed tokens.

    `forward(input_ids [num_tokens], positions [num_tokens], fb) -> hidden [num_tokens, hidden_size]`;
    `compute_logits(hidden[rows]) -> [rows, vocab_size]` float32.
    """

    STACKED_PARAMS = STACKED_PARAMS

    SCORING = "softmax"  # router score function
    TOPK_METHODS = V2_TOPK_METHODS  # accepted topk_method values (the first is the default)
    DEFAULTS: ClassVar[dict[str, Any]] = dict(  # transformers' DeepseekV2Config defaults for keys a config.json may omit
        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=None, moe_intermediate_size=1407,
        first_k_dense_replace=0, moe_layer_freq=1, n_group=None, topk_group=None, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_interleave=True)

    def __init__(self, config: TextModelConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.dims = self.read_dims(config)
        self.model = DeepseekModel(config, self.dims, scoring=self.SCORING, dtype=dtype, device=device)
        self.lm_head = self.tied_lm_head(config, dtype=dtype, device=device)

    @classmethod
    def read_dims(cls, config: TextModelConfig) -> DeepseekDims:
        """The DeepSeek fields of `config`; V2 always rotates interleaved pairs."""
        return replace(DeepseekDims.from_config(config, cls.DEFAULTS, cls.TOPK_METHODS), rope_interleave=True)


    def kv_cache_spec(self) -> KVCacheSpec:
        """One latent "head" of `kv_lora_rank + qk_rope_head_dim` per token and layer, no V cache."""
        return KVCacheSpec(self.config.num_hidden_layers, 1, self.dims.kv_lora_rank + self.dims.qk_rope_head_dim,
                           v_head_dim=0)

    def _not_in_checkpoint(self, name: str) -> bool:
        """Dropped names: rotary buffers, a tied LM head, and V3's multi-token-prediction layers (indices
        `num_hidden_layers` .. + `num_nextn_predict_layers`), which next-token inference does not run."""
        layer = _LAYER_INDEX.match(name)
        num_layers, num_mtp = self.config.num_hidden_layers, self.dims.num_nextn_predict_layers
        if layer is not None and num_layers <= int(layer.group(1)) < num_layers + num_mtp:
            return True
        return super()._not_in_checkpoint(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors (fusing gate/up; per-expert tensors into the `FusedMoE` experts); returns the
        names consumed."""
        return load_moe_weights(self, weights, lambda rest: load_checkpoint_weights(
            self, rest, STACKED_PARAMS, self._not_in_checkpoint))


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: V2 with sigmoid scores, bias-corrected grouped top-k ("noaux_tc") and optional
    non-interleaved rope (`rope_interleave: false`)."""

    SCORING = "sigmoid"
    TOPK_METHODS = V3_TOPK_METHODS
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        DeepseekV2ForCausalLM.DEFAULTS, q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128)

    @classmethod
    def read_dims(cls, config: TextModelConfig) -> DeepseekDims:
        return DeepseekDims.from_config(config, cls.DEFAULTS, cls.TOPK_METHODS)


register(DeepseekV2ForCausalLM, hf_architectures=("DeepseekV2ForCausalLM",), arch_names=("DeepseekV2",),
         gguf_architectures=("deepseek2",))
register(DeepseekV3ForCausalLM, hf_architectures=("DeepseekV3ForCausalLM",), arch_names=("DeepseekV3",))
