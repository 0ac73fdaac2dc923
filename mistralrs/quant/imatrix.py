"""Importance matrices for ISQ (REFERENCE §3): read llama.cpp `.imatrix` files, read and write mistral.rs
`.cimatrix` files, and collect one from a calibration text.

An importance vector holds, per input column of a linear layer, the mean of x² over the calibration rows; GGML
quantization weights each column's rounding error by it. Our in-memory form is a dict from checkpoint linear
name (`model.layers.0.self_attn.q_proj`, as `isq.isq_layer_names` lists them) to a float32 `[in_features]`.

- llama.cpp legacy binary: int32 n_entries, then per entry int32 name length, the name (`blk.N.attn_q.weight`),
  int32 ncall, int32 nval, nval float32 (sums over `ncall` chunks, so divided by ncall here, as llama.cpp's
  quantizer does); anything after the entries (the last call and dataset name) is ignored. The GGUF container
  (newer llama.cpp) holds `<name>.in_sum2` and `<name>.counts`; the vector is in_sum2 / counts. Names map onto
  checkpoint names by llama.cpp's llama-family names (`LLAMA_CPP_LINEAR_NAMES`); other entries, MoE experts
  (`ffn_*_exps`) among them, have no counterpart here and are skipped.
- `.cimatrix`: u64 number of entries; per entry u64 layer index (in `isq_layer_names` order), u8 has-data, and
  when set u64 length and that many float32 (all little-endian).
- Collection (`collect_imatrix`): forward passes over chunks of 1024 tokens, each with BOS in front; hooks on
  every ISQ layer add Σx² per input column and count rows; the vector is Σx² / rows. (The reference divides by
  the layer's input width instead of the row count, a bug; the quantization is unchanged since a vector's scale
  does not change the weighted rounding, only the file's values differ.)
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.activation import act_and_mul
from mistralrs.layers.moe import FusedMoE, UnquantizedMoEMethod
from mistralrs.formats.gguf_format import GGML_TYPES
from mistralrs.formats.gguf_metadata import read_gguf_header
from mistralrs.quant.ggml_types import dequantize_rows
from mistralrs.quant.isq import (
    IsqLayer,
    expert_projection_names,
    isq_layer_names,
    isq_layers,
)

logger = logging.getLogger(__name__)

CALIBRATION_CHUNK_TOKENS = 1024  # tokens per forward pass (BOS not counted)


# ---- files ---------------------------------------------------------------------------------------------------

def read_cimatrix(path: str) -> dict[int, torch.Tensor | None]:
    """Layer index -> importance vector (None where the entry has no data)."""
    with open(path, "rb") as f:
        data = f.read()
    entries: dict[int, torch.Tensor | None] = {}
    try:
        (count,), offset = struct.unpack_from("<Q", data, 0), 8
        for _ in range(count):
            index, has_data = struct.unpack_from("<QB", data, offset)
            offset += 9
            if not has_data:
                entries[index] = None
                continue
            (length,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            values = struct.unpack_from(f"<{length}f", data, offset)
            offset += 4 * length
            entries[index] = torch.tensor(values, dtype=torch.float32)
    except struct.error as exc:
        raise ValueError(f"imatrix {path!r}: truncated or malformed .cimatrix file") from exc
    return entries


def write_cimatrix(path: str, entries: Mapping[int, torch.Tensor | None]) -> None:
    """Writes `entries` (layer index -> vector or None) in index order; the extension must be `.cimatrix`."""
    if not str(path).endswith(".cimatrix"):
        raise ValueError(f"imatrix output {path!r}: expected a .cimatrix file")
    parts = [struct.pack("<Q", len(entries))]
    for index in sorted(entries):
        vector = entries[index]
        if vector is None:
            parts.append(struct.pack("<QB", index, 0))
            continue
        values = vector.detach().float().cpu().contiguous()
        parts.append(struct.pack("<QBQ", index, 1, values.numel()) + values.numpy().astype("<f4").tobytes())
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def _read_legacy_imatrix(data: bytes, path: str) -> dict[str, torch.Tensor]:
    entries: dict[str, torch.Tensor] = {}
    try:
        (count,), offset = struct.unpack_from("<i", data, 0), 4
        for _ in range(count):
            (name_len,) = struct.unpack_from("<i", data, offset)
            name = data[offset + 4:offset + 4 + name_len].decode("utf-8")
            offset += 4 + name_len
            ncall, nval = struct.unpack_from("<ii", data, offset)
            offset += 8
            values = torch.tensor(struct.unpack_from(f"<{nval}f", data, offset), dtype=torch.float32)
            offset += 4 * nval
            entries[name] = values / ncall if ncall > 0 else values
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"imatrix {path!r}: truncated or malformed llama.cpp imatrix file") from exc
    return entries


def _read_gguf_imatrix(path: str, data: bytes) -> dict[str, torch.Tensor]:
    tensors = {}
    for info in read_gguf_header(path).tensors:
        raw = torch.frombuffer(bytearray(data[info.offset:info.offset + info.nbytes]), dtype=torch.uint8)
        tensors[info.name] = dequantize_rows(raw.reshape(1, -1), GGML_TYPES[info.ggml_type].name).reshape(-1)
    entries = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2") and f"{name[:-8]}.counts" in tensors:
            counts = tensors[f"{name[:-8]}.counts"]
            if counts.numel() == 1:  # per-expert entries (one count per expert) have no checkpoint counterpart
                entries[name[:-8]] = sums / counts.clamp(min=1)
    return entries


def read_llama_imatrix(path: str) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name (`blk.0.attn_q.weight`) -> mean x² vector, from either llama.cpp format."""
    with open(path, "rb") as f:
        data = f.read()
    return _read_gguf_imatrix(path, data) if data[:4] == b"GGUF" else _read_legacy_imatrix(data, path)


