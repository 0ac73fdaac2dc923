"""The declarative GGUF tables: one `GGUFArchitecture` per GGUF `general.architecture`.

Each entry says how llama.cpp's convert_hf_to_gguf.py laid one Hugging Face family out, so that
mistralrs.loader.gguf_loader can undo it:
- `tensor_names`: GGUF tensor stem → HF module path ("{bid}" is the block index, "{xid}" an expert index of
  the older per-expert names `blk.N.ffn_gate.E`). A key may also be a whole GGUF name (with its suffix) when
  the HF name does not end in the same suffix (DeepSeek-V3's `exp_probs_b.bias` → `e_score_correction_bias`).
- `tensor_splits`: GGUF tensors that stack several HF tensors along their first axis (llama.cpp's merged
  experts `ffn_*_exps` `[n_expert, out, in]`, Phi-2's fused `attn_qkv`); each part becomes its own HF name.
- `tensor_merges`: several GGUF tensors that together make one HF tensor (DeepSeek-V2's `attn_k_b` and
  `attn_v_b`, split out of `kv_b_proj` by newer converters).
- `tensor_transforms`: per HF name suffix, the row transform undoing a conversion step (llama's Q/K
  permutation; Gemma's norm weights stored as `w + 1`).
- `config_keys` / `config_defaults` / `config_tensors` / `config_rules`: the HF config from the metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------------
# Tensor transforms: each undoes one step of llama.cpp's convert_hf_to_gguf.py for one HF tensor. They move
# whole rows only, so they apply unchanged to the block rows of a quantized tensor.

def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (HF rotate-half layout → llama.cpp interleaved pairs).

    llama.cpp stores, inside each head of `head_dim` rows, HF row `i * head_dim/2 + j` (i ∈ {0, 1}) at row
    `j * 2 + i`. Here the rows are viewed as `[num_heads, head_dim/2, 2]` and the last two axes swapped back.
    Works for a weight `[num_heads * head_dim, in_features]` and a bias `[num_heads * head_dim]`.
    """
    num_rows = weight.shape[0]
    if num_rows % (2 * num_heads) != 0:
        raise ValueError(f"cannot undo the Q/K permutation: {num_rows} rows are not a multiple of "
                         f"2 * num_heads ({num_heads})")
    half_head_dim = num_rows // num_heads // 2
    rest = tuple(weight.shape[1:])
    return weight.reshape(num_heads, half_head_dim, 2, *rest).transpose(1, 2).reshape(num_rows, *rest)


