"""UQFF (REFERENCE §4): the reference's file of pre-quantized ISQ layers, read and written byte for byte.

A `.uqff` file is a safetensors file of 1-D `U8` tensors named "0", "1", ...: tensor i is the serialized
blob of ISQ layer i in `get_layers()` order (`mistralrs.quant.isq.isq_layer_names`). Every blob starts with
the u32 version and a type byte (0 GGML blocks, 1 unquantized, 2 HQQ, 3 FP8); the rest of its layout is
REFERENCE §4.2 (all little-endian). Next to it, `residual.safetensors` holds every other tensor of the
model under its checkpoint name, plus copies of the config and tokenizer files.

`serialize_layer` / `deserialize_layer` convert one `IsqLayerState`; `write_uqff_file` / `iter_uqff_file`
a whole file; `write_uqff_dir` the whole directory.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear
from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.config import QuantConfig
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type
from mistralrs.quant.isq import (
    IsqLinearMethod, dequantized_shape, isq_layer_names, isq_layer_states, isq_layers,
)
from mistralrs.quant.isq_moe import ROLES, IsqMoEMethod
from mistralrs.quant.isq_state import Fp8Params, HqqParams, IsqLayerState

UQFF_VERSION = (0 << 16) | (1 << 8) | 2  # 0.1.2: (major << 16) | (minor << 8) | patch
UQFF_EXTENSION = ".uqff"
RESIDUAL_FILENAME = "residual.safetensors"
# Files copied next to the .uqff when the model has them (config.json and tokenizer.json are required).
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "processor_config.json", "preprocessor_config.json")

TYPE_GGML, TYPE_UNQUANTIZED, TYPE_HQQ, TYPE_FP8 = 0, 1, 2, 3
_TYPE_NAMES = {TYPE_GGML: "GGUF-quantized", TYPE_UNQUANTIZED: "unquantized", TYPE_HQQ: "HQQ", TYPE_FP8: "FP8"}

# "std tensor" dtype codes.
STD_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 0, torch.uint32: 1, torch.int32: 2, torch.int64: 3, torch.float16: 4, torch.bfloat16: 5,
    torch.float32: 6, torch.float64: 7, torch.int16: 8, torch.float8_e4m3fn: 9,
}
_STD_DTYPES = {code: dtype for dtype, code in STD_DTYPE_CODES.items()}

# GGML type ids the reference writes for a GGUF-quantized layer (names as in ggml_types).
GGML_TYPE_CODES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "BF16": 30,
}
_GGML_NAMES = {code: name for name, code in GGML_TYPE_CODES.items()}


# ----------------------------------------------------------------------------------------------------------
# Writing


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _shape_bytes(shape: Sequence[int]) -> bytes:
    return _u32(len(shape)) + b"".join(_u32(int(d)) for d in shape)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The contiguous data of `tensor`, as it lies in memory (little-endian hosts)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _std_tensor(tensor: torch.Tensor) -> bytes:
    """u32 data length · u32 dtype code · u32 ndims · ndims × u32 shape · raw data."""
    if tensor.dtype not in STD_DTYPE_CODES:
        raise ValueError(f"UQFF cannot store a tensor of dtype {tensor.dtype}; accepted: "
                         f"{', '.join(str(d) for d in STD_DTYPE_CODES)}")
    data = _raw_bytes(tensor)
    return _u32(len(data)) + _u32(STD_DTYPE_CODES[tensor.dtype]) + _shape_bytes(tensor.shape) + data


def _header(type_byte: int) -> bytes:
    return _u32(UQFF_VERSION) + bytes([type_byte])


def _ggml_blob(state: IsqLayerState) -> bytes:
    weight = state.ggml
    if weight.ggml_type not in GGML_TYPE_CODES:
        raise ValueError(f"UQFF cannot store GGML type {weight.ggml_type!r}; accepted: {', '.join(GGML_TYPE_CODES)}")
    data = _raw_bytes(weight.data)
    return (_header(TYPE_GGML) + _u32(len(data)) + bytes([state.bias is not None])
            + _u32(GGML_TYPE_CODES[weight.ggml_type]) + _shape_bytes(weight.shape) + data)


def _hqq_blob(state: IsqLayerState) -> bytes:
    hqq = state.hqq
    return (_header(TYPE_HQQ) + bytes([state.bias is not None]) + _std_tensor(hqq.w_q) + _std_tensor(hqq.scales)
            + _std_tensor(hqq.zeros) + _shape_bytes(hqq.shape) + bytes([hqq.bits]) + _u32(hqq.group_size)
            + bytes([hqq.axis]) + _u32(hqq.optimization_steps) + bytes([hqq.round_zeros, hqq.channel_wise]))


def _fp8_blob(state: IsqLayerState) -> bytes:
    fp8 = state.fp8
    if fp8.layer_dtype not in STD_DTYPE_CODES:
        raise ValueError(f"Fp8Params.layer_dtype {fp8.layer_dtype} has no UQFF dtype code")
    return (_header(TYPE_FP8) + bytes([state.bias is not None]) + _std_tensor(fp8.weight)
            + struct.pack("<fff", fp8.dequant_w_scale, fp8.dequant_x_scale, fp8.quant_scale)
            + _u32(STD_DTYPE_CODES[fp8.layer_dtype]))


def serialize_layer(state: IsqLayerState, model_dtype: torch.dtype | None = None) -> bytes:
    """The UQFF blob of one layer (REFERENCE §4.2), the bias (when present) last.

    With `model_dtype`, the bias is stored as the reference's layers hold it (and add it): float32 beside GGML
    blocks, the model dtype in the other kinds; without, in its own dtype.
    """
    kind = state.kind
    bias = state.bias
    if bias is not None and model_dtype is not None:
        bias = bias.to(torch.float32 if kind == "ggml" else model_dtype)
    if kind == "ggml":
        blob = _ggml_blob(state)
    elif kind == "dense":
        blob = _header(TYPE_UNQUANTIZED) + bytes([state.bias is not None]) + _std_tensor(state.dense)
    elif kind == "hqq":
        blob = _hqq_blob(state)
    else:
        blob = _fp8_blob(state)
    return blob + (_std_tensor(bias) if bias is not None else b"")


# ----------------------------------------------------------------------------------------------------------
# Reading


class _BlobReader:
    """Reads the fields of one blob in order; ValueError (with the byte offset) when the blob is too short."""

    def __init__(self, blob: torch.Tensor):
        self.blob = blob                  # uint8 [num_bytes] on the CPU
        self.view = memoryview(blob.numpy())
        self.offset = 0

    def _need(self, num_bytes: int, what: str) -> None:
        if self.offset + num_bytes > len(self.view):
            raise ValueError(f"blob truncated: {what} needs {num_bytes} bytes at offset {self.offset}, "
                             f"the blob has {len(self.view)}")

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        self._need(size, what)
        values = struct.unpack_from("<" + fmt, self.view, self.offset)
        self.offset += size
        return values

    def u8(self, what: str) -> int:
        return self.unpack("B", what)[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def flag(self, what: str) -> bool:
        value = self.u8(what)
        if value not in (0, 1):
            raise ValueError(f"blob corrupted: {what} is {value} at offset {self.offset - 1}, expected 0 or 1")
        return bool(value)

    def shape(self, what: str) -> tuple[int, ...]:
        ndims = self.u32(f"{what} ndims")
        if ndims > 8:
            raise ValueError(f"blob corrupted: {what} has {ndims} dimensions")
        return self.unpack("I" * ndims, f"{what} shape")

    def raw(self, num_bytes: int, what: str) -> torch.Tensor:
        """The next `num_bytes` as a fresh (aligned) uint8 tensor."""
        self._need(num_bytes, what)
        data = self.blob[self.offset:self.offset + num_bytes].clone()
        self.offset += num_bytes
        return data

    def std_tensor(self, what: str) -> torch.Tensor:
        num_bytes = self.u32(f"{what} data length")
        code = self.u32(f"{what} dtype")
        if code not in _STD_DTYPES:
            raise ValueError(f"blob corrupted: {what} has unknown dtype code {code} "
                             f"(accepted: {sorted(_STD_DTYPES)})")
        dtype = _STD_DTYPES[code]
        shape = self.shape(what)
        expected = math.prod(shape) * dtype.itemsize
        if num_bytes != expected:
            raise ValueError(f"blob corrupted: {what} {dtype} {list(shape)} needs {expected} bytes, "
                             f"its length field says {num_bytes}")
        return self.raw(num_bytes, what).view(dtype).reshape(shape)


def _read_ggml(reader: _BlobReader) -> tuple[bool, dict]:
    num_bytes = reader.u32("data length")
    has_bias = reader.flag("has_bias")
    code = reader.u32("ggml dtype")
    if code not in _GGML_NAMES:
        raise ValueError(f"blob corrupted: unknown GGML dtype {code} (accepted: {sorted(_GGML_NAMES)})")
    name = _GGML_NAMES[code]
    shape = reader.shape("weight")
    fmt = block_type(name)  # ValueError for a type with no torch block format here
    block_size, type_size = fmt.block_size, fmt.type_size
    if not shape or shape[-1] % block_size:
        raise ValueError(f"blob corrupted: {name} weight shape {list(shape)} is not whole blocks of {block_size}")
    expected = math.prod(shape) // block_size * type_size
    if num_bytes != expected:
        raise ValueError(f"blob corrupted: {name} {list(shape)} needs {expected} bytes, its length field says "
                         f"{num_bytes}")
    data = reader.raw(num_bytes, "weight blocks")
    rows = math.prod(shape[:-1])
    return has_bias, {"ggml": GGMLTensor(data.reshape(rows, num_bytes // rows), name, tuple(shape))}


def _read_hqq(reader: _BlobReader) -> tuple[bool, dict]:
    has_bias = reader.flag("has_bias")
    w_q, scales, zeros = (reader.std_tensor(what) for what in ("W_q", "scales", "zeros"))
    shape = reader.shape("dequantized weight")
    bits = reader.u8("bits")
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"blob corrupted: HQQ bits {bits} (accepted: 1, 2, 3, 4, 8)")
    group_size = reader.u32("group_size")
    axis = reader.u8("axis")
    if axis not in (0, 1) or group_size == 0:
        raise ValueError(f"blob corrupted: HQQ axis {axis} / group_size {group_size}")
    steps = reader.u32("optimization_steps")
    round_zeros, channel_wise = reader.flag("round_zeros"), reader.flag("channel_wise")
    params = HqqParams(w_q=w_q, scales=scales, zeros=zeros, shape=tuple(shape), bits=bits, group_size=group_size,
                       axis=axis, optimization_steps=steps, round_zeros=round_zeros, channel_wise=channel_wise)
    return has_bias, {"hqq": params}


def _read_fp8(reader: _BlobReader) -> tuple[bool, dict]:
    has_bias = reader.flag("has_bias")
    weight = reader.std_tensor("weight")
    dequant_w_scale, dequant_x_scale, quant_scale = reader.unpack("fff", "scales")
    code = reader.u32("layer dtype")
    if code not in _STD_DTYPES:
        raise ValueError(f"blob corrupted: unknown layer dtype code {code}")
    params = Fp8Params(weight=weight, dequant_w_scale=dequant_w_scale, dequant_x_scale=dequant_x_scale,
                       quant_scale=quant_scale, layer_dtype=_STD_DTYPES[code])
    return has_bias, {"fp8": params}


def _read_dense(reader: _BlobReader) -> tuple[bool, dict]:
    has_bias = reader.flag("has_bias")
    return has_bias, {"dense": reader.std_tensor("weight")}


_READERS = {TYPE_GGML: _read_ggml, TYPE_UNQUANTIZED: _read_dense, TYPE_HQQ: _read_hqq, TYPE_FP8: _read_fp8}


def deserialize_layer(blob: torch.Tensor | bytes) -> IsqLayerState:
    """One layer from its UQFF blob (a uint8 tensor or bytes), on the CPU.

    Only the version's major number is checked (it must be 0). ValueError when the blob is truncated,
    carries trailing bytes, or holds an unknown type byte, dtype code or inconsistent length.
    """
    if isinstance(blob, (bytes, bytearray)):
        blob = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    reader = _BlobReader(blob.reshape(-1).to("cpu"))
    version = reader.u32("version")
    if version >> 16 != UQFF_VERSION >> 16:
        raise ValueError(f"UQFF major version {version >> 16} (version 0x{version:08x}) does not match this "
                         f"implementation's {UQFF_VERSION >> 16}")
    type_byte = reader.u8("type")
    if type_byte not in _READERS:
        raise ValueError(f"blob corrupted: unknown layer type {type_byte} (accepted: "
                         f"{', '.join(f'{k} {v}' for k, v in _TYPE_NAMES.items())})")
    has_bias, fields = _READERS[type_byte](reader)
    bias = reader.std_tensor("bias") if has_bias else None
    if reader.offset != len(reader.view):
        raise ValueError(f"blob corrupted: {len(reader.view) - reader.offset} trailing bytes after the "
                         f"{_TYPE_NAMES[type_byte]} layer")
    return IsqLayerState(bias=bias, **fields)


# ----------------------------------------------------------------------------------------------------------
# Files


def check_uqff_path(path: str, field: str = "write_uqff") -> None:
    """ValueError unless `path` names a `.uqff` file."""
    if os.path.splitext(str(path))[1] != UQFF_EXTENSION:
        raise ValueError(f"{field} {str(path)!r}: the UQFF output path extension must be `{UQFF_EXTENSION}`")


def write_uqff_file(path: str, states: Sequence[IsqLayerState], model_dtype: torch.dtype | None = None) -> None:
    """Writes the blobs of `states` (in `isq_layer_names` order) as U8 tensors "0", "1", ... of one safetensors
    file, creating the parent directory (`model_dtype`: see `serialize_layer`)."""
    check_uqff_path(path)
    tensors = {}
    for index, state in enumerate(states):
        blob = serialize_layer(state, model_dtype)
        tensors[str(index)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path)


def iter_uqff_file(path: str, num_layers: int) -> Iterator[IsqLayerState]:
    """The layer states of a `.uqff` file in order, index i for ISQ layer i (on the CPU), each blob read as its state
    is asked for (a tensor-parallel rank then holds one whole layer at a time besides its pieces).

    ValueError when the file's artifact count differs from `num_layers` (naming both), when tensor names are
    not exactly "0".."num_layers-1" (both before the first state), or when a blob does not decode (naming the
    file and the layer index).
    """
    with safe_open(path, framework="pt", device="cpu") as f:
        names = list(f.keys())
        if len(names) != num_layers:
            raise ValueError(f"from_uqff {path!r}: number of artifacts ({len(names)}) does not match the number "
                             f"of ISQ layers ({num_layers})")
        expected = {str(i) for i in range(num_layers)}
        if set(names) != expected:
            odd = sorted(set(names) - expected)[:5]
            raise ValueError(f"from_uqff {path!r}: artifact names must be the layer indices 0..{num_layers - 1}, "
                             f"found {odd}")
        for index in range(num_layers):
            blob = f.get_tensor(str(index))
            if blob.dtype != torch.uint8 or blob.dim() != 1:
                raise ValueError(f"from_uqff {path!r}: artifact {index} must be a 1-D U8 tensor, got "
                                 f"{blob.dtype} {list(blob.shape)}")
            try:
                state = deserialize_layer(blob)
            except ValueError as error:
                raise ValueError(f"from_uqff {path!r}: layer {index}: {error}") from error
            yield state


def write_uqff_dir(path: str, states: Sequence[IsqLayerState], residual: Iterable[tuple[str, torch.Tensor]],
                   source_files: dict[str, str | None], model_dtype: torch.dtype | None = None) -> None:
    """Writes the UQFF file `path`, `residual.safetensors` (the `(name, tensor)` pairs) and copies of the
    config/tokenizer files beside it (`source_files` maps a name of `COPIED_FILES` to its local path or None)."""
    check_uqff_path(path)
    missing = [name for name in ("config.json", "tokenizer.json") if source_files.get(name) is None]
    if missing:
        raise ValueError(f"write_uqff {path!r}: the model has no {' or '.join(missing)} to write beside it")
    write_uqff_file(path, states, model_dtype)
    directory = os.path.dirname(os.path.abspath(path))
    residual_tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in residual}
    save_file(residual_tensors, os.path.join(directory, RESIDUAL_FILENAME))
    for name in COPIED_FILES:
        source = source_files.get(name)
        target = os.path.join(directory, name)
        if source is not None and os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)


# ----------------------------------------------------------------------------------------------------------
# Models


class UqffLinearMethod(IsqLinearMethod):
    """An `IsqLinearMethod` holding states read from a UQFF file: the checkpoint's own copy of the layer (a full
    checkpoint beside the UQFF file, or `UqffQuantConfig.checkpoint_weights`' placeholder) is dropped."""

    stored_quantized = False  # whether the file stores the layer quantized (a rank's piece may be dequantized)

    def load_weight(self, layer: Linear, param_name: str, loaded: torch.Tensor | GGMLTensor,
                    shard_index: int | None) -> None:
        return None

    def dense_weight(self, layer: Linear) -> torch.Tensor | None:
        """None for a layer the file stores quantized: a piece dequantized for a tensor-parallel split is not the
        checkpoint's weight, so a tied embedding keeps its own table."""
        return None if self.stored_quantized else super().dense_weight(layer)