# llama.cpp's tensor stems of the linear layers (after "blk.N.") -> checkpoint module (after "model.layers.N.").
LLAMA_CPP_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_CPP_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def checkpoint_name_of(llama_cpp_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj`, `output.weight` -> `lm_head` (None for names
    with no counterpart)."""
    if llama_cpp_name == "output.weight":
        return "lm_head"
    match = _LLAMA_CPP_BLOCK.match(llama_cpp_name)
    module = LLAMA_CPP_LINEAR_NAMES.get(match.group(2)) if match else None
    return None if module is None else f"model.layers.{match.group(1)}.{module}"


def load_imatrix(path: str, model: nn.Module, moqe: bool = False) -> dict[str, torch.Tensor]:
    """The importance vectors of `path` by checkpoint linear name of `model` (`.cimatrix` by layer index;
    anything else read as llama.cpp's format, with a warning unless it ends in `.imatrix`)."""
    if not os.path.isfile(path):
        raise ValueError(f"imatrix: no such file {path!r}")
    names = isq_layer_names(model, moqe)
    if path.endswith(".cimatrix"):
        vectors = {}
        for index, vector in read_cimatrix(path).items():
            if index >= len(names):
                raise ValueError(f"imatrix {path!r}: layer index {index} out of range (the model has "
                                 f"{len(names)} ISQ layers)")
            if vector is not None:
                vectors[names[index]] = vector
        return vectors
    if not path.endswith(".imatrix"):
        logger.warning("imatrix %r: extension is neither .imatrix nor .cimatrix; reading it as llama.cpp's", path)
    wanted = set(names)
    vectors = {}
    for name, vector in read_llama_imatrix(path).items():
        checkpoint = checkpoint_name_of(name)
        if checkpoint in wanted:
            vectors[checkpoint] = vector
    if not vectors:
        raise ValueError(f"imatrix {path!r}: none of its entries names a layer of this model")
    logger.info("imatrix %r: vectors for %d of %d ISQ layers", path, len(vectors), len(names))
    return vectors


# ---- collection --------------------------------------------------------------------------------------------

class _SumSquares:
    """Σx² per input column and the number of rows, for one layer input."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # float32 [in_features]
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        squares = x.square().sum(0)
        self.total = squares if self.total is None else self.total + squares
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else (self.total / self.rows).cpu()


def _moe_hook(moe: FusedMoE, stats: Sequence[_SumSquares]) -> Callable:
    """Pre-hook on a dense `FusedMoE`: each expert's gate/up input (its routed tokens) and down input."""
    if not isinstance(moe.quant_method, UnquantizedMoEMethod):
        raise ValueError(f"{moe.prefix}: calibration needs unquantized experts")
    roles = [role for _, role in expert_projection_names(moe)]

    def hook(_module, args):
        x, router_logits = args
        _, topk_ids = moe.route(router_logits)
        for expert_id in range(moe.num_experts):
            rows = (topk_ids == expert_id).any(dim=-1).nonzero().squeeze(-1)
            expert_in = x.index_select(0, rows)
            inner = act_and_mul(F.linear(expert_in, moe.w13[expert_id]), moe.act_fn)
            for k, role in enumerate(roles):
                stats[expert_id * len(roles) + k].add(inner if role == "down" else expert_in)
    return hook


def _register(layer: IsqLayer, stats: dict[str, _SumSquares]) -> torch.utils.hooks.RemovableHandle:
    mine = [stats.setdefault(name, _SumSquares()) for name in layer.names]
    if isinstance(layer.module, FusedMoE):
        return layer.module.register_forward_pre_hook(_moe_hook(layer.module, mine))
    shared = mine[0]
    for name in layer.names[1:]:  # the shards of a fused projection see the same input
        stats[name] = shared
    return layer.module.register_forward_pre_hook(lambda _module, args: shared.add(args[0]))


def collect_imatrix(model: nn.Module, token_chunks: Iterable[list[int]], run_chunk: Callable[[list[int]], None],
                    moqe: bool = False) -> dict[str, torch.Tensor | None]:
    """Runs `run_chunk(token_ids)` over every chunk with hooks on the ISQ layers; returns name -> mean x² (None for
    a layer no token reached, such as an expert never routed to)."""
    stats: dict[str, _SumSquares] = {}
    handles = [_register(layer, stats) for layer in isq_layers(model, moqe)]
    try:
        with torch.inference_mode():
            for chunk in token_chunks:
                run_chunk(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[name].mean() for name in isq_layer_names(model, moqe)}


def calibration_chunks(token_ids: list[int], bos_token_id: int | None,
                       chunk_tokens: int = CALIBRATION_CHUNK_TOKENS) -> list[list[int]]:
    """Chunks of `chunk_tokens` tokens, each with BOS in front when the model has one."""
    prefix = [] if bos_token_id is None else [bos_token_id]
    return [prefix + token_ids[start:start + chunk_tokens] for start in range(0, len(token_ids), chunk_tokens)]


def save_collected(vectors: Mapping[str, torch.Tensor | None], names: Sequence[str], directory: str = ".") -> str:
    """Writes `collected-<N>.cimatrix` (N: layers with data) into `directory`; returns its path."""
    entries = {index: vectors.get(name) for index, name in enumerate(names)}
    count = sum(vector is not None for vector in entries.values())
    path = os.path.join(directory, f"collected-{count}.cimatrix")
    write_cimatrix(path, entries)
    logger.info("ISQ calibration: imatrix for %d layers saved to %s", count, path)
    return path


def _chunk_runner(model: nn.Module, device: torch.device, dtype: torch.dtype,
                  max_tokens: int) -> Callable[[list[int]], None]:
    """Runs one sequence of up to `max_tokens` tokens through `model` over a scratch KV cache."""
    from mistralrs.worker.forward_batch import (
        ForwardBatch,
        SeqChunk,
        allocate_kv_caches,
    )

    block_size = 16
    num_blocks = -(-max_tokens // block_size)
    kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, block_size, dtype, device)

    def run(token_ids: list[int]) -> None:
        chunk = SeqChunk(token_ids=token_ids, start_pos=0, block_ids=list(range(num_blocks)))
        fb = ForwardBatch.build([chunk], block_size, kv_caches, device)
        model.compute_logits(model(fb.input_ids, fb.positions, fb))  # every row, so the LM head sees them all
    return run


def calibrate(model: nn.Module, text: str, encode: Callable[[str], list[int]], bos_token_id: int | None, *,
              device: torch.device, dtype: torch.dtype, moqe: bool = False, directory: str = ".",
              chunk_tokens: int = CALIBRATION_CHUNK_TOKENS) -> dict[str, torch.Tensor]:
    """Collects an importance matrix from `text` (tokenized by `encode`, without special tokens) on the dense
    `model`, writes `collected-<N>.cimatrix` into `directory`, and returns the vectors by checkpoint name."""
    token_ids = encode(text)
    if not token_ids:
        raise ValueError("calibration_file: the calibration text is empty")
    chunks = calibration_chunks(token_ids, bos_token_id, chunk_tokens)
    run = _chunk_runner(model, device, dtype, max(len(chunk) for chunk in chunks))
    vectors = collect_imatrix(model, chunks, run, moqe)
    save_collected(vectors, isq_layer_names(model, moqe), directory)
    return {name: vector for name, vector in vectors.items() if vector is not None}
