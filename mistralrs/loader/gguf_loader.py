"""GGUF files read into the engine's canonical form: a Hugging Face config dict plus `(hf_name, tensor)` pairs.

Checkpoint (Hugging Face) names are the truth. Each GGUF `general.architecture` has one declarative
`GGUFArchitecture` entry in `GGUF_ARCHITECTURES`: the tensor-name table (GGUF stem → HF module path), the
per-tensor transforms that undo llama.cpp's conversion (the Q/K row permutation of llama-family models), and
the metadata → config table. Adding an architecture means adding an entry, not a code path.

`GGUFModel.iter_weights` yields the tensors one at a time, in file order. With `keep_quantized`, 2-D tensors of
a GGML block type that mistralrs.quant handles (Q4_0, Q4_1, Q8_0) come as `GGMLTensor`s over the memory-mapped
file bytes, for the layers to pack; the others (F32/F16/BF16, other block types, and every 1-D tensor: norms,
biases) are dequantized with the `gguf` package. The Q/K un-permutation moves whole rows, so it applies to the
block rows of a quantized tensor as well. Once the consumer has taken a tensor, its file pages are dropped
from the resident set, so peak memory stays near the size of the finished model.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mistralrs.loader.gguf_metadata import GGUFTensorInfo, read_gguf_header
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES

logger = logging.getLogger(__name__)

# GGML tensor types this loader dequantizes: the reference's list (F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K)
# restricted to what `gguf.quants.dequantize` implements (Q8_1 and Q8_K are activation-only types).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


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


def _sliding_window_flag(config: dict[str, Any]) -> None:
    """Qwen2-style configs switch the window on with `use_sliding_window` (all layers when set)."""
    config["use_sliding_window"] = config["sliding_window"] is not None
    config["max_window_layers"] = config["num_hidden_layers"]


def _gemma3_attention_scalar(config: dict[str, Any]) -> None:
    """Gemma 3's `query_pre_attn_scalar`, which GGUF does not store: head_dim, except the 27B model (62 layers),
    which uses hidden_size / num_attention_heads (llama.cpp's rule; the HF configs agree)."""
    if config["num_hidden_layers"] == 62:
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        config["query_pre_attn_scalar"] = config["head_dim"]


# Config rule name (used in the architecture tables) → function that completes the HF config in place.
CONFIG_RULES: dict[str, Callable[[dict[str, Any]], None]] = {
    "sliding_window_flag": _sliding_window_flag,
    "gemma3_attention_scalar": _gemma3_attention_scalar,
}


# ----------------------------------------------------------------------------------------------------------
# The declarative tables.

@dataclass(frozen=True)
class GGUFArchitecture:
    """How one GGUF `general.architecture` maps onto a Hugging Face checkpoint (names, config, transforms)."""

    hf_architecture: str  # config["architectures"][0], e.g. "LlamaForCausalLM"
    model_type: str  # config["model_type"], e.g. "llama"
    tensor_names: Mapping[str, str]  # GGUF tensor stem → HF module path; "{bid}" is the block index
    tensor_transforms: Mapping[str, str]  # HF name suffix (e.g. "q_proj.weight") → TENSOR_TRANSFORMS key
    config_keys: Mapping[str, str]  # metadata key after "<arch>." → HF config key
    config_defaults: Mapping[str, Any]  # HF config entries used when the metadata has none
    config_tensors: Mapping[str, str] = field(default_factory=dict)  # GGUF tensor → config key holding its values
    unsupported_metadata: Mapping[str, str] = field(default_factory=dict)  # "<arch>." key → feature named when > 0
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

# llama.cpp's names for Gemma 3 (text): sandwich norms around attention and MLP, per-head q/k norms.
GEMMA3_TENSOR_NAMES: dict[str, str] = {
    **{key: value for key, value in LLAMA_FAMILY_TENSOR_NAMES.items() if key != "blk.{bid}.ffn_norm"},
    "blk.{bid}.attn_q_norm": "model.layers.{bid}.self_attn.q_norm",
    "blk.{bid}.attn_k_norm": "model.layers.{bid}.self_attn.k_norm",
    "blk.{bid}.post_attention_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.pre_feedforward_layernorm",
    "blk.{bid}.post_ffw_norm": "model.layers.{bid}.post_feedforward_layernorm",
}

GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(
        hf_architecture="LlamaForCausalLM",
        model_type="llama",
        tensor_names=LLAMA_FAMILY_TENSOR_NAMES,
        tensor_transforms={"self_attn.q_proj.weight": "unpermute_q", "self_attn.q_proj.bias": "unpermute_q",
                           "self_attn.k_proj.weight": "unpermute_k", "self_attn.k_proj.bias": "unpermute_k"},
        config_keys=LLAMA_FAMILY_CONFIG_KEYS,
        config_defaults={"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 4096, "mlp_bias": False, "sliding_window": None},
        # Llama 3.x GGUFs carry the llama3 RoPE frequency factors as a tensor: inv_freq[i] /= factors[i].
        config_tensors={"rope_freqs.weight": "rope_freq_factors"},
        unsupported_metadata={"expert_count": "mixture-of-experts llama GGUF (Mixtral-style)"},
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
    # No Q/K permutation (llama.cpp permutes only llama-family Q/K); every norm weight (all HF names end in
    # "norm.weight") carries llama.cpp's +1. Not in the metadata: the local RoPE base and the layer pattern
    # (every 6th layer global), both fixed across Gemma 3 sizes; `rope.scaling.*` applies to global layers.
    "gemma3": GGUFArchitecture(
        hf_architecture="Gemma3ForCausalLM",
        model_type="gemma3_text",
        tensor_names=GEMMA3_TENSOR_NAMES,
        tensor_transforms={"norm.weight": "gemma_norm_unshift"},
        config_keys=LLAMA_FAMILY_CONFIG_KEYS,
        config_defaults={"hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1000000.0,
                         "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6,
                         "max_position_embeddings": 131072, "sliding_window": 4096,
                         "final_logit_softcapping": None},
        config_rules=("gemma3_attention_scalar",),
    ),
}

# Optional tokenizer metadata → HF config key.
TOKEN_ID_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
                 "tokenizer.ggml.padding_token_id": "pad_token_id"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def map_tensor_name(arch: GGUFArchitecture, gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name (e.g. "blk.3.attn_q.weight" → "model.layers.3.self_attn.q_proj.weight"),
    or None when the architecture's table has no entry for it."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot:
        return None
    match = _BLOCK_RE.match(stem)
    key, block_index = (f"blk.{{bid}}.{match.group(2)}", match.group(1)) if match else (stem, None)
    hf_stem = arch.tensor_names.get(key)
    if hf_stem is None:
        return None
    return f"{hf_stem.format(bid=block_index)}.{suffix}"


# ----------------------------------------------------------------------------------------------------------
# Reading files: the header through gguf_metadata.read_gguf_header; tensor data stays memory-mapped until
# `iter_weights` reaches it.

def ggml_type_name(info: GGUFTensorInfo) -> str:
    """The GGML type name of a tensor, e.g. "Q4_1"."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(info.ggml_type).name


def read_gguf_file(path: str) -> tuple[dict[str, Any], list[GGUFTensorInfo], np.ndarray]:
    """One GGUF file: (metadata as plain Python values, tensor infos, uint8 array over a copy-on-write map of
    the file: views of it are writable arrays and tensors, and nothing is ever written back to the file).

    ValueError names the file when it is missing, not GGUF, or truncated (header or tensor data).
    """
    from gguf import GGML_QUANT_SIZES

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    header = read_gguf_header(path)
    with open(path, "rb") as f:
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
    for info in header.tensors:
        if info.offset + info.nbytes > len(data):
            raise ValueError(f"GGUF file {path!r} is truncated: tensor {info.name!r} needs bytes up to "
                             f"{info.offset + info.nbytes}, the file has {len(data)}")
        block_size = GGML_QUANT_SIZES[info.ggml_type][0]
        if info.shape and info.shape[-1] % block_size != 0:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r}: row length {info.shape[-1]} is not a "
                             f"multiple of the {ggml_type_name(info)} block size {block_size}")
    return header.metadata, header.tensors, data


@dataclass(frozen=True)
class _TensorEntry:
    """One GGUF tensor and where it goes."""

    hf_name: str  # Hugging Face checkpoint name
    path: str  # file holding it
    info: GGUFTensorInfo  # where its bytes are and how they are encoded
    data: np.ndarray  # uint8 array over the memory-mapped file (np.frombuffer of an mmap)
    transform: str | None  # TENSOR_TRANSFORMS key or None


def _dequantize(info: GGUFTensorInfo, data: np.ndarray) -> np.ndarray:
    """One tensor as a float32 array in PyTorch shape order (a fresh array, or a view of the file map for F32)."""
    from gguf.quants import dequantize

    raw = data[info.offset:info.offset + info.nbytes]
    row_bytes = info.nbytes // max(1, int(np.prod(info.shape[:-1], dtype=np.int64)))
    values = dequantize(raw.reshape(-1, row_bytes), info.ggml_type)
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


def _block_tensor(info: GGUFTensorInfo, data: np.ndarray) -> GGMLTensor:
    """One block-quantized tensor as a `GGMLTensor` over the file bytes (no copy)."""
    raw = torch.from_numpy(data[info.offset:info.offset + info.nbytes])
    return GGMLTensor(raw.reshape(math.prod(info.shape[:-1]), -1), ggml_type_name(info), tuple(info.shape))


def _release_pages(data: np.ndarray, offset: int, nbytes: int) -> None:
    """Drops the pages of file bytes `[offset, offset + nbytes)` from the resident set (they are read from the
    file again if a kept view touches them later). Pages are never written, so nothing is lost."""
    mapping = data.base.obj if isinstance(data.base, memoryview) else data.base  # np.frombuffer(mmap) -> memoryview
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(len(mapping), -(-(offset + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _architecture(metadata: Mapping[str, Any], paths: list[str]) -> tuple[str, GGUFArchitecture]:
    """The lowercased `general.architecture` and its table entry; ValueError listing the supported ones."""
    name = metadata.get("general.architecture")
    if not isinstance(name, str):
        raise ValueError(f"GGUF file(s) {paths} have no general.architecture; supported architectures: "
                         f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    arch = GGUF_ARCHITECTURES.get(name.lower())
    if arch is None:
        raise ValueError(f"Unsupported architecture: general.architecture={name!r} in {paths}; supported "
                         f"architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return name.lower(), arch


def _read_files(paths: list[str]) -> tuple[dict[str, Any], list[tuple[str, GGUFTensorInfo, np.ndarray]]]:
    """Merged metadata (the first file's value wins) and every tensor as (path, info, file map)."""
    metadata: dict[str, Any] = {}
    tensors = []
    seen: dict[str, str] = {}
    for path in paths:
        file_metadata, infos, data = read_gguf_file(path)
        for key, value in file_metadata.items():
            metadata.setdefault(key, value)
        for info in infos:
            if info.name in seen:
                raise ValueError(f"GGUF tensor {info.name!r} appears in both {seen[info.name]!r} and {path!r}")
            seen[info.name] = path
            tensors.append((path, info, data))
    return metadata, tensors


def _collect_tensors(arch_name: str, arch: GGUFArchitecture, tensors: list[tuple[str, GGUFTensorInfo, np.ndarray]]
                     ) -> tuple[list[_TensorEntry], dict[str, np.ndarray]]:
    """Map every tensor to its HF name; also returns the values of the tensors that feed the config."""
    entries: list[_TensorEntry] = []
    config_values: dict[str, np.ndarray] = {}
    for path, info, data in tensors:
        if ggml_type_name(info) not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r} has unsupported type {ggml_type_name(info)}; "
                             f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        if info.name in arch.config_tensors:
            config_values[info.name] = _dequantize(info, data)
            continue
        hf_name = map_tensor_name(arch, info.name)
        if hf_name is None:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r} has no mapping for architecture {arch_name!r}")
        transform = next((name for suffix, name in arch.tensor_transforms.items() if hf_name.endswith(suffix)), None)
        entries.append(_TensorEntry(hf_name, path, info, data, transform))
    return entries, config_values


# ----------------------------------------------------------------------------------------------------------
# Config.

def _rope_scaling(prefix: str, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """HF `rope_scaling` from `<arch>.rope.scaling.*` (and the older `<arch>.rope.scale_linear`)."""
    kind = metadata.get(prefix + "rope.scaling.type")
    factor = metadata.get(prefix + "rope.scaling.factor")
    if kind is None and metadata.get(prefix + "rope.scale_linear") is not None:
        kind, factor = "linear", metadata[prefix + "rope.scale_linear"]
    if kind is None or kind == "none":
        return None
    if kind in ("linear", "yarn") and not factor:
        raise ValueError(f"GGUF metadata {prefix}rope.scaling.type={kind!r} needs {prefix}rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        original = metadata.get(prefix + "rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key, hf_key in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if metadata.get(prefix + key) is not None:
                scaling[hf_key] = float(metadata[prefix + key])
        return scaling
    raise ValueError(f"GGUF metadata {prefix}rope.scaling.type={kind!r} is not supported; supported: "
                     f"'none', 'linear', 'yarn'")


def _check_metadata(arch_name: str, arch: GGUFArchitecture, metadata: Mapping[str, Any], paths: list[str]) -> None:
    """Fail on missing required keys and on features this loader does not support yet."""
    prefix = arch_name + "."
    for key in arch.required_keys:
        if prefix + key not in metadata:
            raise ValueError(f"GGUF metadata key {prefix + key!r} is missing in {paths}")
    for key, feature in arch.unsupported_metadata.items():
        value = metadata.get(prefix + key) or 0
        if value > 0:
            raise ValueError(f"{feature} is not supported yet: {prefix + key}={value} in {paths}")


def build_config(arch_name: str, arch: GGUFArchitecture, metadata: Mapping[str, Any],
                 tensor_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """A Hugging Face style config.json dict from GGUF metadata and the (HF-named) tensor shapes."""
    prefix = arch_name + "."
    config: dict[str, Any] = {"architectures": [arch.hf_architecture], "model_type": arch.model_type,
                              **arch.config_defaults}
    for key, hf_key in arch.config_keys.items():
        if metadata.get(prefix + key) is not None:
            config[hf_key] = metadata[prefix + key]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    rope_dim = metadata.get(prefix + "rope.dimension_count")
    if rope_dim is not None and rope_dim != config["head_dim"]:
        config["partial_rotary_factor"] = rope_dim / config["head_dim"]
    embed_shape = tensor_shapes.get("model.embed_tokens.weight")
    if embed_shape is not None:
        config["vocab_size"] = embed_shape[0]
    else:
        config["vocab_size"] = metadata.get(prefix + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    config["tie_word_embeddings"] = "lm_head.weight" not in tensor_shapes
    config.setdefault("attention_bias", "model.layers.0.self_attn.q_proj.bias" in tensor_shapes)
    config["rope_scaling"] = _rope_scaling(prefix, metadata)
    for key, hf_key in TOKEN_ID_KEYS.items():
        if metadata.get(key) is not None:
            config[hf_key] = int(metadata[key])
    for rule in arch.config_rules:
        CONFIG_RULES[rule](config)
    return config


# ----------------------------------------------------------------------------------------------------------
# The public entry points.

@dataclass
class GGUFModel:
    """One GGUF model (one or several files) in the engine's canonical form: HF config and HF-named weights."""

    config: dict[str, Any]  # Hugging Face style config.json dict
    metadata: dict[str, Any]  # every GGUF metadata key → plain Python value (for the tokenizer builder)
    tensor_types: dict[str, str]  # HF tensor name → GGML type name, e.g. "Q4_1"
    paths: list[str]  # the GGUF files, in the order given
    _entries: list[_TensorEntry] = field(repr=False, default_factory=list)  # tensors in file order

    def iter_weights(self, dtype: torch.dtype, keep_quantized: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        """Yield `(hf_name, tensor)` for every weight, one at a time, dequantized to `dtype`; with `keep_quantized`,
        2-D tensors of a type in mistralrs.quant's `BLOCK_TYPES` come as `GGMLTensor`s over the file bytes."""
        for entry in self._entries:
            weight: torch.Tensor | GGMLTensor
            if keep_quantized and len(entry.info.shape) >= 2 and ggml_type_name(entry.info) in BLOCK_TYPES:
                weight = _block_tensor(entry.info, entry.data)
            else:
                values = _dequantize(entry.info, entry.data)
                if np.may_share_memory(values, entry.data):  # F32: never hand out the file map as a dense tensor
                    values = values.copy()
                weight = torch.from_numpy(values).to(dtype)
            if entry.transform is not None:
                transform = functools.partial(TENSOR_TRANSFORMS[entry.transform], config=self.config)
                weight = weight.map_rows(transform) if isinstance(weight, GGMLTensor) else transform(weight)
            yield entry.hf_name, weight
            _release_pages(entry.data, entry.info.offset, entry.info.nbytes)


def open_gguf(paths: list[str] | str) -> GGUFModel:
    """Open one GGUF model (several files: metadata and tensors merged) and map it onto HF names and config.

    Raises ValueError for a missing or truncated file (naming it), an unknown `general.architecture` (listing
    the supported ones), an unsupported tensor type (naming the tensor and type) and unsupported features.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("open_gguf needs at least one GGUF file path")
    paths = [os.fspath(path) for path in paths]
    metadata, tensors = _read_files(paths)
    arch_name, arch = _architecture(metadata, paths)
    _check_metadata(arch_name, arch, metadata, paths)
    entries, config_values = _collect_tensors(arch_name, arch, tensors)
    config = build_config(arch_name, arch, metadata, {entry.hf_name: entry.info.shape for entry in entries})
    for gguf_name, values in config_values.items():
        config[arch.config_tensors[gguf_name]] = values.reshape(-1).tolist()
    tensor_types = {entry.hf_name: ggml_type_name(entry.info) for entry in entries}
    logger.debug("opened GGUF %s: architecture %s, %d tensors", paths, arch_name, len(entries))
    return GGUFModel(config=config, metadata=metadata, tensor_types=tensor_types, paths=paths, _entries=entries)