class UqffMoEMethod(IsqMoEMethod):
    """An `IsqMoEMethod` holding expert states read from a UQFF file; checkpoint expert tensors are dropped."""

    def load_expert_weight(self, layer: FusedMoE, expert_id: int, projection: str, loaded: torch.Tensor) -> None:
        return None


class UqffQuantConfig(QuantConfig):
    """Loads the ISQ layers of a model from a `.uqff` file (REFERENCE §4.1, `from_uqff`).

    `prepare(model)` reads the file (its artifact count must equal the model's ISQ layer count) and gives every
    ISQ layer a method holding its states; the other layers stay dense. In a model built for a tensor-parallel group
    each layer keeps only its rank's piece of every state, cut as the layer cuts a checkpoint tensor
    (`Linear.local_pieces`, `FusedMoE.local_piece`). The residual weights come from the
    checkpoint files: wrap their `(name, tensor)` stream in `checkpoint_weights`, which drops the tensors of ISQ
    layers (the UQFF blob wins) and stands in for the ones the files lack (residual.safetensors has none).
    Any ISQ type setting is ignored.
    """

    def __init__(self, path: str, *, moqe: bool = False, use_fast_kernels: bool = True):
        self.path = path                      # the .uqff file
        self.moqe = moqe                      # IsqOrganization.MoQE: the layer list of only the LM head and experts
        self.use_fast_kernels = use_fast_kernels
        self._isq_tensor_names: set[str] = set()   # checkpoint names of the ISQ layers' weights and biases
        self._needed_shapes: dict[str, tuple[int, ...]] = {}  # of those, the ones the model expects: their shapes

    def prepare(self, model: torch.nn.Module) -> None:
        """Reads the UQFF file and gives each ISQ layer its states (ValueError on a count or blob mismatch)."""
        layers = isq_layers(model, self.moqe)
        names = [name for layer in layers for name in layer.names]
        states = iter_uqff_file(self.path, len(names))
        embeddings = [m for m in model.modules() if isinstance(m, VocabEmbedding)]
        shapes: dict[str, tuple[int, ...]] = {}  # checkpoint tensor name -> its shape
        for layer in layers:
            layer_states = list(itertools.islice(states, len(layer.names)))
            for name, state in zip(layer.names, layer_states):
                shapes[f"{name}.weight"] = dequantized_shape(state)
                if state.bias is not None:
                    shapes[f"{name}.bias"] = tuple(state.bias.shape)
            if isinstance(layer.module, FusedMoE):
                layer.module.set_quant_method(UqffMoEMethod.from_states(
                    _local_expert_states(layer.module, layer_states), self.use_fast_kernels))
                continue
            weight = layer.module._parameters.get("weight")
            tied_to = next((e for e in embeddings if weight is not None and e.weight is weight), None)
            method = UqffLinearMethod.from_states(_local_linear_states(layer.module, layer_states),
                                                  self.use_fast_kernels)
            method.stored_quantized = any(state.dense is None for state in layer_states)
            layer.module.set_quant_method(method)
            if tied_to is not None:
                tied_to.tie_head(layer.module)
        self._isq_tensor_names = {f"{name}.{attr}" for name in names for attr in ("weight", "bias")}
        expected = model.expected_weight_names()
        self._needed_shapes = {name: shape for name, shape in shapes.items() if name in expected}

    def checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """`weights` without the ISQ layers' tensors, then a placeholder of its shape on the meta device for each
        ISQ tensor the model expects (cut like the real tensor under tensor parallelism, then dropped by the UQFF
        methods). Iterate only after `prepare`."""
        for name, tensor in weights:
            if name not in self._isq_tensor_names:
                yield name, tensor
        for name in sorted(self._needed_shapes):
            yield name, torch.empty(self._needed_shapes[name], device="meta")


