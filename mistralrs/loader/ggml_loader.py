"""Legacy GGML model files (llama.cpp's formats before GGUF), llama architecture only (REFERENCE §7).

The file is a little-endian stream:
- magic (u32): 'ggml' 0x67676d6c (unversioned), 'ggmf' 0x67676d66 or 'ggjt' 0x67676a74, then a u32 version
  for the last two (ggmf 1, ggjt 1-3);
- hyperparameters, seven u32: n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype;
- the vocabulary, n_vocab times: u32 length, the token's bytes, and (not in unversioned files) an f32 score;
- the tensors until the end of the file, each: u32 n_dims, u32 name length, u32 GGML type, n_dims u32 sizes in
  ggml order (innermost first), the name, then (ggjt only) padding to a multiple of 32 bytes, then the data.

The block layouts of the quantized types changed twice while the format was in use (ggjt v2 and v3); the
current GGML blocks are those of ggjt v3, so older files are read only when their tensors are F32 or F16.

The llama tensor names (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...) map onto the Hugging
Face checkpoint names; q/k rows are stored in llama.cpp's interleaved order and are un-permuted as for GGUF.
The files store neither the KV-head count (`gqa`: n_kv_heads = n_head / gqa) nor the RoPE base (10000), the
norm epsilon (1e-5) or the context length (4096 here). The intermediate size is llama.cpp's rule from n_mult,
`ceil(2 * 4 * n_embd / 3 / n_mult) * n_mult`, unless the `feed_forward.w1` tensor says otherwise (Llama-2-70B
files, whose width came from a multiplier the header cannot hold). The result is a `GGUFModel`, so weights are
handed out exactly as for GGUF files (GGML blocks kept quantized for the GGUF linear methods).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mistralrs.formats.gguf_format import GGML_TYPES
from mistralrs.loader.gguf_loader import (
    SUPPORTED_TENSOR_TYPES,
    GGUFModel,
    TensorEntry,
    TensorTarget,
    check_sizes_fit_tensors,
    ggml_type_name,
)
from mistralrs.formats.gguf_metadata import GGUFTensorInfo
from mistralrs.loader.gguf_tables import GGUF_ARCHITECTURES

logger = logging.getLogger(__name__)

MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt"}  # u32 magic → format name
SUPPORTED_VERSIONS = {"ggml": (None,), "ggmf": (1,), "ggjt": (1, 2, 3)}  # format → versions read
CURRENT_BLOCKS_VERSION = ("ggjt", 3)  # the first format whose quantized blocks are today's GGML blocks
GGJT_ALIGNMENT = 32  # ggjt pads each tensor's data to this many bytes
DEFAULT_CONTEXT_LENGTH = 4096  # not stored in GGML files

# GGML tensor stem → HF module path ("{bid}" is the layer index).
GGML_LLAMA_TENSOR_NAMES: dict[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "layers.{bid}.attention_norm": "model.layers.{bid}.input_layernorm",
    "layers.{bid}.attention.wq": "model.layers.{bid}.self_attn.q_proj",
    "layers.{bid}.attention.wk": "model.layers.{bid}.self_attn.k_proj",
    "layers.{bid}.attention.wv": "model.layers.{bid}.self_attn.v_proj",
    "layers.{bid}.attention.wo": "model.layers.{bid}.self_attn.o_proj",
    "layers.{bid}.ffn_norm": "model.layers.{bid}.post_attention_layernorm",
    "layers.{bid}.feed_forward.w1": "model.layers.{bid}.mlp.gate_proj",
    "layers.{bid}.feed_forward.w2": "model.layers.{bid}.mlp.down_proj",
    "layers.{bid}.feed_forward.w3": "model.layers.{bid}.mlp.up_proj",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
# The header field behind each HF size that the tensors are checked against.
GGML_FIELDS = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
               "num_key_value_heads": "n_head / gqa"}


@dataclass(frozen=True)
class GGMLHParams:
    """The hyperparameters a GGML file stores."""

    n_vocab: int  # vocabulary size
    n_embd: int  # hidden size
    n_mult: int  # the intermediate size is rounded up to a multiple of this
    n_head: int  # attention heads
    n_layer: int  # decoder layers
    n_rot: int  # rotary dimensions per head
    ftype: int  # the file's predominant type (informational)


@dataclass
class GGMLFile:
    """A parsed legacy GGML file."""

    path: str  # the file
    format: str  # "ggml", "ggmf" or "ggjt"
    version: int | None  # the format version (None for unversioned "ggml")
    hparams: GGMLHParams  # the header's hyperparameters
    tokens: list[bytes]  # the vocabulary, by id
    scores: list[float]  # token scores (zeros for unversioned files)
    tensors: list[GGUFTensorInfo]  # every tensor, shapes in PyTorch order, offsets absolute
    data: np.ndarray  # uint8 array over a copy-on-write map of the file


class _Cursor:
    """Reads little-endian values from the file map; a short read is a ValueError naming the file."""

    def __init__(self, data: np.ndarray, path: str):
        self.data, self.path, self.pos = data, path, 0

    def take(self, nbytes: int, what: str) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise ValueError(f"GGML file {self.path!r} is truncated: {what} needs bytes up to {self.pos + nbytes}, "
                             f"the file has {len(self.data)}")
        raw = self.data[self.pos:self.pos + nbytes].tobytes()
        self.pos += nbytes
        return raw

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def f32(self, what: str) -> float:
        return struct.unpack("<f", self.take(4, what))[0]


def _read_magic(cursor: _Cursor) -> tuple[str, int | None]:
    magic = cursor.u32("the magic")
    if magic not in MAGICS:
        raise ValueError(f"{cursor.path!r} is not a GGML file: magic {magic:#010x}; accepted magics: "
                         + ", ".join(f"'{name}' ({value:#010x})" for value, name in MAGICS.items()))
    name = MAGICS[magic]
    version = None if name == "ggml" else cursor.u32("the version")
    if version not in SUPPORTED_VERSIONS[name]:
        raise ValueError(f"GGML file {cursor.path!r}: {name} version {version} is not supported; supported: "
                         f"{SUPPORTED_VERSIONS[name]}")
    return name, version


def _read_tensor(cursor: _Cursor, aligned: bool, current_blocks: bool) -> GGUFTensorInfo:
    """One tensor record; the cursor ends after its data."""
    n_dims, name_len, ggml_type = (cursor.u32("a tensor header") for _ in range(3))
    ne = [cursor.u32("a tensor's sizes") for _ in range(n_dims)]
    name = cursor.take(name_len, "a tensor name").decode("utf-8", errors="replace")
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"GGML file {cursor.path!r}: tensor {name!r} has unknown GGML type {ggml_type}")
    type_name = GGML_TYPES[ggml_type].name
    if type_name not in SUPPORTED_TENSOR_TYPES or (not current_blocks and type_name not in ("F32", "F16")):
        accepted = SUPPORTED_TENSOR_TYPES if current_blocks else ("F32", "F16")
        raise ValueError(f"GGML file {cursor.path!r}: tensor {name!r} has type {type_name}, not supported in this "
                         f"file's format version; supported types: {', '.join(accepted)}")
    if aligned:
        cursor.pos = -(-cursor.pos // GGJT_ALIGNMENT) * GGJT_ALIGNMENT
    block_size, type_size = GGML_TYPES[ggml_type].block_size, GGML_TYPES[ggml_type].type_size
    if not ne or ne[0] % block_size:
        raise ValueError(f"GGML file {cursor.path!r}: tensor {name!r} of sizes {ne} does not hold whole "
                         f"{type_name} blocks")
    nbytes = math.prod(ne) // block_size * type_size
    offset = cursor.pos
    cursor.take(nbytes, f"the data of tensor {name!r}")
    return GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, offset, nbytes)


def read_ggml_file(path: str) -> GGMLFile:
    """Parse a legacy GGML file; ValueError naming the file when it is missing, not GGML, or truncated."""
    if not os.path.isfile(path):
        raise ValueError(f"GGML file {path!r} does not exist")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"GGML file {path!r} is empty")
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
    cursor = _Cursor(data, path)
    name, version = _read_magic(cursor)
    hparams = GGMLHParams(*(cursor.u32("the hyperparameters") for _ in range(7)))
    for field in fields(hparams):
        if field.name != "ftype" and getattr(hparams, field.name) == 0:
            raise ValueError(f"GGML file {path!r}: {field.name} = 0 (corrupt header: it must be positive)")
    tokens, scores = [], []
    for _ in range(hparams.n_vocab):
        tokens.append(cursor.take(cursor.u32("the vocabulary"), "the vocabulary"))
        scores.append(cursor.f32("the vocabulary") if name != "ggml" else 0.0)
    current_blocks = (name, version) == CURRENT_BLOCKS_VERSION
    tensors = []
    while cursor.pos < len(data):
        tensors.append(_read_tensor(cursor, aligned=name == "ggjt", current_blocks=current_blocks))
    return GGMLFile(path, name, version, hparams, tokens, scores, tensors, data)


def _hf_name(ggml_name: str) -> str | None:
    stem, _, suffix = ggml_name.rpartition(".")
    match = _LAYER_RE.match(stem)
    key, block_index = (f"layers.{{bid}}.{match.group(2)}", match.group(1)) if match else (stem, None)
    hf_stem = GGML_LLAMA_TENSOR_NAMES.get(key)
    return None if hf_stem is None or not suffix else f"{hf_stem.format(bid=block_index)}.{suffix}"


def ggml_config(hparams: GGMLHParams, gqa: int, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The Hugging Face llama config of a GGML file; ValueError naming `gqa` when it does not divide n_head."""
    if isinstance(gqa, bool) or not isinstance(gqa, int) or gqa <= 0 or hparams.n_head % gqa:
        raise ValueError(f"gqa must be a positive integer dividing the file's n_head ({hparams.n_head}), got {gqa!r}")
    head_dim = hparams.n_embd // hparams.n_head
    intermediate = -(-(2 * (4 * hparams.n_embd) // 3) // hparams.n_mult) * hparams.n_mult
    gate = tensor_shapes.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and gate[0] != intermediate:
        logger.info("GGML %s: feed_forward.w1 has %d rows, not %d from n_mult; using the tensor", hparams, gate[0],
                    intermediate)
        intermediate = gate[0]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hparams.n_embd,
        "intermediate_size": intermediate, "num_hidden_layers": hparams.n_layer,
        "num_attention_heads": hparams.n_head, "num_key_value_heads": hparams.n_head // gqa, "head_dim": head_dim,
        "vocab_size": hparams.n_vocab, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": DEFAULT_CONTEXT_LENGTH, "rope_scaling": None, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": "lm_head.weight" not in tensor_shapes,
    }
    if hparams.n_rot != head_dim:
        config["partial_rotary_factor"] = hparams.n_rot / head_dim
    return config


def open_ggml(path: str | os.PathLike, gqa: int | None = None) -> GGUFModel:
    """Open a legacy GGML llama file as a `GGUFModel` (HF config and HF-named weights); `gqa` None means 1.

    Raises ValueError naming the file for a missing, non-GGML or truncated file, naming the tensor for an
    unknown name or unsupported type, naming `gqa` when it does not divide the head count, and naming the header
    field that is zero or (n_layer, n_embd, n_head, n_head / gqa) does not fit the tensors.
    """
    path = os.fspath(path)
    ggml = read_ggml_file(path)
    entries = []
    for info in ggml.tensors:
        hf_name = _hf_name(info.name)
        if hf_name is None:
            raise ValueError(f"GGML tensor {info.name!r} in {path!r} has no llama mapping; known names: "
                             f"{', '.join(GGML_LLAMA_TENSOR_NAMES)}")
        entries.append(TensorEntry(TensorTarget((hf_name,)), path, info, ggml.data))
    shapes = {entry.target.hf_names[0]: tuple(entry.info.shape) for entry in entries}
    config = ggml_config(ggml.hparams, 1 if gqa is None else gqa, shapes)
    check_sizes_fit_tensors(config, entries, GGML_FIELDS, f"GGML file {path!r}")
    tensor_types = {entry.target.hf_names[0]: ggml_type_name(entry.info) for entry in entries}
    logger.debug("opened GGML %s (%s v%s): %d tensors", path, ggml.format, ggml.version, len(entries))
    # The GGUF llama entry's transforms apply as they are: the q/k un-permutation keyed on the HF names.
    return GGUFModel(config=config, metadata={}, tensor_types=tensor_types, paths=[path], _entries=entries,
                     _arch=GGUF_ARCHITECTURES["llama"])
