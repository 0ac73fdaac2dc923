"""The constants of the GGUF container and ggml's tensor types, as llama.cpp defines them.

They are written out here (from ggml/include/ggml.h, ggml/src/ggml.c and docs/gguf.md of llama.cpp) rather than
taken from the `gguf` Python package, so that reading a model never imports `gguf`: a user's script named
`gguf.py` (the reference's own example is) would otherwise be imported in its place. tests/loader/
test_gguf_format.py checks every entry against the `gguf` package.

Each type also lists its float fields (ggml-common.h's block structs): the only place a NaN or an infinity can
hide in a block, since codes are small integers and codebooks finite. `nonfinite_block` reads just those bytes,
so the loader checks every tensor for NaN and infinite weights in a few percent of its load time instead of
dequantizing it (tests/loader/test_gguf_format.py holds it to the dequantizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

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
    """One ggml tensor type: its name, block geometry and the float fields of a block."""

    name: str  # ggml's name without the GGML_TYPE_ prefix, e.g. "Q4_K"
    block_size: int  # values per block (1 for the plain number types)
    type_size: int  # bytes per block
    floats: tuple[tuple[str, int], ...] = ()  # (encoding, byte offset) of each float field the values depend on


_D = (("f16", 0),)  # one f16 scale first in the block
_D_M = (("f16", 0), ("f16", 2))  # f16 scale and f16 minimum (or second scale) first
# ggml type id (the `ggml_type` a GGUF tensor table stores) → type. Ids 4, 5 and 31-33, 36-38 belonged to types
# ggml has removed. Q8_1 is ggml's 36-byte block (gguf-py's size table still says 40); its second f16 (d * sum of
# the codes) does not enter the values. NVFP4's e4m3 scales have no NaN as ggml decodes them; the integer types
# and Q1_0 (not loadable) list no fields.
GGML_TYPES: dict[int, GGMLType] = {type_id: GGMLType(*entry) for type_id, entry in {
    0: ("F32", 1, 4, (("f32", 0),)), 1: ("F16", 1, 2, (("f16", 0),)), 2: ("Q4_0", 32, 18, _D),
    3: ("Q4_1", 32, 20, _D_M), 6: ("Q5_0", 32, 22, _D), 7: ("Q5_1", 32, 24, _D_M), 8: ("Q8_0", 32, 34, _D),
    9: ("Q8_1", 32, 36, _D), 10: ("Q2_K", 256, 84, (("f16", 80), ("f16", 82))), 11: ("Q3_K", 256, 110, (("f16", 108),)),
    12: ("Q4_K", 256, 144, _D_M), 13: ("Q5_K", 256, 176, _D_M), 14: ("Q6_K", 256, 210, (("f16", 208),)),
    15: ("Q8_K", 256, 292, (("f32_scale", 0),)), 16: ("IQ2_XXS", 256, 66, _D), 17: ("IQ2_XS", 256, 74, _D),
    18: ("IQ3_XXS", 256, 98, _D), 19: ("IQ1_S", 256, 50, _D), 20: ("IQ4_NL", 32, 18, _D), 21: ("IQ3_S", 256, 110, _D),
    22: ("IQ2_S", 256, 82, _D), 23: ("IQ4_XS", 256, 136, _D), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8, (("f64", 0),)), 29: ("IQ1_M", 256, 56, (("iq1m_f16", 48),)),
    30: ("BF16", 1, 2, (("bf16", 0),)), 34: ("TQ1_0", 256, 54, (("f16", 52),)), 35: ("TQ2_0", 256, 66, (("f16", 64),)),
    39: ("MXFP4", 32, 17, (("e8m0", 0),)), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}.items()}

_CHECK_BLOCKS = 1 << 22  # blocks read per step of `nonfinite_block` (bounds its scratch memory)


def _field(blocks: np.ndarray, offset: int, num_bytes: int) -> np.ndarray:
    """The little-endian unsigned integer at bytes `[offset, offset + num_bytes)` of each block (a view)."""
    return blocks[:, offset:offset + num_bytes].view(f"<u{num_bytes}")[:, 0]


def _iq1m_d(blocks: np.ndarray, offset: int) -> np.ndarray:
    """IQ1_M's f16 scale: the top nibbles of the four uint16 at `offset`, lowest word first."""
    words = blocks[:, offset:offset + 8].view("<u2")
    return ((words[:, 0] >> 12) | ((words[:, 1] >> 8) & 0xF0) | ((words[:, 2] >> 4) & 0xF00)
            | (words[:, 3] & 0xF000))


# Encoding → (bytes read, test of the field's bits): True where the values may be NaN or infinite.
_NONFINITE = {
    "f16": (2, lambda bits: (bits & 0x7C00) == 0x7C00),
    "bf16": (2, lambda bits: (bits & 0x7F80) == 0x7F80),
    "f32": (4, lambda bits: (bits & 0x7F800000) == 0x7F800000),
    "f64": (8, lambda bits: (bits & 0x7FF0000000000000) == 0x7FF0000000000000),
    # Q8_K's f32 scale times a code of up to 128 overflows float32 from an exponent field of 248 (2^121) up
    "f32_scale": (4, lambda bits: ((bits >> 23) & 0xFF) >= 248),
    # MXFP4's exponent byte e scales by 2^(e - 128), times codes up to 12: e >= 253 can overflow float32
    "e8m0": (1, lambda bits: bits >= 253),
}


def nonfinite_block(blocks: np.ndarray, ggml_type: GGMLType) -> int | None:
    """Index of the first block (uint8 rows `[n, type_size]`) whose values can be NaN or infinite, else None."""
    for start in range(0, blocks.shape[0], _CHECK_BLOCKS):
        chunk = blocks[start:start + _CHECK_BLOCKS]
        bad = np.zeros(chunk.shape[0], dtype=bool)
        for encoding, offset in ggml_type.floats:
            if encoding == "iq1m_f16":
                bad |= _NONFINITE["f16"][1](_iq1m_d(chunk, offset))
            else:
                num_bytes, test = _NONFINITE[encoding]
                bad |= test(_field(chunk, offset, num_bytes))
        if bad.any():
            return start + int(np.argmax(bad))
    return None