def _unpermute_q(weight: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    return unpermute_rows(weight, config["num_attention_heads"])


def _unpermute_k(weight: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    return unpermute_rows(weight, config["num_key_value_heads"])


def _gemma_norm_unshift(weight: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Undo llama.cpp's Gemma norm shift: it stores `w + 1` so that its plain RMSNorm equals HF's `(1 + w)` one."""
    return weight - 1


# Transform name (used in the architecture tables) → function (tensor, HF config) → tensor.
TENSOR_TRANSFORMS: dict[str, Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]] = {
    "unpermute_q": _unpermute_q,
    "unpermute_k": _unpermute_k,
    "gemma_norm_unshift": _gemma_norm_unshift,
}


# ----------------------------------------------------------------------------------------------------------
# Splits and merges.

def _qkv_rows(config: Mapping[str, Any], num_rows: int) -> list[int]:
    """Rows of q, k and v in a fused qkv tensor."""
    head_dim = config["head_dim"]
    return [config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim,
            config["num_key_value_heads"] * head_dim]


# Split rule → function (HF config, rows of the GGUF tensor viewed as [rows, last dim]) → rows per part.
# "experts" is not listed: its parts are the equal slices of the first axis, one per expert.
SPLIT_ROWS: dict[str, Callable[[Mapping[str, Any], int], list[int]]] = {"qkv": _qkv_rows}


@dataclass(frozen=True)
class TensorSplit:
    """One GGUF tensor holding several HF tensors stacked along its first axis."""

    rule: str  # "experts" (one part per index of the first axis) or a SPLIT_ROWS key
    hf_stems: tuple[str, ...]  # HF module path of each part; with "experts" one path containing "{xid}"


def _mla_kv_b(parts: Sequence[torch.Tensor], config: Mapping[str, Any]) -> torch.Tensor:
    """DeepSeek `kv_b_proj [heads * (nope + v), kv_lora_rank]` from llama.cpp's `k_b [heads, kv_lora_rank, nope]`
    (stored transposed) and `v_b [heads, v, kv_lora_rank]`."""
    k_b, v_b = parts
    num_heads = config["num_attention_heads"]
    k_b = k_b.reshape(num_heads, config["kv_lora_rank"], config["qk_nope_head_dim"]).transpose(1, 2)
    v_b = v_b.reshape(num_heads, config["v_head_dim"], config["kv_lora_rank"])
    return torch.cat([k_b, v_b], dim=1).reshape(-1, config["kv_lora_rank"]).contiguous()


# Merge rule → function (dense parts in order, HF config) → the HF tensor.
MERGE_RULES: dict[str, Callable[[Sequence[torch.Tensor], Mapping[str, Any]], torch.Tensor]] = {"mla_kv_b": _mla_kv_b}


@dataclass(frozen=True)
class TensorMerge:
    """One part of an HF tensor that llama.cpp stores as several GGUF tensors."""

    rule: str  # MERGE_RULES key
    hf_stem: str  # HF module path of the merged tensor
    part: int  # this tensor's position among the rule's parts
    num_parts: int  # parts the rule needs


# ----------------------------------------------------------------------------------------------------------
# Config rules: each completes the HF config in place, after the metadata keys and tensors are read.
# Keys starting with "_" are scratch values from `config_keys` / `config_tensors` that a rule consumes.

def _sliding_window_flag(config: dict[str, Any]) -> None:
    """Qwen2-style configs switch the window on with `use_sliding_window` (all layers when set)."""
    config["use_sliding_window"] = config["sliding_window"] is not None
    config["max_window_layers"] = config["num_hidden_layers"]


def _gemma_attention_scalar(config: dict[str, Any], large_model_layers: int) -> None:
    """Gemma 2/3 `query_pre_attn_scalar`, which GGUF does not store: head_dim, except the 27B model, which
    uses hidden_size / num_attention_heads (llama.cpp's rule, keyed on the layer count; the HF configs agree)."""
    if config["num_hidden_layers"] == large_model_layers:
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        config["query_pre_attn_scalar"] = config["head_dim"]


def _llama_moe(config: dict[str, Any]) -> None:
    """A llama GGUF with `llama.expert_count` is a Mixtral-style MoE model."""
    if config.get("num_local_experts"):
        config["architectures"], config["model_type"] = ["MixtralForCausalLM"], "mixtral"
    else:
        config.pop("num_local_experts", None)
        config.pop("num_experts_per_tok", None)


def _phi3_rope(config: dict[str, Any]) -> None:
    """Phi-3 LongRoPE from the `rope_factors_long/short` tensors; a sliding window of 0 means none."""
    long_factor, short_factor = config.pop("_rope_long_factor", None), config.pop("_rope_short_factor", None)
    attention_factor = config.pop("_rope_attention_factor", None)
    if long_factor is not None and short_factor is not None:
        original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": long_factor, "short_factor": short_factor,
                                  "original_max_position_embeddings": int(original)}
        if attention_factor is not None:
            config["rope_scaling"]["attention_factor"] = float(attention_factor)
    if not config.get("sliding_window"):
        config["sliding_window"] = None


def _starcoder2_bias(config: dict[str, Any]) -> None:
    """Starcoder2's one `use_bias` flag, read from the presence of the projection biases."""
    config["use_bias"] = bool(config["attention_bias"])


def _deepseek2(config: dict[str, Any]) -> None:
    """DeepSeek-V2/V3 dimensions and routing from llama.cpp's MLA metadata.

    Newer files store the MQA view (`key_length = kv_lora_rank + rope`, `value_length = kv_lora_rank`) and the
    per-head sizes in `key_length_mla` / `value_length_mla`; older ones store the per-head sizes directly.
    `expert_gating_func` 2 (sigmoid) is V3's bias-corrected routing; 1 (softmax) or none is V2's.
    """
    mla_key_length, mla_value_length = config.pop("_key_length_mla", None), config.pop("_value_length_mla", None)
    key_length, value_length = config.pop("_key_length"), config.pop("_value_length")
    key_length, value_length = mla_key_length or key_length, mla_value_length or value_length
    config["qk_nope_head_dim"] = int(key_length) - int(config["qk_rope_head_dim"])
    config["v_head_dim"] = int(value_length)
    config["num_key_value_heads"] = config["num_attention_heads"]
    config["head_dim"] = int(key_length)
    config.pop("partial_rotary_factor", None)
    for key in ("q_lora_rank", "n_routed_experts", "num_experts_per_tok"):  # absent: no low-rank q, no experts
        config.setdefault(key, None)
    config["rope_interleave"] = True
    if config.pop("_expert_gating_func", None) == 2:
        config["architectures"], config["model_type"] = ["DeepseekV3ForCausalLM"], "deepseek_v3"
        config["topk_method"] = "noaux_tc"
        config.setdefault("n_group", 1)
        config.setdefault("topk_group", 1)
    else:
        config["topk_method"] = "group_limited_greedy" if (config.get("n_group") or 1) > 1 else "greedy"
    log_multiplier = config.pop("_yarn_log_multiplier", None)
    if config.get("rope_scaling") and log_multiplier:  # llama.cpp stores 0.1 * mscale_all_dim
        mscale = float(log_multiplier) / 0.1
        config["rope_scaling"] = {**config["rope_scaling"], "mscale": mscale, "mscale_all_dim": mscale}


# Config rule name (used in the architecture tables) → function that completes the HF config in place.
CONFIG_RULES: dict[str, Callable[[dict[str, Any]], None]] = {
    "sliding_window_flag": _sliding_window_flag,
    "gemma2_attention_scalar": lambda config: _gemma_attention_scalar(config, large_model_layers=46),
    "gemma3_attention_scalar": lambda config: _gemma_attention_scalar(config, large_model_layers=62),
    "llama_moe": _llama_moe,
    "phi3_rope": _phi3_rope,
    "starcoder2_bias": _starcoder2_bias,
    "deepseek2": _deepseek2,
}


# ----------------------------------------------------------------------------------------------------------
# The declarative tables.

@dataclass(frozen=True)
class GGUFArchitecture:
    """How one GGUF `general.architecture` maps onto a Hugging Face checkpoint (names, config, transforms)."""

    hf_architecture: str  # config["architectures"][0], e.g. "LlamaForCausalLM" (a config rule may change it)
    model_type: str  # config["model_type"], e.g. "llama"
    tensor_names: Mapping[str, str]  # GGUF tensor stem (or whole name) → HF module path (or whole name)
    tensor_transforms: Mapping[str, str]  # HF name suffix (e.g. "q_proj.weight") → TENSOR_TRANSFORMS key
    config_keys: Mapping[str, str]  # metadata key after "<arch>." → HF config key
    config_defaults: Mapping[str, Any]  # HF config entries used when the metadata has none
    tensor_splits: Mapping[str, TensorSplit] = field(default_factory=dict)  # GGUF stem → its parts
    tensor_merges: Mapping[str, TensorMerge] = field(default_factory=dict)  # GGUF stem → the HF tensor it is part of
    config_tensors: Mapping[str, str] = field(default_factory=dict)  # GGUF tensor → config key holding its values
    required_keys: tuple[str, ...] = ("embedding_length", "block_count", "feed_forward_length",
                                      "attention.head_count")  # "<arch>." keys that must be present
    config_rules: tuple[str, ...] = ()  # CONFIG_RULES keys applied last, in order


# llama.cpp's names for the llama-family decoder (llama, mistral, qwen2, ...); biases reuse the stems.
LLAMA_FAMILY_TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{bid}.attn_norm": "model.layers.{bid}.input_layernorm",
    "blk.{bid}.attn_q": "model.layers.{bid}.self_attn.q_proj",
    "blk.{bid}.attn_k": "model.layers.{bid}.self_attn.k_proj",
    "blk.{bid}.attn_v": "model.layers.{bid}.self_attn.v_proj",
    "blk.{bid}.attn_output": "model.layers.{bid}.self_attn.o_proj",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.ffn_gate": "model.layers.{bid}.mlp.gate_proj",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.up_proj",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.down_proj",
}

# Metadata (after "<arch>.") → HF config key, shared by the llama family.
LLAMA_FAMILY_CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
}

# Mixtral-style experts in a llama GGUF: merged `ffn_*_exps [n_expert, out, in]`, or the older per-expert names.
_MIXTRAL_EXPERTS = "model.layers.{bid}.block_sparse_moe.experts.{xid}"
LLAMA_TENSOR_NAMES: dict[str, str] = {
    **LLAMA_FAMILY_TENSOR_NAMES,
    "blk.{bid}.ffn_gate_inp": "model.layers.{bid}.block_sparse_moe.gate",
    "blk.{bid}.ffn_gate.{xid}": f"{_MIXTRAL_EXPERTS}.w1",
    "blk.{bid}.ffn_down.{xid}": f"{_MIXTRAL_EXPERTS}.w2",
    "blk.{bid}.ffn_up.{xid}": f"{_MIXTRAL_EXPERTS}.w3",
}
LLAMA_TENSOR_SPLITS = {"blk.{bid}.ffn_gate_exps": TensorSplit("experts", (f"{_MIXTRAL_EXPERTS}.w1",)),
                       "blk.{bid}.ffn_down_exps": TensorSplit("experts", (f"{_MIXTRAL_EXPERTS}.w2",)),
                       "blk.{bid}.ffn_up_exps": TensorSplit("experts", (f"{_MIXTRAL_EXPERTS}.w3",))}

# Gemma 2 sandwich norms; Gemma 3 adds per-head q/k norms.
GEMMA2_TENSOR_NAMES: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_TENSOR_NAMES.items() if key != "blk.{bid}.ffn_norm"},
    "blk.{bid}.post_attention_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.pre_feedforward_layernorm",
    "blk.{bid}.post_ffw_norm": "model.layers.{bid}.post_feedforward_layernorm",
}
GEMMA3_TENSOR_NAMES: dict[str, str] = {
    **GEMMA2_TENSOR_NAMES,
    "blk.{bid}.attn_q_norm": "model.layers.{bid}.self_attn.q_norm",
    "blk.{bid}.attn_k_norm": "model.layers.{bid}.self_attn.k_norm",
}

