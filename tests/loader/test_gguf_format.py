"""The GGUF constants, ggml type table and IQ codebooks the package keeps itself (so that it never imports
`gguf`) against the `gguf` package, the test oracle."""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest

from mistralrs.formats.gguf_format import GGML_TYPES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType
from mistralrs.quant import iquant_types
from mistralrs.quant.ggml_types import BLOCK_TYPES
from mistralrs.quant.iq_grids import GRIDS, unpack_grid


def test_container_constants_match_gguf():
    assert GGUF_MAGIC == gguf.GGUF_MAGIC and GGUF_DEFAULT_ALIGNMENT == gguf.GGUF_DEFAULT_ALIGNMENT
    assert {t.name: int(t) for t in GGUFValueType} == {t.name: int(t) for t in gguf.GGUFValueType}


def test_ggml_types_match_gguf_except_q8_1_which_follows_ggml():
    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    ours = {type_id: (t.name, t.block_size, t.type_size) for type_id, t in GGML_TYPES.items()}
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {9: ("Q8_1", 32, 36)}  # gguf-py says 40 bytes


def test_every_block_format_has_the_sizes_of_its_ggml_type():
    by_name = {t.name: t for t in GGML_TYPES.values()}
    for name, fmt in BLOCK_TYPES.items():
        assert (fmt.block_size, fmt.type_size) == (by_name[name].block_size, by_name[name].type_size), name


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_iq_grids_match_gguf(name):
    quant = getattr(gguf.quants, name)
    quant.init_grid()
    np.testing.assert_array_equal(unpack_grid(GRIDS[name]), quant.grid.reshape(quant.grid_shape))


def test_iq_sign_table_and_iq4_values_match_gguf():
    np.testing.assert_array_equal(iquant_types._ksigns(), np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8))
    np.testing.assert_array_equal(iquant_types._iq4_values(), np.array(gguf.quants.IQ4_NL.kvalues))


# ---------------------------------------------------------------------------------------------------------
# nonfinite_block reads only the float fields of each block: held to the dequantizers on random blocks.

CONSERVATIVE = ("Q8_K", "MXFP4")  # their test also flags large finite scales that can overflow with big codes


def _random_blocks(fmt, rng) -> np.ndarray:
    return rng.integers(0, 256, size=(2048, fmt.type_size), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_nonfinite_block_agrees_with_the_dequantized_values(name):
    import torch

    from mistralrs.formats.gguf_format import nonfinite_block
    from mistralrs.quant.ggml_types import dequantize_rows

    ggml = next(t for t in GGML_TYPES.values() if t.name == name)
    blocks = _random_blocks(BLOCK_TYPES[name], np.random.default_rng(sum(map(ord, name))))
    flagged = np.array([nonfinite_block(blocks[i:i + 1], ggml) is not None for i in range(len(blocks))])
    nonfinite = ~torch.isfinite(dequantize_rows(torch.from_numpy(blocks), name)).all(dim=1).numpy()
    assert not (nonfinite & ~flagged).any(), "a block with NaN or infinite values was not flagged"
    if name in CONSERVATIVE:
        assert flagged.any()
    else:
        np.testing.assert_array_equal(flagged, nonfinite)
    if name != "NVFP4":  # its scales cannot be NaN: every random block is finite
        assert nonfinite.any()
    first = int(np.argmax(flagged)) if flagged.any() else None
    assert nonfinite_block(blocks, ggml) == first
