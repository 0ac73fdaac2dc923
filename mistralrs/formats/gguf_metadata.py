"""Reading a GGUF file's header (metadata key/values and tensor table) into plain Python values, fast.

`gguf.GGUFReader` builds a numpy view for every element of every array while it opens a file, which takes
seconds on a vocabulary of 50k-260k tokens (about 14 s for Gemma 3's 262k-token vocabulary on a laptop
core). The header format is simple (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
so it is parsed here with `struct` straight from a memory map: strings are decoded once, numeric arrays are
read in one `numpy.frombuffer` call. The constants (value types, magic, block sizes) come from
mistralrs/formats/gguf_format.py, so reading a file never imports the `gguf` package.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mistralrs.formats.gguf_format import GGML_TYPES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType

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
    ggml_type: int             # a ggml type id, a key of gguf_format.GGML_TYPES
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
        out = [""] * count  # bounded by the file size (`array` checked it)
        for i in range(count):
            (length,) = unpack(buf, pos)
            pos += 8
            out[i] = buf[pos:pos + length].decode("utf-8")
            pos += length
        if pos > len(buf):
            raise ValueError(f"{self.path}: truncated GGUF header (a string runs past the end of the file)")
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
        if element_type not in _MIN_VALUE_BYTES:
            raise ValueError(f"{self.path}: unknown GGUF array element type {element_type} at byte {self.pos}")
        if count * _MIN_VALUE_BYTES[element_type] > len(self.buf) - self.pos:  # checked before allocating
            raise ValueError(f"{self.path}: truncated GGUF header (an array of {count} elements runs past the end "
                             f"of the file)")
        if element_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[element_type][1]).newbyteorder(self.byte_order)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        if element_type == GGUFValueType.STRING:
            return self.string_array(count)
        return [self.value(element_type) for _ in range(count)]


# Fewest bytes a value of each type takes: scalars their size, a string its 8-byte length, an array its element
# type (4) and count (8).
_MIN_VALUE_BYTES: dict[int, int] = {**{value_type: struct.calcsize(fmt) for value_type, (fmt, _) in
                                       _SCALAR_FORMATS.items()},
                                    GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
GGUF_HEADER_BYTES = 24  # magic (4), version (4), tensor count (8), metadata key count (8)
GGML_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
_MIN_KV_BYTES = 13  # key length (8) + value type (4) + the smallest value (1)
_MIN_TENSOR_INFO_BYTES = 24  # name length (8) + dimension count (4) + type (4) + offset (8)


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...], path: str, name: str) -> int:
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type id {ggml_type} "
                         f"(known ids: {sorted(GGML_TYPES)})")
    block_size, type_size = GGML_TYPES[ggml_type].block_size, GGML_TYPES[ggml_type].type_size
    if shape and shape[-1] % block_size:
        raise ValueError(f"{path}: tensor {name!r} has rows of {shape[-1]} values, not a multiple of its type's "
                         f"block size {block_size}")
    num_elements = 1
    for dim in shape:
        num_elements *= dim
    return num_elements // block_size * type_size


def _read_tensor_table(cur: _Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    entries = []
    for index in range(count):
        name = f"#{index}"
        try:
            name = cur.string()
            num_dims = cur.scalar("I")
            if num_dims > GGML_MAX_DIMS:
                raise ValueError(f"{num_dims} dimensions (at most {GGML_MAX_DIMS})")
            ne = struct.unpack_from(f"{cur.byte_order}{num_dims}Q", cur.buf, cur.pos)
            cur.pos += 8 * num_dims
            ggml_type = cur.scalar("I")
            relative_offset = cur.scalar("Q")
        except (struct.error, ValueError) as e:
            raise ValueError(f"{cur.path}: truncated or corrupt GGUF tensor table at tensor {name!r} ({e})") from None
        entries.append((name, tuple(reversed(ne)), ggml_type, relative_offset))
    return entries


def _read_metadata(cur: _Cursor, count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for index in range(count):
        key = f"#{index}"
        try:
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{cur.path}: truncated or corrupt GGUF metadata at key {key!r} ({e})") from None
    return metadata


def _check_counts(buf: mmap.mmap, path: str, tensor_count: int, kv_count: int) -> None:
    """Counts that could not fit in the file are corruption (and would otherwise loop for ages)."""
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > len(buf):
        raise ValueError(f"{path}: truncated or corrupt GGUF header: {kv_count} metadata keys and {tensor_count} "
                         f"tensors cannot fit in a file of {len(buf)} bytes")


def _alignment(metadata: dict[str, Any], path: str) -> int:
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment must be a positive power of two, got {alignment!r}")
    return alignment


def _check_tensor_data(tensors: list[GGUFTensorInfo], path: str, file_size: int, alignment: int,
                       data_offset: int) -> None:
    """Every tensor's bytes are aligned, inside the file, and disjoint from the others'."""
    seen: set[str] = set()
    for info in tensors:
        if info.name in seen:
            raise ValueError(f"{path}: tensor {info.name!r} appears twice in the tensor table")
        seen.add(info.name)
        if (info.offset - data_offset) % alignment:
            raise ValueError(f"{path}: tensor {info.name!r} starts at data offset {info.offset - data_offset}, "
                             f"not a multiple of the alignment {alignment} (corrupt tensor table)")
        if info.offset + info.nbytes > file_size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {info.name!r} needs bytes up to "
                             f"{info.offset + info.nbytes}, the file has {file_size}")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for first, second in itertools.pairwise(ordered):
        if first.offset + first.nbytes > second.offset:
            raise ValueError(f"{path}: tensors {first.name!r} and {second.name!r} overlap in the file "
                             f"(corrupt tensor table: a wrong type or shape)")


def _check_magic(buf: mmap.mmap, path: str) -> None:
    """A GGUF file starts with the magic and holds at least the fixed part of the header."""
    magic = GGUF_MAGIC.to_bytes(4, "little")
    if not magic.startswith(bytes(buf[:4])):  # a file shorter than 4 bytes may still start like one
        raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r}, expected {magic!r})")
    if len(buf) < GGUF_HEADER_BYTES:
        raise ValueError(f"{path}: truncated GGUF file: {len(buf)} bytes, less than the {GGUF_HEADER_BYTES}-byte "
                         f"header")


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse the metadata and tensor table of one GGUF file without touching its tensor data.

    ValueError names the file (and the key or tensor) for a file that is not GGUF, of an unsupported version,
    truncated (the header, or any tensor's data running past the end), or corrupt (unknown tensor type id,
    impossible counts or dimensions, misaligned or overlapping tensor data, bad alignment).
    """
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError(f"{path}: empty file, not a GGUF file") from None
    with buf:
        _check_magic(buf, path)
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
        _check_counts(buf, path, tensor_count, kv_count)
        metadata = _read_metadata(cur, kv_count)
        entries = _read_tensor_table(cur, tensor_count)
        alignment = _alignment(metadata, path)
        data_offset = (cur.pos + alignment - 1) // alignment * alignment
        file_size = len(buf)
    tensors = [GGUFTensorInfo(name, shape, ggml_type, data_offset + rel, _tensor_nbytes(ggml_type, shape, path, name))
               for name, shape, ggml_type, rel in entries]
    _check_tensor_data(tensors, path, file_size, alignment, data_offset)
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