# Phi-2: one LayerNorm per block, `dense` output projection, fc1/fc2 MLP; q/k/v separate (HF's current
# checkpoints) or fused `attn_qkv` (files converted from the original `Wqkv` checkpoints).
PHI2_TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.final_layernorm",
    "output": "lm_head",
    "blk.{bid}.attn_norm": "model.layers.{bid}.input_layernorm",
    "blk.{bid}.attn_q": "model.layers.{bid}.self_attn.q_proj",
    "blk.{bid}.attn_k": "model.layers.{bid}.self_attn.k_proj",
    "blk.{bid}.attn_v": "model.layers.{bid}.self_attn.v_proj",
    "blk.{bid}.attn_output": "model.layers.{bid}.self_attn.dense",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.fc1",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.fc2",
}
_PHI2_QKV = TensorSplit("qkv", tuple(f"model.layers.{{bid}}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")))

# Phi-3: fused qkv and gate_up in the HF checkpoint already (`ffn_up` is the fused gate_up_proj).
PHI3_TENSOR_NAMES: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_TENSOR_NAMES.items()
       if key not in ("blk.{bid}.attn_q", "blk.{bid}.attn_k", "blk.{bid}.attn_v", "blk.{bid}.ffn_gate")},
    "blk.{bid}.attn_qkv": "model.layers.{bid}.self_attn.qkv_proj",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.gate_up_proj",
}

