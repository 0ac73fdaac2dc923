"""The forms a linear weight takes for one matmul kernel, behind one small interface.

A quantized linear method keeps, per layer, one or more `PackedWeight`s covering consecutive output rows
(one for a plain layer or a fused projection whose shards share a type; several when fused shards differ).
`DenseWeight` is the plain form every fast form is tested against (DESIGN rule 8). `BlockTiledWeight` keeps
GGML blocks as they are and dequantizes them tile by tile inside `matmul`: the form of every GGML type on any
device and activation dtype that has no dedicated kernel, so that no weight is ever held dense.

Each form also tells the fused C++ decoder layer (mistralrs/layers/fused_decode.py) how it packs:
`fused_part()` is its `FusedLinearPart` (a `LinearKind` and its tensors), or None for a form the C++ side does
not compute (the layer then runs its plain modules).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import dequantize_rows

# Weights dequantized per tile by `BlockTiledWeight`: 1 MiB of float32 on the CPU (the tile stays in cache while
# it is multiplied); on CUDA large enough that most weights go in one piece.
TILE_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}


class LinearKind(enum.IntEnum):
    """How the fused C++ decoder layer computes one packed weight (`LinearKind` of layers/fused_decode.cpp)."""

    DENSE = 0  # at::linear(x, weight, bias)
    INT4 = 1  # torch's CPU int4 kernel, one plane (Int4CpuWeight)
    INT4_PAIR = 2  # the same kernel over two planes fed 16 x then x (Int4CpuPairWeight)
    QDOT = 3  # GGML blocks against int8-quantized activations (QdotWeight, mistralrs/quant/qdot.py)


class FusedLinearPart(NamedTuple):
    """One packed weight as the fused C++ decoder layer takes it (the arguments of its `make_linear_part`)."""

    kind: LinearKind  # how the C++ side computes it
    group_size: int  # int4 kinds: inputs per (scale, zero) pair; QDOT: the GGML type number; 0 for a dense weight
    out_features: int  # output rows (int4 kinds: rows of `weight` beyond it are padding, dropped)
    weight: torch.Tensor  # the dense weight, the int4 codes in torch's packed layout, or GGML blocks (QDOT)
    scales_and_zeros: torch.Tensor | None  # int4 kinds: [K / group_size, padded_out, 2]; None for dense


class PackedWeight:
    """A `[out_features, in_features]` weight stored for one kernel; `matmul(x)` is `x @ W^T`."""

    out_features: int  # output rows covered by this weight
    # True when `matmul` sums in float32 whatever the activation dtype and quantizes bfloat16 and float32
    # activations alike (their values are the same): `matmul(x.float())` is then the unrounded float32 result
    float_sums: bool = False

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., in_features]` (the model dtype) -> `[..., out_features]`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of weight storage."""
        raise NotImplementedError

    def fused_part(self) -> FusedLinearPart | None:
        """This weight as the fused C++ decoder layer computes it, bit for bit as `matmul` does; None (the
        default) when the C++ side has no such kernel."""
        return None

    def row_lookup(self) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None:
        """`(ids, dtype) -> [*ids.shape, in_features]`: rows of this weight read from its own storage, bit for bit
        the dequantized checkpoint rows, for a tied embedding table; None (the default) when the form has none."""
        return None


def matmul_all(weights: Sequence[PackedWeight], x: torch.Tensor) -> torch.Tensor:
    """`x @ W^T` for the weight whose consecutive output rows `weights` cover: each one's product, concatenated."""
    return weights[0].matmul(x) if len(weights) == 1 else torch.cat([w.matmul(x) for w in weights], dim=-1)


def runs_by_key(items: Sequence, keys: Sequence[Hashable]) -> list[list]:
    """`items` cut into runs of consecutive items with equal `keys` (the shards that are packed together)."""
    runs: list[list] = []
    for index, (item, key) in enumerate(zip(items, keys, strict=True)):
        if index and keys[index - 1] == key:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


class DenseWeight(PackedWeight):
    """A dense weight in the activation dtype; `F.linear`."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out_features, in_features]
        self.out_features = weight.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def fused_part(self) -> FusedLinearPart:
        return FusedLinearPart(LinearKind.DENSE, 0, self.out_features, self.weight, None)


class BlockTiledWeight(PackedWeight):
    """GGML blocks kept in memory; `matmul` dequantizes a tile of output rows at a time to the activation dtype,
    multiplies it, and concatenates the tiles' outputs (float32 dequantization, as the plain path)."""

    def __init__(self, tensor: GGMLTensor, tile_rows: int | None = None):
        self.tensor = tensor  # the blocks, [out_features, in_features] logically, on the compute device
        self.out_features = tensor.num_rows
        tile_elements = TILE_ELEMENTS.get(tensor.device.type, TILE_ELEMENTS["cpu"])
        self.tile_rows = tile_rows or max(1, tile_elements // tensor.num_cols)  # output rows per tile

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        data, ggml_type = self.tensor.data, self.tensor.ggml_type
        if self.tile_rows >= self.out_features:
            return F.linear(x, dequantize_rows(data, ggml_type).to(x.dtype))
        tiles = [F.linear(x, dequantize_rows(data[start:start + self.tile_rows], ggml_type).to(x.dtype))
                 for start in range(0, self.out_features, self.tile_rows)]
        return torch.cat(tiles, dim=-1)

    def nbytes(self) -> int:
        return self.tensor.data.numel()
