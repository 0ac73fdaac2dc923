"""GGUF files read into the engine's canonical form: a Hugging Face config dict plus `(hf_name, tensor)` pairs.

Checkpoint (Hugging Face) names are the truth. Each GGUF `general.architecture` has one declarative
`GGUFArchitecture` entry in `GGUF_ARCHITECTURES` (mistralrs/loader/gguf_tables.py): the tensor-name table
(GGUF stem → HF module path), the tensors that hold several HF tensors (merged experts, fused qkv) or one part
of an HF tensor, the per-tensor transforms that undo llama.cpp's conversion (the Q/K row permutation of llama
models, Gemma's shifted norms), and the metadata → config table. Adding an architecture means adding an entry,
not a code path.

`GGUFModel.iter_weights` yields the tensors one at a time, in file order. With `keep_quantized`, tensors of 2
or more dimensions come as `GGMLTensor`s over the memory-mapped file bytes (every type in `SUPPORTED_TENSOR_TYPES`,
float types included), for the layers to pack; 1-D tensors (norms, biases) and tensors that several file tensors
merge into are dequantized here. The Q/K un-permutation moves whole
rows, and a split (one expert of `[n_expert, out, in]`, q of a fused qkv) is a run of whole rows, so both apply
to the block rows of a quantized tensor as well. Once the consumer has taken a tensor, its file pages are
dropped from the resident set, so peak memory stays near the size of the finished model.

A corrupt file is a ValueError naming the file and the key or tensor, before a model is built from it: every
count in the metadata must be positive and the layer count, width, head counts and expert count must be those
the tensors have (so no corrupt count allocates), the RoPE base and norm epsilon positive and finite, BOS/EOS
ids tokens of the vocabulary. NaN and infinite weights are found as each tensor is read, from the float fields
of its blocks alone (gguf_format.nonfinite_block: under 2% of SmolLM2's load time).
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mistralrs.formats.gguf_format import GGML_TYPES, nonfinite_block
from mistralrs.formats.gguf_metadata import GGUFTensorInfo, read_gguf_header
from mistralrs.loader.gguf_tables import (  # noqa: F401  (unpermute_rows and TENSOR_TRANSFORMS are re-exported)
    CONFIG_RULES,
    GGUF_ARCHITECTURES,
    MERGE_RULES,
    TENSOR_TRANSFORMS,
    GGUFArchitecture,
    TensorMerge,
    TensorSplit,
    split_rows,
    unpermute_rows,
)
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES, dequantize_rows

logger = logging.getLogger(__name__)

# GGML tensor types a GGUF file may hold: every block type of mistralrs.quant (the reference's list, plus the IQ
# and TQ types it rejects) except Q8_1, which llama.cpp uses for activations only (gguf-py even disagrees with
# ggml on its block size).
SUPPORTED_TENSOR_TYPES = tuple(name for name in BLOCK_TYPES if name != "Q8_1")

# Optional tokenizer metadata → HF config key.
TOKEN_ID_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
                 "tokenizer.ggml.padding_token_id": "pad_token_id"}
# Token ids that must be tokens of the model (a prompt starts with one, generation stops on the others).
VOCAB_TOKEN_ID_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                       "tokenizer.ggml.eom_token_id")
# "<arch>." metadata keys that count something: positive integers wherever present.
POSITIVE_COUNT_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                       "attention.head_count", "attention.head_count_kv", "attention.key_length",
                       "attention.value_length", "rope.dimension_count", "attention.kv_lora_rank")
# "<arch>." metadata keys holding positive finite numbers wherever present.
POSITIVE_NUMBER_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([^.]+)(?:\.(\d+))?$")  # blk.<bid>.<name>[.<expert id>]
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")  # the decoder layer of an HF tensor name
_HF_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")  # the expert of an HF tensor name


@dataclass(frozen=True)
class TensorTarget:
    """Where one GGUF tensor goes: its HF name(s), and how it is cut or combined on the way."""

    hf_names: tuple[str, ...]  # one name, the parts of a split in order, or the merged tensor's name
    split: TensorSplit | None = None  # set when the tensor stacks several HF tensors
    merge: TensorMerge | None = None  # set when the tensor is one part of an HF tensor


def _table_key(gguf_name: str) -> tuple[str, str, str | None, str | None]:
    """(table key of the stem, suffix, block index, expert index) of a GGUF name."""
    stem, _, suffix = gguf_name.rpartition(".")
    match = _BLOCK_RE.match(stem)
    if match is None:
        return stem, suffix, None, None
    key = f"blk.{{bid}}.{match.group(2)}" + (".{xid}" if match.group(3) is not None else "")
    return key, suffix, match.group(1), match.group(3)


def resolve_tensor(arch: GGUFArchitecture, gguf_name: str, shape: tuple[int, ...]) -> TensorTarget | None:
    """Where the GGUF tensor `gguf_name` of `shape` (PyTorch order) goes, or None when the table has no entry."""
    key, suffix, block_index, expert_index = _table_key(gguf_name)
    if not key or not suffix:
        return None
    whole = arch.tensor_names.get(f"{key}.{suffix}")  # a whole-name entry (its own suffix)
    if whole is not None:
        return TensorTarget((whole.format(bid=block_index, xid=expert_index),))
    if key in arch.tensor_names:
        return TensorTarget((f"{arch.tensor_names[key].format(bid=block_index, xid=expert_index)}.{suffix}",))
    split = arch.tensor_splits.get(key)
    if split is not None:
        if split.rule == "experts":
            names = tuple(f"{split.hf_stems[0].format(bid=block_index, xid=e)}.{suffix}" for e in range(shape[0]))
        else:
            names = tuple(f"{stem.format(bid=block_index)}.{suffix}" for stem in split.hf_stems)
        return TensorTarget(names, split=split)
    merge = arch.tensor_merges.get(key)
    if merge is not None:
        return TensorTarget((f"{merge.hf_stem.format(bid=block_index)}.{suffix}",), merge=merge)
    return None


def map_tensor_name(arch: GGUFArchitecture, gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor that maps one to one (e.g. "blk.3.attn_q.weight" →
    "model.layers.3.self_attn.q_proj.weight"), or None when the table has no such entry."""
    target = resolve_tensor(arch, gguf_name, ())
    return None if target is None or target.split or target.merge else target.hf_names[0]