def _local_linear_states(linear: Linear, states: Sequence[IsqLayerState]) -> list[IsqLayerState]:
    """This rank's pieces of a `Linear`'s states (the states themselves without a split): each weight and bias cut
    by `Linear.local_pieces`, so a state the file stores for a fused projection becomes one per part."""
    if linear.tp is None:
        return list(states)
    local = []
    for index, state in enumerate(states):
        shard_index = None if len(states) == 1 else index
        weights = linear.local_pieces("weight", state.weight, shard_index)
        biases = (linear.local_pieces("bias", state.bias, shard_index) if state.bias is not None
                  else itertools.repeat((None, None)))
        local += [IsqLayerState.of(weight, None if bias is None else bias.float()).owned()
                  for (weight, _), (bias, _) in zip(weights, biases)]
    return local


def _local_expert_states(moe: FusedMoE, states: Sequence[IsqLayerState]) -> list[IsqLayerState]:
    """This rank's pieces of a `FusedMoE`'s expert states (ROLES order), cut by `FusedMoE.local_piece`."""
    if moe.tp_group is None:
        return list(states)
    return [IsqLayerState.of(moe.local_piece(ROLES[index % len(ROLES)], state.weight), state.bias).owned()
            for index, state in enumerate(states)]


def resolve_uqff_path(source, from_uqff: str) -> str:
    """The local path of `from_uqff` inside the model repo `source` (a `ModelSource`); an absolute path is
    taken as is."""
    if os.path.isabs(from_uqff):
        if not os.path.isfile(from_uqff):
            raise ValueError(f"from_uqff {from_uqff!r}: no such file")
        return from_uqff
    return source.get(from_uqff)


