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
    stem = path[:-5] if path.endswith(".gguf") else path
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