# ----------------------------------------------------------------------------------------------------------
# Reading files: the header through gguf_metadata.read_gguf_header; tensor data stays memory-mapped until
# `iter_weights` reaches it.

def ggml_type_name(info: GGUFTensorInfo) -> str:
    """The GGML type name of a tensor, e.g. "Q4_1"."""
    return GGML_TYPES[info.ggml_type].name


def read_gguf_file(path: str) -> tuple[dict[str, Any], list[GGUFTensorInfo], np.ndarray]:
    """One GGUF file: (metadata as plain Python values, tensor infos, uint8 array over a copy-on-write map of
    the file: views of it are writable arrays and tensors, and nothing is ever written back to the file).

    ValueError names the file when it is missing, not GGUF, or truncated (header or tensor data).
    """
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    header = read_gguf_header(path)
    with open(path, "rb") as f:
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
    for info in header.tensors:
        if info.offset + info.nbytes > len(data):
            raise ValueError(f"GGUF file {path!r} is truncated: tensor {info.name!r} needs bytes up to "
                             f"{info.offset + info.nbytes}, the file has {len(data)}")
        block_size = GGML_TYPES[info.ggml_type].block_size
        if info.shape and info.shape[-1] % block_size != 0:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r}: row length {info.shape[-1]} is not a "
                             f"multiple of the {ggml_type_name(info)} block size {block_size}")
    return header.metadata, header.tensors, data


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor (of a GGUF or legacy GGML file) and where it goes."""

    target: TensorTarget  # its Hugging Face name(s)
    path: str  # file holding it
    info: GGUFTensorInfo  # where its bytes are and how they are encoded
    data: np.ndarray  # uint8 array over the memory-mapped file (np.frombuffer of an mmap)


def _dequantize(info: GGUFTensorInfo, data: np.ndarray) -> np.ndarray:
    """One tensor as a float32 array in PyTorch shape order (a fresh array, or a view of the file map for F32),
    through mistralrs.quant's dequantizers (bit-equal to gguf's, and covering types gguf cannot decode, such as
    Q8_K)."""
    raw = data[info.offset:info.offset + info.nbytes]
    row_bytes = info.nbytes // max(1, int(np.prod(info.shape[:-1], dtype=np.int64)))
    values = dequantize_rows(torch.from_numpy(raw.reshape(-1, row_bytes)), ggml_type_name(info)).numpy()
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


def _block_tensor(info: GGUFTensorInfo, data: np.ndarray) -> GGMLTensor:
    """One block-quantized tensor as a `GGMLTensor` over the file bytes (no copy), which can release the pages of
    its rows (a packing consumer drops each chunk of rows once it has packed it)."""
    raw = torch.from_numpy(data[info.offset:info.offset + info.nbytes])
    num_rows = math.prod(info.shape[:-1])
    release = functools.partial(_release_rows, data, info.offset, info.nbytes // num_rows)
    return GGMLTensor(raw.reshape(num_rows, -1), ggml_type_name(info), tuple(info.shape), release_pages=release)


def _release_rows(data: np.ndarray, offset: int, row_bytes: int, start: int, stop: int) -> None:
    """`_release_pages` of the rows `[start, stop)` of a tensor of `row_bytes` rows at file offset `offset`."""
    _release_pages(data, offset + start * row_bytes, (stop - start) * row_bytes)


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
                     ) -> tuple[list[TensorEntry], dict[str, np.ndarray]]:
    """Map every tensor to its HF name(s); also returns the values of the tensors that feed the config."""
    entries: list[TensorEntry] = []
    config_values: dict[str, np.ndarray] = {}
    for path, info, data in tensors:
        if ggml_type_name(info) not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r} has unsupported type {ggml_type_name(info)}; "
                             f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}")
        if info.name in arch.config_tensors:
            _check_finite(path, info, data)
            config_values[info.name] = _dequantize(info, data)
            continue
        target = resolve_tensor(arch, info.name, tuple(info.shape))
        if target is None:
            raise ValueError(f"GGUF tensor {info.name!r} in {path!r} has no mapping for architecture {arch_name!r}")
        entries.append(TensorEntry(target, path, info, data))
    _check_merges_complete(entries)
    return entries, config_values


def _check_merges_complete(entries: list[TensorEntry]) -> None:
    """Every HF tensor stored as several GGUF tensors must have all its parts."""
    parts: dict[str, set[int]] = {}
    for entry in entries:
        if entry.target.merge is not None:
            parts.setdefault(entry.target.hf_names[0], set()).add(entry.target.merge.part)
    for entry in entries:
        merge = entry.target.merge
        if merge is not None and len(parts[entry.target.hf_names[0]]) != merge.num_parts:
            raise ValueError(f"GGUF tensor {entry.info.name!r} is one of {merge.num_parts} parts of "
                             f"{entry.target.hf_names[0]!r}, but the file(s) hold only "
                             f"{len(parts[entry.target.hf_names[0]])}")


def _hf_shapes(entries: list[TensorEntry]) -> dict[str, tuple[int, ...]]:
    """HF name → shape where it is known before the config (the config reads the embedding's and presences)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        shape = tuple(entry.info.shape)
        part_shape = shape[1:] if entry.target.split is not None and entry.target.split.rule == "experts" else shape
        for name in entry.target.hf_names:
            shapes[name] = part_shape
    return shapes


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
    """Fail on missing required keys, and on counts and numbers no model has (before any is divided by)."""
    prefix = arch_name + "."
    for key in arch.required_keys:
        if prefix + key not in metadata:
            raise ValueError(f"GGUF metadata key {prefix + key!r} is missing in {paths}")
    for key in POSITIVE_COUNT_KEYS:
        value = metadata.get(prefix + key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"GGUF file(s) {paths}: {prefix + key} = {value!r} must be a positive integer")
    for key in POSITIVE_NUMBER_KEYS:
        value = metadata.get(prefix + key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ValueError(f"GGUF file(s) {paths}: {prefix + key} = {value!r} must be a positive finite number")


def _check_token_ids(metadata: Mapping[str, Any], vocab_size: int, paths: list[str]) -> None:
    """BOS, EOS and the end-of-turn ids name tokens of the model (of its embedding and of its token list)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    limit = min(vocab_size, len(tokens)) if isinstance(tokens, list) else vocab_size
    for key in VOCAB_TOKEN_ID_KEYS:
        value = metadata.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit):
            raise ValueError(f"GGUF file(s) {paths}: {key} = {value!r} is not a token id of the model's "
                             f"vocabulary of {limit} tokens")


def check_sizes_fit_tensors(config: Mapping[str, Any], entries: list[TensorEntry], fields: Mapping[str, str],
                            source: str) -> None:
    """The config's layer count, width and attention sizes against the tensors that hold them, before a model is
    built from it (a corrupt count would allocate layers the file does not have). `fields` names the file's field
    behind each HF key, `source` the file(s), for the ValueError."""
    names = [name for entry in entries for name in entry.target.hf_names]
    experts = config.get("num_local_experts") or config.get("n_routed_experts")  # None or 0: no experts
    for key, count, pattern in (("num_hidden_layers", config["num_hidden_layers"], _HF_LAYER_RE),
                                ("num_experts", experts, _HF_EXPERT_RE)):
        indices = {int(match.group(1)) for name in names if (match := pattern.search(name))}
        held = max(indices) + 1 if indices else 0
        if count and count != held:
            raise ValueError(f"{source}: {fields[key]} = {count}, but the tensors hold {held} "
                             f"{'layers' if key == 'num_hidden_layers' else 'experts'}")
    shapes = {entry.target.hf_names[0]: tuple(entry.info.shape) for entry in entries
              if entry.target.split is None and entry.target.merge is None}
    embedding = shapes.get("model.embed_tokens.weight")
    if embedding is not None and embedding[-1] != config["hidden_size"]:
        raise ValueError(f"{source}: {fields['hidden_size']} = {config['hidden_size']}, but the token embedding is "
                         f"{embedding[-1]} wide")
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    if head_dim <= 0:
        raise ValueError(f"{source}: {fields['num_attention_heads']} = {heads} leaves no features per head "
                         f"({fields['hidden_size']} = {config['hidden_size']})")
    rows = {"q_proj": heads * head_dim, "q_b_proj": heads * head_dim, "k_proj": kv_heads * head_dim,
            "qkv_proj": (heads + 2 * kv_heads) * head_dim}
    for proj, expected in rows.items():
        shape = shapes.get(f"model.layers.0.self_attn.{proj}.weight")
        if shape is not None and shape[0] != expected:
            raise ValueError(f"{source}: {fields['num_attention_heads']} = {heads} and "
                             f"{fields['num_key_value_heads']} = {kv_heads} with {head_dim} features per head give "
                             f"{proj} {expected} rows, but its tensor has {shape[0]}")


def _check_finite(path: str, info: GGUFTensorInfo, data: np.ndarray) -> None:
    """ValueError naming the file and the tensor when a value of it is NaN or infinite (found from the float
    fields of its blocks, without dequantizing)."""
    ggml = GGML_TYPES[info.ggml_type]
    block = nonfinite_block(data[info.offset:info.offset + info.nbytes].reshape(-1, ggml.type_size), ggml)
    if block is not None:
        where = (f"value {block}" if ggml.block_size == 1 else
                 f"block {block}, values {block * ggml.block_size} to {(block + 1) * ggml.block_size - 1}")
        raise ValueError(f"tensor {info.name!r} in {path!r} holds NaN or infinite values (its {ggml.name} {where})")


def build_config(arch_name: str, arch: GGUFArchitecture, metadata: Mapping[str, Any],
                 tensor_shapes: Mapping[str, tuple[int, ...]],
                 config_values: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A Hugging Face style config.json dict from GGUF metadata, the (HF-named) tensor shapes and the values of
    the architecture's `config_tensors` (GGUF name → values)."""
    prefix = arch_name + "."
    config: dict[str, Any] = {"architectures": [arch.hf_architecture], "model_type": arch.model_type,
                              **arch.config_defaults}
    for key, hf_key in arch.config_keys.items():
        if metadata.get(prefix + key) is not None:
            config[hf_key] = metadata[prefix + key]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    rope_dim = metadata.get(prefix + "rope.dimension_count")
    if rope_dim is not None and config["head_dim"] > 0 and rope_dim != config["head_dim"]:
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
    for gguf_name, values in (config_values or {}).items():
        config[arch.config_tensors[gguf_name]] = values.reshape(-1).tolist()
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
    _entries: list[TensorEntry] = field(repr=False, default_factory=list)  # tensors in file order
    _arch: GGUFArchitecture | None = field(repr=False, default=None)  # the table entry (transforms)

    def iter_weights(self, dtype: torch.dtype, keep_quantized: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        """Yield `(hf_name, tensor)` for every weight, one at a time, dequantized to `dtype`; with `keep_quantized`,
        tensors (2-D or more) of a type in mistralrs.quant's `BLOCK_TYPES` come as `GGMLTensor`s over the file
        bytes. A split tensor yields one pair per part; merged parts are dense and yield once all have arrived."""
        pending: dict[str, dict[int, torch.Tensor]] = {}  # merged HF name → parts read so far
        for entry in self._entries:
            _check_finite(entry.path, entry.info, entry.data)
            # the check read every page of the tensor: dropped again, so that a consumer that reads the tensor in
            # chunks (and releases them) holds one chunk of the file at a time, not the whole tensor
            _release_pages(entry.data, entry.info.offset, entry.info.nbytes)
            weight = self._read(entry, dtype, keep_quantized and entry.target.merge is None)
            merge = entry.target.merge
            if merge is not None:
                name = entry.target.hf_names[0]
                parts = pending.setdefault(name, {})
                parts[merge.part] = weight
                if len(parts) == merge.num_parts:
                    del pending[name]
                    merged = MERGE_RULES[merge.rule]([parts[i] for i in range(merge.num_parts)], self.config)
                    yield name, self._transform(name, merged)
            else:
                for name, part in zip(entry.target.hf_names, self._split(entry, weight)):
                    yield name, self._transform(name, part)
            _release_pages(entry.data, entry.info.offset, entry.info.nbytes)
        # Once more for every tensor, after the consumer has taken the last one: a fused projection's shards are
        # packed when the last shard arrives, which reads the earlier shards' pages again after their release
        # (SmolLM2: 29 MB of q/k/v and gate/up blocks left resident otherwise).
        for entry in self._entries:
            _release_pages(entry.data, entry.info.offset, entry.info.nbytes)

    @staticmethod
    def _read(entry: TensorEntry, dtype: torch.dtype, keep_quantized: bool) -> torch.Tensor | GGMLTensor:
        """The whole tensor: GGML blocks over the file, or dense in `dtype` (never a view of the file map)."""
        if keep_quantized and len(entry.info.shape) >= 2 and ggml_type_name(entry.info) in BLOCK_TYPES:
            return _block_tensor(entry.info, entry.data)
        values = _dequantize(entry.info, entry.data)
        if np.may_share_memory(values, entry.data):  # F32: never hand out the file map as a dense tensor
            values = values.copy()
        return torch.from_numpy(values).to(dtype)

    def _split(self, entry: TensorEntry, weight: torch.Tensor | GGMLTensor) -> list[torch.Tensor | GGMLTensor]:
        """The parts of a split tensor (runs of whole rows), or the tensor itself."""
        split = entry.target.split
        if split is None:
            return [weight]
        rows = split_rows(split, self.config, tuple(entry.info.shape))
        if isinstance(weight, GGMLTensor):
            return [weight.with_rows(part) for part in weight.data.split(rows)]
        flat = weight.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight
        return list(flat.split(rows))

    def _transform(self, hf_name: str, weight: torch.Tensor | GGMLTensor) -> torch.Tensor | GGMLTensor:
        """The architecture's transform for `hf_name` (matched by suffix), if any."""
        transform = next((t for suffix, t in self._arch.tensor_transforms.items() if hf_name.endswith(suffix)), None)
        if transform is None:
            return weight
        fn = functools.partial(TENSOR_TRANSFORMS[transform], config=self.config)
        return weight.map_rows(fn) if isinstance(weight, GGMLTensor) else fn(weight)


def _gguf_fields(arch_name: str) -> dict[str, str]:
    """The metadata key behind each HF size `check_sizes_fit_tensors` checks."""
    return {"num_hidden_layers": f"{arch_name}.block_count", "hidden_size": f"{arch_name}.embedding_length",
            "num_attention_heads": f"{arch_name}.attention.head_count",
            "num_key_value_heads": f"{arch_name}.attention.head_count_kv", "num_experts": f"{arch_name}.expert_count"}


def open_gguf(paths: list[str] | str) -> GGUFModel:
    """Open one GGUF model (several files: metadata and tensors merged) and map it onto HF names and config.

    Raises ValueError for a missing or truncated file (naming it), an unknown `general.architecture` (listing
    the supported ones), an unsupported tensor type (naming the tensor and type), a missing metadata key, a
    tensor the architecture does not map, and (naming the key) a count or number no model has, a layer count,
    width or head count the tensors do not have, and a BOS/EOS id outside the vocabulary. `iter_weights` raises
    ValueError naming the tensor that holds a NaN or an infinity.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("open_gguf needs at least one GGUF file path")
    paths = [os.fspath(path) for path in paths]
    metadata, tensors = _read_files(paths)
    arch_name, arch = _architecture(metadata, paths)
    _check_metadata(arch_name, arch, metadata, paths)
    entries, config_values = _collect_tensors(arch_name, arch, tensors)
    config = build_config(arch_name, arch, metadata, _hf_shapes(entries), config_values)
    check_sizes_fit_tensors(config, entries, _gguf_fields(arch_name), f"GGUF file(s) {paths}")
    _check_token_ids(metadata, config["vocab_size"], paths)
    tensor_types = {name: ggml_type_name(entry.info) for entry in entries for name in entry.target.hf_names}
    logger.debug("opened GGUF %s: architecture %s, %d tensors", paths, arch_name, len(entries))
    return GGUFModel(config=config, metadata=metadata, tensor_types=tensor_types, paths=paths, _entries=entries,
                     _arch=arch)
