"""The ISQ types (REFERENCE §3) and the parsing of their names.

Accepted names, case-insensitive: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K, HQQ4, HQQ8,
FP8 (E4M3). The K-quants may also be spelled as GGML names (`Q4_K`), a superset of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IsqType:
    """One ISQ type: how a weight is quantized."""

    name: str                    # canonical reference name, e.g. "Q4K"
    kind: str                    # "ggml", "hqq" or "fp8"
    ggml_type: str | None = None  # GGML block type for kind "ggml", e.g. "Q4_K"
    bits: int | None = None      # HQQ bits (4 or 8)

    @property
    def supports_imatrix(self) -> bool:
        """Only GGML block quantization takes an importance matrix."""
        return self.kind == "ggml"


_GGML_NAMES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q8_1": "Q8_1",
               "Q2K": "Q2_K", "Q3K": "Q3_K", "Q4K": "Q4_K", "Q5K": "Q5_K", "Q6K": "Q6_K", "Q8K": "Q8_K"}

ISQ_TYPES: dict[str, IsqType] = {
    **{name: IsqType(name, "ggml", ggml_type=ggml) for name, ggml in _GGML_NAMES.items()},
    "HQQ4": IsqType("HQQ4", "hqq", bits=4),
    "HQQ8": IsqType("HQQ8", "hqq", bits=8),
    "FP8": IsqType("FP8", "fp8"),
}

# GGML names of the K-quants (Q4_K) as aliases of the reference names (Q4K).
_ALIASES = {ggml: name for name, ggml in _GGML_NAMES.items() if ggml != name}

# When a weight's input width is not a multiple of the block size: the type tried next (the reference's
# fallbacks, mistralrs-quant utils/isq.rs); a type with no fallback leaves the weight unquantized.
GGML_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q4_1", "Q5_K": "Q5_0", "Q6_K": "Q5_1", "Q8_K": "Q8_1"}

# Block sizes (values per block) of the GGML types ISQ produces.
GGML_BLOCK_SIZE = {**{t: 32 for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1")},
                   **{t: 256 for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")}}


def parse_isq_type(value: str | IsqType) -> IsqType:
    """The ISQ type named `value` (case-insensitive); ValueError listing the accepted names otherwise."""
    if isinstance(value, IsqType):
        return value
    key = str(value).strip().upper()
    key = _ALIASES.get(key, key)
    if key not in ISQ_TYPES:
        raise ValueError(f"ISQ type {value} unknown, choose one of {', '.join(ISQ_TYPES)}")
    return ISQ_TYPES[key]


def ggml_type_for_width(ggml_type: str, num_cols: int) -> str | None:
    """The GGML type a weight of `num_cols` input columns gets: `ggml_type` when its block divides the width,
    else the fallback chain's first that does; None when none does (the weight stays unquantized)."""
    current: str | None = ggml_type
    while current is not None and num_cols % GGML_BLOCK_SIZE[current]:
        current = GGML_FALLBACK.get(current)
    return current
