"""Write tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for tests (no network).

`write_tiny_gguf` takes a Hugging Face model (or state dict) and its config and writes llama.cpp's layout:
GGUF tensor names, `<arch>.*` metadata keys, the Q/K row permutation of llama models, 1-D tensors kept F32,
2-D tensors in the chosen GGML type, and a minimal gpt2 BPE tokenizer of the model's vocabulary size so
the engine can load the file on its own. The HF → GGUF mapping here is written independently of
`mistralrs.loader.gguf_loader` so that the round trip tests the loader's table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0 (unk), 1 (bos), 2 (eos)
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
MIN_VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256  # the specials and the 256 byte-level symbols

# HF module path (after "model.layers.N.") → llama.cpp tensor stem (after "blk.N.").
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a llama-family HF tensor name."""
    module, _, suffix = hf_name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{suffix}"
    parts = module.split(".")
    layer_part = ".".join(parts[3:])
    if parts[:2] != ["model", "layers"] or layer_part not in _LAYER_NAMES:
        raise ValueError(f"no GGUF name for {hf_name!r}")
    return f"blk.{parts[2]}.{_LAYER_NAMES[layer_part]}.{suffix}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K permutation: per head, rows [half0 | half1] become interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {}
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def gpt2_vocab(vocab_size: int, with_merges: bool = True) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of exactly `vocab_size` tokens: (tokens, token_types, merges).

    Ids 0-2 are the special tokens, then the 256 byte symbols, then one token per merge ("Ġt", "th", ...),
    then filler tokens when the merges run out.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level vocab; got {vocab_size}")
    tokens = list(SPECIAL_TOKENS) + _bytes_to_unicode()
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    pairs = [("Ġ", ch) for ch in letters] + [(a, b) for a in letters for b in letters]
    merges = []
    if with_merges:
        for left, right in pairs[: vocab_size - len(tokens)]:
            merges.append(f"{left} {right}")
            tokens.append(left + right)
    tokens += [f"<filler_{i}>" for i in range(vocab_size - len(tokens))]
    token_types = [3] * NUM_SPECIAL_TOKENS + [1] * (vocab_size - NUM_SPECIAL_TOKENS)  # 3 CONTROL, 1 NORMAL
    return tokens, token_types, merges


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def gguf_metadata(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """The `<arch>.*` and tokenizer metadata llama.cpp writes for this HF config."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    tokens, token_types, merges = gpt2_vocab(cfg["vocab_size"])
    meta: dict[str, Any] = {
        "general.name": f"tiny-{arch}",
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": hidden,
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": cfg.get("num_key_value_heads") or heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": _rope_theta(cfg),
        f"{arch}.vocab_size": cfg["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    if head_dim != hidden // heads:
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    sliding = cfg.get("sliding_window")
    if sliding and (arch != "qwen2" or cfg.get("use_sliding_window")):
        meta[f"{arch}.attention.sliding_window"] = sliding
    return meta


def _add_metadata(writer: Any, key: str, value: Any) -> None:
    """Write one key with the GGUF type llama.cpp uses for such a value."""
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and not value:
        return  # GGUF has no empty arrays: an empty list (e.g. no merges) leaves the key out
    elif isinstance(value, (list, tuple)):
        if isinstance(value[0], int):  # token types are INT32 in llama.cpp
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_array(key, list(value))
    else:
        raise ValueError(f"cannot write metadata {key!r} of type {type(value).__name__}")


def encode_tensor(values: np.ndarray, ggml_type: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for `GGUFWriter.add_tensor`; 1-D tensors stay F32 like llama.cpp's."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1 or ggml_type == "F32":
        return values, None
    if ggml_type == "F16":
        return values.astype(np.float16), None
    qtype = GGMLQuantizationType[ggml_type]
    if values.shape[-1] % GGML_QUANT_SIZES[qtype][0] != 0:
        return values, None
    return quantize(values, qtype), qtype


def _shard_paths(path: str, num_files: int) -> list[str]:
    if num_files == 1:
        return [path]
    stem = path.removesuffix(".gguf")
    return [f"{stem}-{i + 1:05d}-of-{num_files:05d}.gguf" for i in range(num_files)]


def write_tiny_gguf(hf_model_or_state_dict: Any, config: Any, path: str | os.PathLike, arch: str = "llama",
                    ggml_type: str = "F32", tokenizer: Mapping[str, Any] | None = None,
                    num_files: int = 1, extra_metadata: Mapping[str, Any] | None = None) -> list[str]:
    """Write a model as llama.cpp would; returns the written file paths (several with `num_files` > 1).

    `arch` is "llama" (Q/K rows permuted) or "qwen2"; `ggml_type` is "F32", "F16", "BF16" or a type that
    `gguf.quants.quantize` supports ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"). `tokenizer` and
    `extra_metadata` are metadata entries that replace or add to the generated ones (e.g.
    {"tokenizer.ggml.merges": []}). With several files, the first carries all metadata and every file the
    gguf-split keys, as llama.cpp's gguf-split writes them.
    """
    from gguf import GGUFWriter

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2'; got {arch!r}")
    cfg = _config_dict(config)
    state = hf_model_or_state_dict
    state = state.state_dict() if hasattr(state, "state_dict") else state
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    tensors = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            values = llama_cpp_permute(values, heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            values = llama_cpp_permute(values, kv_heads)
        tensors.append((gguf_tensor_name(hf_name), *encode_tensor(values, ggml_type)))
    metadata = {**gguf_metadata(cfg, arch), **(tokenizer or {}), **(extra_metadata or {})}
    paths = _shard_paths(os.fspath(path), num_files)
    per_file = -(-len(tensors) // num_files)
    for index, shard_path in enumerate(paths):
        writer = GGUFWriter(shard_path, arch)
        if index == 0:
            for key, value in metadata.items():
                _add_metadata(writer, key, value)
        if num_files > 1:
            writer.add_uint16("split.no", index)
            writer.add_uint16("split.count", num_files)
            writer.add_int32("split.tensors.count", len(tensors))
        for name, data, raw_dtype in tensors[index * per_file:(index + 1) * per_file]:
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return paths


# ----------------------------------------------------------------------------------------------------------
# Every GGUF architecture: a converter that follows llama.cpp's convert_hf_to_gguf.py, with the names taken from
# gguf-py's own tensor name map (`gguf.get_tensor_name_map`), not from the loader's tables.

# HF model_type → (llama.cpp architecture, norm shift added to every "norm.weight", Q/K permuted).
_CONVERTER_ARCHS = {"llama": ("llama", 0.0, True), "mixtral": ("llama", 0.0, True), "phi": ("phi2", 0.0, False),
                    "phi3": ("phi3", 0.0, False), "starcoder2": ("starcoder2", 0.0, False),
                    "gemma": ("gemma", 1.0, False), "gemma2": ("gemma2", 1.0, False),
                    "deepseek_v2": ("deepseek2", 0.0, False), "deepseek_v3": ("deepseek2", 0.0, False)}
_EXPERT_RE = r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$"


def _stack_experts(state: dict[str, np.ndarray], per_expert_names: bool) -> dict[str, np.ndarray]:
    """llama.cpp's merged experts: `<moe>.experts.{e}.{proj}.weight` → `<moe>.experts.{proj}.weight [E, out, in]`
    (or, with `per_expert_names`, the older GGUF names `blk.N.ffn_{gate,down,up}.E.weight`, marked by a '!')."""
    import re

    groups: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for name, values in state.items():
        match = re.match(_EXPERT_RE, name)
        if match is None:
            out[name] = values
        elif per_expert_names:
            stem = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[match.group(4)]
            out[f"!blk.{match.group(1)}.{stem}.{match.group(3)}.weight"] = values
        else:
            merged = f"model.layers.{match.group(1)}.{match.group(2)}.experts.{match.group(4)}.weight"
            groups.setdefault(merged, {})[int(match.group(3))] = values
    for merged, experts in groups.items():
        out[merged] = np.stack([experts[e] for e in range(len(experts))])
    return out


def _split_kv_b(state: dict[str, np.ndarray], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Newer converters: kv_b_proj → k_b_proj `[heads, kv_lora_rank, nope]` (transposed) and v_b_proj."""
    out = {}
    heads, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    for name, values in state.items():
        if not name.endswith("kv_b_proj.weight"):
            out[name] = values
            continue
        kv_b = values.reshape(heads, nope + v, values.shape[-1])
        out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
        out[name.replace("kv_b_proj", "v_b_proj")] = np.ascontiguousarray(kv_b[:, nope:])
    return out


def _fuse_phi2_qkv(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Phi-2 as converted from the original checkpoints: one `mixer.Wqkv` per block."""
    out = {}
    for name, values in state.items():
        if ".self_attn.q_proj." in name:
            layer, suffix = name.split(".")[2], name.rsplit(".", 1)[1]
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.h.{layer}.mixer.Wqkv.{suffix}"] = np.concatenate(parts)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = values
    return out


def _gguf_name(tensor_map: Any, name: str) -> str:
    if name.startswith("!"):
        return name[1:]
    name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"gguf-py has no name for {name!r}")
    return gguf_name


def converted_tensors(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any], fuse_qkv: bool = False,
                      per_expert_names: bool = False, split_kv_b: bool = True) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(llama.cpp architecture, [(GGUF name, float32 values)]) for an HF checkpoint (tensors as saved, per-expert
    names) and its config.json dict, as convert_hf_to_gguf.py writes them: tied LM heads dropped (Gemma's
    always), llama Q/K permuted, Gemma norms shifted by +1, experts merged, Phi-2 q/k/v fused if asked, DeepSeek
    kv_b split if asked."""
    import gguf

    cfg = _config_dict(config)
    arch, norm_shift, permute = _CONVERTER_ARCHS[cfg["model_type"]]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    state = {}
    for name, tensor in checkpoint.items():
        if name == "lm_head.weight" and (cfg.get("tie_word_embeddings") or arch in ("gemma", "gemma2")):
            continue
        values = tensor.detach().to(torch.float32).numpy()
        if permute and ".self_attn.q_proj." in name:
            values = llama_cpp_permute(values, heads)
        elif permute and ".self_attn.k_proj." in name:
            values = llama_cpp_permute(values, kv_heads)
        if norm_shift and name.endswith("norm.weight"):
            values = values + norm_shift
        state[name] = values
    state = _stack_experts(state, per_expert_names)
    if arch == "phi2" and fuse_qkv:
        state = _fuse_phi2_qkv(state)
    if arch == "deepseek2" and split_kv_b:
        state = _split_kv_b(state, cfg)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    return arch, [(_gguf_name(tensor_map, name), values) for name, values in state.items()]


def _rope_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", _rope_theta(cfg))
    return params


def _write_common_metadata(writer: Any, cfg: Mapping[str, Any], arch: str) -> None:
    """The keys convert_hf_to_gguf.py's TextModel writes for every architecture (adapted per family as it does)."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(4 * hidden if arch == "phi2" else cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(1 if arch == "deepseek2" else cfg.get("num_key_value_heads") or heads)
    if arch not in ("phi2", "gemma", "gemma2"):
        writer.add_rope_freq_base(_rope_params(cfg)["rope_theta"])
    if arch in ("phi2", "starcoder2"):
        writer.add_layer_norm_eps(cfg.get("layer_norm_eps") or cfg["norm_epsilon"])
    else:
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch in ("phi2", "phi3"):
        partial = _rope_params(cfg).get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
        writer.add_rope_dimension_count(int(partial * hidden) // heads)
    if arch in ("gemma", "gemma2"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        writer.add_sliding_window(cfg["sliding_window"])
    if cfg.get("num_local_experts"):
        writer.add_expert_count(cfg["num_local_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])


def _write_phi3_metadata(writer: Any, cfg: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Phi3MiniModel: original context, sliding window (0 = none) and the LongRoPE factor tensors."""
    import math

    params = _rope_params(cfg)
    original = params.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(cfg.get("sliding_window") or 0)
    if not params.get("long_factor"):
        return []
    scale = cfg["max_position_embeddings"] / original
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    return [("rope_factors_long.weight", np.asarray(params["long_factor"], np.float32)),
            ("rope_factors_short.weight", np.asarray(params["short_factor"], np.float32))]


def _write_deepseek2_metadata(writer: Any, cfg: Mapping[str, Any], split_kv_b: bool) -> None:
    """DeepseekV2Model: MLA sizes (the MQA view plus `_mla` keys in newer files), experts, routing, YaRN."""
    from gguf import ExpertGatingFuncType, RopeScalingType

    kv_lora, rope, nope, v = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    writer.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    writer.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(cfg["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    if split_kv_b:
        writer.add_key_length(kv_lora + rope)
        writer.add_value_length(kv_lora)
        writer.add_key_length_mla(nope + rope)
        writer.add_value_length_mla(v)
    else:
        writer.add_key_length(nope + rope)
        writer.add_value_length(v)
    writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    writer.add_expert_count(cfg["n_routed_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    writer.add_expert_shared_count(cfg["n_shared_experts"])
    writer.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_expert_group_count(cfg["n_group"])
    writer.add_expert_group_used_count(cfg["topk_group"])
    sigmoid = cfg["model_type"] == "deepseek_v3"
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
    writer.add_rope_dimension_count(rope)
    params = _rope_params(cfg)
    if params.get("rope_type", params.get("type")) == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(params["factor"])
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * params["mscale_all_dim"])


def write_converted_gguf(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: str | os.PathLike,
                         ggml_type: str = "F32", **options: bool) -> str:
    """Write an HF checkpoint as llama.cpp's converter would (see `converted_tensors` for `options`); routers
    (`ffn_gate_inp`) and 1-D tensors stay F32, as llama.cpp keeps them. Returns the path."""
    from gguf import GGUFWriter

    arch, tensors = converted_tensors(checkpoint, config, **options)
    cfg = _config_dict(config)
    writer = GGUFWriter(os.fspath(path), arch)
    _write_common_metadata(writer, cfg, arch)
    if arch == "phi3":
        tensors += _write_phi3_metadata(writer, cfg)
    if arch == "deepseek2":
        _write_deepseek2_metadata(writer, cfg, options.get("split_kv_b", True))
    for name, values in tensors:
        kept = "F32" if "ffn_gate_inp" in name else ggml_type
        data, raw_dtype = encode_tensor(values, kept)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)
