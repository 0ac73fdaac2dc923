"""Legacy GGML (GGJT v3) files written from a checkpoint, as llama.cpp's old convert.py wrote them."""

from __future__ import annotations

import struct

import numpy as np

from tests.loader.gguf_fixtures import llama_cpp_permute

N_MULT = 32  # llama.cpp's rule: ceil(2 * 4 * 64 / 3 / 32) * 32 = 192
GGJT_MAGIC = 0x67676A74
TYPE_IDS = {"F32": 0, "F16": 1, "Q8_0": 8}  # GGML type ids
# HF name (after "model.layers.N.") → GGML name (after "layers.N."), and the top-level names.
LAYER_NAMES = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
               "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
               "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}
TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def ggml_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{suffix}"
    parts = module.split(".")
    return f"layers.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{suffix}"


def encode(values: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if values.ndim == 1 or type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    return quantize(values, GGMLQuantizationType[type_name])


def write_ggjt(path, checkpoint: dict, config: dict, type_name: str = "F32", version: int = 3,
               magic: int = GGJT_MAGIC) -> str:
    """A GGJT file as llama.cpp's old convert.py wrote it: hparams, vocab with scores, then per tensor its header,
    name, padding to 32 bytes and data; q/k rows in llama.cpp's interleaved order."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = bytearray(struct.pack("<II", magic, version))
    hidden = config["hidden_size"]
    out += struct.pack("<7I", config["vocab_size"], hidden, N_MULT, heads, config["num_hidden_layers"],
                       hidden // heads, 1 if type_name == "F16" else 7)
    for token_id in range(config["vocab_size"]):
        token = f"<t{token_id}>".encode()
        out += struct.pack("<I", len(token)) + token + struct.pack("<f", -float(token_id))
    for name, tensor in checkpoint.items():
        values = tensor.float().numpy()
        if ".self_attn.q_proj." in name:
            values = llama_cpp_permute(values, heads)
        elif ".self_attn.k_proj." in name:
            values = llama_cpp_permute(values, kv_heads)
        data = encode(values, type_name)
        kind = "F32" if data.dtype == np.float32 else ("F16" if data.dtype == np.float16 else type_name)
        encoded_name = ggml_name(name).encode()
        out += struct.pack("<3I", values.ndim, len(encoded_name), TYPE_IDS[kind])
        out += struct.pack(f"<{values.ndim}I", *reversed(values.shape)) + encoded_name
        out += b"\0" * (-len(out) % 32)
        out += data.tobytes()
    with open(path, "wb") as f:
        f.write(out)
    return str(path)