def residual_weights(model: torch.nn.Module, checkpoint_paths: Sequence[str], dtype: torch.dtype,
                     moqe: bool = False, rename: Callable[[str], str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the checkpoint files that the model uses outside its ISQ layers (embeddings, norms, the
    biases of layers left out of ISQ, routers, ...), floating ones cast to `dtype`: what residual.safetensors
    holds. Only those tensors are read. `rename`: the model's name of a file's tensor name (a vision model reads
    several checkpoint layouts), also the name written."""
    isq_names = {f"{name}.{attr}" for name in isq_layer_names(model, moqe) for attr in ("weight", "bias")}
    used = model.expected_weight_names() - isq_names
    for path in checkpoint_paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                model_name = rename(name) if rename is not None else name
                if model_name in used:
                    tensor = f.get_tensor(name)
                    yield model_name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_model_uqff(path: str, model: torch.nn.Module, checkpoint_paths: Sequence[str], dtype: torch.dtype,
                     source_files: dict[str, str | None], moqe: bool = False,
                     rename: Callable[[str], str] | None = None) -> None:
    """Writes a loaded ISQ model as UQFF (`write_uqff`): its ISQ layer states to `path`, the residual tensors of
    the checkpoint files (in the model dtype; `rename`: see `residual_weights`) and the config/tokenizer files
    beside it."""
    check_uqff_path(path)
    states = isq_layer_states(model, moqe)
    write_uqff_dir(path, states, residual_weights(model, checkpoint_paths, dtype, moqe, rename), source_files,
                   dtype)
