"""Reading a GGUF file's header (metadata key/values and tensor table) into plain Python values, fast.

`gguf.GGUFReader` builds a numpy view for every element of every array while it opens a file, which takes
seconds on a vocabulary of 50k-260k tokens (about 14 s for Gemma 3's 262k-token vocabulary on a laptop
core). The header format is simple (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
so it is parsed here with `struct` straight from a memory map: strings are decoded once, numeric arrays are
read in one `numpy.frombuffer` call. The `gguf` package still supplies the constants (value types, magic,
block sizes), so the two stay in step.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)

# Fixed-size scalar types: struct format character (without byte order) and numpy dtype character.
_SCALAR_FORMATS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"), GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"), GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"), GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.UINT64: ("Q", "u8"), GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT32: ("f", "f4"), GGUFValueType.FLOAT64: ("d", "f8"),
    GGUFValueType.BOOL: ("?", "?"),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor of a GGUF file lives and how it is stored."""

    name: str                  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]     # torch (row-major) order: the reverse of ggml's `ne`
    ggml_type: int             # a gguf.GGMLQuantizationType value
    offset: int                # absolute byte offset of the tensor data in the file
    nbytes: int                # size of the stored data in bytes


@dataclass
class GGUFHeader:
    """The parsed header of one GGUF file."""

    path: str                                                     # the file this header was read from
    version: int                                                  # GGUF format version (2 or 3)
    metadata: dict[str, Any] = field(default_factory=dict)        # key → plain Python value, in file order
    tensors: list[GGUFTensorInfo] = field(default_factory=list)   # in file order
    data_offset: int = 0                                          # where the aligned tensor data starts


class _Cursor:
    """Sequential little/big-endian reads over a memory-mapped GGUF file."""

    def __init__(self, buf: mmap.mmap, path: str, byte_order: str) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0
        self.byte_order = byte_order                         # "<" or ">"
        self._u64 = struct.Struct(byte_order + "Q").unpack_from

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(self.byte_order + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        (length,) = self._u64(self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + length
        if self.pos > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (a string runs past the end of the file)")
        return self.buf[start:self.pos].decode("utf-8")

    def string_array(self, count: int) -> list[str]:
        """`count` length-prefixed strings; the hot loop for vocabularies and merge tables."""
        buf, unpack, pos = self.buf, self._u64, self.pos
        if count * 8 > len(buf) - pos:  # each string needs at least its 8-byte length
            raise ValueError(f"{self.path}: truncated GGUF header (a string array runs past the end of the file)")
        out = [""] * count
        for i in range(count):
            (length,) = unpack(buf, pos)
            pos += 8
            out[i] = buf[pos:pos + length].decode("utf-8")
            pos += length
        self.pos = pos
        return out

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type][0])
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            element_type = self.scalar("I")
            count = self.scalar("Q")
            return self.array(element_type, count)
        raise ValueError(f"{self.path}: unknown GGUF value type {value_type} at byte {self.pos}")

    def array(self, element_type: int, count: int) -> list:
        if element_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[element_type][1]).newbyteorder(self.byte_order)
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ValueError(f"{self.path}: truncated GGUF header (an array runs past the end of the file)")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos = end
            return values
        if element_type == GGUFValueType.STRING:
            return self.string_array(count)
        return [self.value(element_type) for _ in range(count)]


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...], path: str, name: str) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except KeyError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    num_elements = 1
    for dim in shape:
        num_elements *= dim
    return num_elements // block_size * type_size


def _read_tensor_table(cur: _Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    entries = []
    for _ in range(count):
        name = cur.string()
        num_dims = cur.scalar("I")
        ne = struct.unpack_from(f"{cur.byte_order}{num_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * num_dims
        ggml_type = cur.scalar("I")
        relative_offset = cur.scalar("Q")
        entries.append((name, tuple(reversed(ne)), ggml_type, relative_offset))
    return entries


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse the metadata and tensor table of one GGUF file without touching its tensor data."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError(f"{path}: empty file, not a GGUF file") from None
    with buf:
        if len(buf) < 24 or struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        byte_order = "<"
        version = struct.unpack_from("<I", buf, 4)[0]
        if version & 0xFFFF == 0:  # written on a big-endian machine
            byte_order = ">"
            version = struct.unpack_from(">I", buf, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
        cur = _Cursor(buf, path, byte_order)
        cur.pos = 8
        tensor_count = cur.scalar("Q")
        kv_count = cur.scalar("Q")
        metadata: dict[str, Any] = {}
        try:
            for _ in range(kv_count):
                key = cur.string()
                metadata[key] = cur.value(cur.scalar("I"))
            entries = _read_tensor_table(cur, tensor_count)
        except struct.error as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from None
        alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = [GGUFTensorInfo(name, shape, ggml_type, data_offset + rel, _tensor_nbytes(ggml_type, shape, path, name))
               for name, shape, ggml_type, rel in entries]
    return GGUFHeader(path=path, version=version, metadata=metadata, tensors=tensors, data_offset=data_offset)


def read_gguf_metadata(paths: str | list[str]) -> dict[str, Any]:
    """The metadata of one GGUF file, or the merged metadata of a multi-file model (first file wins).

    Values are plain Python: str, int, float, bool, and lists of those (e.g. `tokenizer.ggml.tokens`
    as list[str], `tokenizer.ggml.scores` as list[float]).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("read_gguf_metadata: paths is empty; pass one or more .gguf file paths")
    merged: dict[str, Any] = {}
    for path in paths:
        for key, value in read_gguf_header(path).metadata.items():
            merged.setdefault(key, value)
    return merged