# Starcoder2: LayerNorms with biases, c_fc/c_proj MLP.
STARCODER2_TENSOR_NAMES: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_TENSOR_NAMES.items() if key != "blk.{bid}.ffn_gate"},
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.c_fc",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.c_proj",
}

# DeepSeek-V2/V3: MLA projections, dense MLP in the leading layers, routed + shared experts after.
_DEEPSEEK_EXPERTS = "model.layers.{bid}.mlp.experts.{xid}"
DEEPSEEK2_TENSOR_NAMES: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_TENSOR_NAMES.items()
       if key not in ("blk.{bid}.attn_k", "blk.{bid}.attn_v")},
    "blk.{bid}.attn_q_a": "model.layers.{bid}.self_attn.q_a_proj",
    "blk.{bid}.attn_q_a_norm": "model.layers.{bid}.self_attn.q_a_layernorm",
    "blk.{bid}.attn_q_b": "model.layers.{bid}.self_attn.q_b_proj",
    "blk.{bid}.attn_kv_a_mqa": "model.layers.{bid}.self_attn.kv_a_proj_with_mqa",
    "blk.{bid}.attn_kv_a_norm": "model.layers.{bid}.self_attn.kv_a_layernorm",
    "blk.{bid}.attn_kv_b": "model.layers.{bid}.self_attn.kv_b_proj",
    "blk.{bid}.ffn_gate_inp": "model.layers.{bid}.mlp.gate",
    "blk.{bid}.exp_probs_b.bias": "model.layers.{bid}.mlp.gate.e_score_correction_bias",
    "blk.{bid}.ffn_gate_shexp": "model.layers.{bid}.mlp.shared_experts.gate_proj",
    "blk.{bid}.ffn_up_shexp": "model.layers.{bid}.mlp.shared_experts.up_proj",
    "blk.{bid}.ffn_down_shexp": "model.layers.{bid}.mlp.shared_experts.down_proj",
}
DEEPSEEK2_TENSOR_SPLITS = {f"blk.{{bid}}.ffn_{gguf}_exps": TensorSplit("experts", (f"{_DEEPSEEK_EXPERTS}.{hf}_proj",))
                           for gguf, hf in (("gate", "gate"), ("up", "up"), ("down", "down"))}
