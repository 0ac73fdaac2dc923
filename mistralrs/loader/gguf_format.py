"""The constants of the GGUF container and ggml's tensor types, as llama.cpp defines them.

They are written out here (from ggml/include/ggml.h, ggml/src/ggml.c and docs/gguf.md of llama.cpp) rather than
taken from the `gguf` Python package, so that reading a model never imports `gguf`: a user's script named
`gguf.py` (the reference's own example is) would otherwise be imported in its place. tests/loader/
test_gguf_format.py checks every entry against the `gguf` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

GGUF_MAGIC = 0x46554747  # b"GGUF" read as a little-endian uint32
GGUF_DEFAULT_ALIGNMENT = 32  # tensor data alignment when `general.alignment` is absent


class GGUFValueType(IntEnum):
    """The type tag of a GGUF metadata value."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its name and block geometry."""

    name: str  # ggml's name without the GGML_TYPE_ prefix, e.g. "Q4_K"
    block_size: int  # values per block (1 for the plain number types)
    type_size: int  # bytes per block


# ggml type id (the `ggml_type` a GGUF tensor table stores) → type. Ids 4, 5 and 31-33, 36-38 belonged to types
# ggml has removed. Q8_1 is ggml's 36-byte block (gguf-py's size table still says 40).
GGML_TYPES: dict[int, GGMLType] = {type_id: GGMLType(name, block_size, type_size)
                                   for type_id, name, block_size, type_size in (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 36), (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
)}