_DEEPSEEK_KV_B = "model.layers.{bid}.self_attn.kv_b_proj"
DEEPSEEK2_TENSOR_MERGES = {"blk.{bid}.attn_k_b": TensorMerge("mla_kv_b", _DEEPSEEK_KV_B, 0, 2),
                           "blk.{bid}.attn_v_b": TensorMerge("mla_kv_b", _DEEPSEEK_KV_B, 1, 2)}
DEEPSEEK2_CONFIG_KEYS: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_CONFIG_KEYS.items()
       if key not in ("attention.key_length", "attention.head_count_kv", "attention.sliding_window")},
    "attention.key_length": "_key_length",
    "attention.value_length": "_value_length",
    "attention.key_length_mla": "_key_length_mla",
    "attention.value_length_mla": "_value_length_mla",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank",
    "rope.dimension_count": "qk_rope_head_dim",
    "rope.scaling.yarn_log_multiplier": "_yarn_log_multiplier",
    "leading_dense_block_count": "first_k_dense_replace",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_count": "n_routed_experts",
    "expert_shared_count": "n_shared_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_weights_scale": "routed_scaling_factor",
    "expert_weights_norm": "norm_topk_prob",
    "expert_gating_func": "_expert_gating_func",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
}

_LLAMA_QK = {"self_attn.q_proj.weight": "unpermute_q", "self_attn.q_proj.bias": "unpermute_q",
             "self_attn.k_proj.weight": "unpermute_k", "self_attn.k_proj.bias": "unpermute_k"}
_GEMMA_NORMS = {"norm.weight": "gemma_norm_unshift"}  # every Gemma norm weight carries llama.cpp's +1
_GEMMA_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-6, "max_position_embeddings": 8192}

GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    # Dense llama / Mistral, and Mixtral-style MoE when `llama.expert_count` > 0 (Q/K permuted in both).
    "llama": GGUFArchitecture(
        hf_architecture="LlamaForCausalLM",
        model_type="llama",
        tensor_names=LLAMA_TENSOR_NAMES,
        tensor_splits=LLAMA_TENSOR_SPLITS,
        tensor_transforms=_LLAMA_QK,
        config_keys={**LLAMA_FAMILY_CONFIG_KEYS, "expert_count": "num_local_experts",
                     "expert_used_count": "num_experts_per_tok"},
        config_defaults={"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 4096, "mlp_bias": False, "sliding_window": None},
        # Llama 3.x GGUFs carry the llama3 RoPE frequency factors as a tensor: inv_freq[i] /= factors[i].
        config_tensors={"rope_freqs.weight": "rope_freq_factors"},
        config_rules=("llama_moe",),
    ),
    "qwen2": GGUFArchitecture(
        hf_architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        tensor_names=LLAMA_FAMILY_TENSOR_NAMES,
        tensor_transforms={},
        config_keys=LLAMA_FAMILY_CONFIG_KEYS,
        config_defaults={"hidden_act": "silu", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                         "max_position_embeddings": 32768, "attention_bias": True, "sliding_window": None},
        config_rules=("sliding_window_flag",),
    ),
    # No Q/K permutation (llama.cpp permutes only llama-family Q/K) in any entry below.
    "phi2": GGUFArchitecture(
        hf_architecture="PhiForCausalLM",
        model_type="phi",
        tensor_names=PHI2_TENSOR_NAMES,
        tensor_splits={"blk.{bid}.attn_qkv": _PHI2_QKV},
        tensor_transforms={},
        config_keys={**{k: v for k, v in LLAMA_FAMILY_CONFIG_KEYS.items() if k != "attention.layer_norm_rms_epsilon"},
                     "attention.layer_norm_epsilon": "layer_norm_eps"},
        config_defaults={"hidden_act": "gelu_new", "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
                         "max_position_embeddings": 2048},
    ),
    "phi3": GGUFArchitecture(
        hf_architecture="Phi3ForCausalLM",
        model_type="phi3",
        tensor_names=PHI3_TENSOR_NAMES,
        tensor_transforms={},
        config_keys={**LLAMA_FAMILY_CONFIG_KEYS,
                     "rope.scaling.original_context_length": "original_max_position_embeddings",
                     "rope.scaling.attn_factor": "_rope_attention_factor"},
        config_defaults={"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 4096, "sliding_window": None},
        config_tensors={"rope_factors_long.weight": "_rope_long_factor",
                        "rope_factors_short.weight": "_rope_short_factor"},
        config_rules=("phi3_rope",),
    ),
    "starcoder2": GGUFArchitecture(
        hf_architecture="Starcoder2ForCausalLM",
        model_type="starcoder2",
        tensor_names=STARCODER2_TENSOR_NAMES,
        tensor_transforms={},
        config_keys={**{k: v for k, v in LLAMA_FAMILY_CONFIG_KEYS.items() if k != "attention.layer_norm_rms_epsilon"},
                     "attention.layer_norm_epsilon": "norm_epsilon"},
        config_defaults={"hidden_act": "gelu_pytorch_tanh", "rope_theta": 10000.0, "norm_epsilon": 1e-5,
                         "max_position_embeddings": 4096, "sliding_window": None},
        config_rules=("starcoder2_bias",),
    ),
    "gemma": GGUFArchitecture(
        hf_architecture="GemmaForCausalLM",
        model_type="gemma",
        tensor_names=LLAMA_FAMILY_TENSOR_NAMES,
        tensor_transforms=_GEMMA_NORMS,
        config_keys=LLAMA_FAMILY_CONFIG_KEYS,
        config_defaults=_GEMMA_DEFAULTS,
    ),
    # Gemma 2: attention and final soft-caps in the metadata; even layers slide (the model's default).
    "gemma2": GGUFArchitecture(
        hf_architecture="Gemma2ForCausalLM",
        model_type="gemma2",
        tensor_names=GEMMA2_TENSOR_NAMES,
        tensor_transforms=_GEMMA_NORMS,
        config_keys={**LLAMA_FAMILY_CONFIG_KEYS, "attn_logit_softcapping": "attn_logit_softcapping",
                     "final_logit_softcapping": "final_logit_softcapping"},
        config_defaults={**_GEMMA_DEFAULTS, "sliding_window": 4096},
        config_rules=("gemma2_attention_scalar",),
    ),
    # Not in the metadata: the local RoPE base and the layer pattern (every 6th layer global), both fixed
    # across Gemma 3 sizes; `rope.scaling.*` applies to global layers.
    "gemma3": GGUFArchitecture(
        hf_architecture="Gemma3ForCausalLM",
        model_type="gemma3_text",
        tensor_names=GEMMA3_TENSOR_NAMES,
        tensor_transforms=_GEMMA_NORMS,
        config_keys=LLAMA_FAMILY_CONFIG_KEYS,
        config_defaults={"hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1000000.0,
                         "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6,
                         "max_position_embeddings": 131072, "sliding_window": 4096,
                         "final_logit_softcapping": None},
        config_rules=("gemma3_attention_scalar",),
    ),
    # DeepSeek-V2 / V2-Lite / V3 (V3 by `expert_gating_func` = sigmoid). The routed experts are merged
    # `ffn_*_exps`; kv_b_proj is one `attn_kv_b` (older files) or `attn_k_b` + `attn_v_b` (newer ones).
    "deepseek2": GGUFArchitecture(
        hf_architecture="DeepseekV2ForCausalLM",
        model_type="deepseek_v2",
        tensor_names=DEEPSEEK2_TENSOR_NAMES,
        tensor_splits=DEEPSEEK2_TENSOR_SPLITS,
        tensor_merges=DEEPSEEK2_TENSOR_MERGES,
        tensor_transforms={},
        config_keys=DEEPSEEK2_CONFIG_KEYS,
        config_defaults={"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                         "max_position_embeddings": 4096, "first_k_dense_replace": 0, "moe_layer_freq": 1,
                         "n_shared_experts": None, "routed_scaling_factor": 1.0, "norm_topk_prob": False},
        required_keys=("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                       "attention.kv_lora_rank", "attention.key_length", "attention.value_length",
                       "rope.dimension_count"),
        config_rules=("deepseek2",),
    ),
}


def expert_split_rows(num_experts: int, num_rows: int) -> list[int]:
    """Rows per expert of a merged `[n_expert, out, in]` tensor viewed as `[n_expert * out, in]`."""
    if num_experts <= 0 or num_rows % num_experts:
        raise ValueError(f"cannot split {num_rows} rows into {num_experts} experts")
    return [num_rows // num_experts] * num_experts


def split_rows(split: TensorSplit, config: Mapping[str, Any], shape: Sequence[int]) -> list[int]:
    """Rows of each part of a split tensor of `shape` (PyTorch order), viewed as `[rows, last dim]`."""
    num_rows = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
    if split.rule == "experts":
        return expert_split_rows(shape[0], num_rows)
    rows = SPLIT_ROWS[split.rule](config, num_rows)
    if sum(rows) != num_rows:
        raise ValueError(f"a {split.rule} tensor of shape {tuple(shape)} does not have the {sum(rows)} rows "
                         f"the config implies ({rows})")
    return rows
