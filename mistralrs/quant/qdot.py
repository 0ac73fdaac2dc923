"""GGML blocks multiplied as they are in the file, against int8-quantized activations (llama.cpp's decode scheme).

`QdotWeight` keeps a weight's GGML blocks, repacked once at load into groups of 8 interleaved rows (as many
bytes as the file's blocks for every type: Q5_0 and Q5_1 keep their codes' low nibbles as Q4_0 does and their
fifth bits in a plane of their own; layout in mistralrs/layers/qdot/legacy.h), and multiplies them with the C++
kernels of mistralrs/layers/qdot/ (compiled into the fused decoder layer's extension,
mistralrs/layers/fused_decode.py): each activation row is quantized to blocks of 32 int8 codes with a float32
scale d = max|x| / 127, and each output is a sum over blocks of exact integer dot products (AVX512-VNNI
`vpdpbusd`, AMX-INT8 `tdpbssd` for large Q8_0 weights at 4-16 rows, AVX2 `pmaddubsw`, or portable C++: the best
the CPU has, chosen at run time) scaled in float32. Output rows are split across the engine thread's intra-op
threads. From 48
activation rows on (prefill; the extension's `QDOT_DENSE_ROWS`), row tiles are dequantized as gguf does and
multiplied by `F.linear` instead (bfloat16 activations: each group of 8 rows dequantized into a float32 buffer of
its thread's and rounded to bfloat16 into the tile, the plain path's weight bit for bit; on a CPU with AMX,
oneDNN multiplies the tile with AMX tiles). The
fused decoder layer calls the same kernel (`LinearKind.QDOT`), so the two agree bit for bit. A tied embedding
table looks its rows up in the same packed weight (`embedding_rows`): the table is held once.

The K-quant types (Q2_K..Q6_K, `KQUANT_TYPES`) keep their blocks as they are in the file (copied out of its
map), quantize activations in blocks of 256 with the sum of each 16 codes (llama.cpp's Q8_K), and multiply the
codes with pmaddubsw and the scales of each 16 or 32 weights with vpdpwssd / pmaddwd
(mistralrs/layers/qdot/kquants.h).

`QDOT_TYPES` lists the GGML types with a kernel. `qdot_reference` is the same int8 arithmetic in plain PyTorch
(exact integer sums, float64 scaling): the kernels match it to float32 rounding, and it bounds their distance
from the exact product (`activation_error_bound`), which the tests check against the `gguf` package's
dequantizer.

A weight takes this form at load on the CPU with bfloat16 activations when the extension is built
(mistralrs/quant/gguf_linear.py); while it is not (its first build runs in the background), the weight takes
torch's int4 form as before (mistralrs/quant/cpu_int4.py), for the life of the model.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from mistralrs.layers.fused_decode import EXTENSION
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import block_type
from mistralrs.quant.packed import FusedLinearPart, LinearKind, PackedWeight

# GGML type name -> its number in ggml.h, as the kernels take it: the 32-weight legacy blocks (Q8_0-style
# activation blocks, mistralrs/layers/qdot/legacy.h) and the 256-weight K-quant super-blocks (Q8_K-style
# activation blocks, mistralrs/layers/qdot/kquants.h)
LEGACY_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}
KQUANT_TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
QDOT_TYPES = LEGACY_TYPES | KQUANT_TYPES
ACTIVATION_BLOCK = 32  # activation values per int8 block (one scale each) of the legacy types
GROUP_ROWS = 8  # rows interleaved in one packed group of the legacy types (legacy.h kGroupRows)
PACK_CHUNK_BYTES = 8 << 20  # file bytes of a legacy-type weight packed at a time
KQUANT_ACTIVATION_BLOCK = 256  # ... of the K-quant types, which also keep the sum of the codes of each 16


def activation_block(ggml_type: str) -> int:
    """Activation values per int8 block (one float32 scale each) for weights of `ggml_type`."""
    return KQUANT_ACTIVATION_BLOCK if ggml_type in KQUANT_TYPES else ACTIVATION_BLOCK


class QdotWeight(PackedWeight):
    """A `[out_features, in_features]` weight of GGML blocks repacked for the quantized dot-product kernels.

    `matmul` runs the integer kernels for a few activation rows (decode) and, from `QDOT_DENSE_ROWS` rows on
    (mistralrs/layers/qdot/qdot.h kDenseRows), dequantizes tiles of rows and multiplies them with `F.linear` as the
    plain path does. `embedding_rows` looks rows up for a tied embedding table, bit for bit gguf's dequantization.
    """

    float_sums = True  # the int8 sums are scaled in float32; float32 and bfloat16 rows quantize alike

    def __init__(self, tensor: GGMLTensor):
        if tensor.ggml_type not in QDOT_TYPES:
            raise ValueError(f"ggml_type {tensor.ggml_type!r} has no quantized dot product; "
                             f"supported: {', '.join(QDOT_TYPES)}")
        self.ggml_type = tensor.ggml_type
        self.type_number = QDOT_TYPES[tensor.ggml_type]
        self.out_features = tensor.num_rows
        self.in_features = tensor.num_cols
        extension = EXTENSION.get()
        # shape propagation (FakeTensorMode: device-map planning) has no bytes to pack or multiply: the weight then
        # only gives its outputs' shapes, and the fused layer runs the plain modules
        self.fake = is_fake(tensor.data)
        if self.fake:
            shape = extension.qdot_packed_shape(self.type_number, self.out_features, self.in_features)
            self.packed = tensor.data.new_empty(shape)
        elif self.ggml_type in LEGACY_TYPES:
            self.packed = _pack_in_chunks(extension, tensor, self.type_number)
        else:
            self.packed = _own_blocks(extension, tensor, self.type_number)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.fake:
            return x.new_empty(*lead, self.out_features)
        y = EXTENSION.get().qdot_matmul(x.reshape(-1, x.shape[-1]), self.packed, self.type_number,
                                        self.out_features)
        return y.reshape(*lead, self.out_features)

    def row_lookup(self):
        return self.embedding_rows

    def embedding_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (any shape) of the weight in `dtype`: gguf's float32 dequantization, then cast."""
        if self.fake:
            return self.packed.new_empty(*ids.shape, self.in_features, dtype=dtype)
        rows = EXTENSION.get().qdot_dequantize(self.packed, self.type_number, ids.reshape(-1), self.in_features)
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    def nbytes(self) -> int:
        return self.packed.numel()

    def fused_part(self) -> FusedLinearPart | None:
        if self.fake:
            return None
        return FusedLinearPart(LinearKind.QDOT, self.type_number, self.out_features, self.packed, None)


def _pack_in_chunks(extension, tensor: GGMLTensor, type_number: int) -> torch.Tensor:
    """`qdot_pack` of a legacy-type tensor (uint8 `[groups of 8 rows, bytes]`, the kernels' layout), packed
    `PACK_CHUNK_BYTES` of blocks at a time, each chunk's file pages released once it is packed (when the tensor has
    `release_pages`): a tied 262144-row Q8_0 table (Gemma 3, 178 MB) never has its file pages and its packed copy
    resident at once."""
    shape = extension.qdot_packed_shape(type_number, tensor.num_rows, tensor.num_cols)
    packed = torch.empty(shape, dtype=torch.uint8, device=tensor.device)
    chunk_rows = max(1, PACK_CHUNK_BYTES // (GROUP_ROWS * tensor.data.shape[1])) * GROUP_ROWS
    for start in range(0, tensor.num_rows, chunk_rows):
        stop = min(start + chunk_rows, tensor.num_rows)
        packed[start // GROUP_ROWS:-(-stop // GROUP_ROWS)] = extension.qdot_pack(tensor.data[start:stop], type_number)
        if tensor.release_pages is not None:
            tensor.release_pages(start, stop)
    return packed


def _own_blocks(extension, tensor: GGMLTensor, type_number: int) -> torch.Tensor:
    """`qdot_pack` of a K-quant tensor (its blocks as they are) in memory of its own, the file pages released,
    when the tensor is a view of the file map: a weight read in place from the map would have as resident
    whatever its page faults bring in around it (readahead, fault-around: Gemma 3's 22 MB of K-quant weights kept
    51-64 MB of the file resident, depending on what the page cache held)."""
    blocks = extension.qdot_pack(tensor.data, type_number)
    if tensor.release_pages is None:
        return blocks
    owned = blocks.clone()
    tensor.release_pages(0, tensor.num_rows)
    return owned


def qdot_available() -> bool:
    """Whether the kernels can run now (the extension is built and imported); starts its build otherwise."""
    return EXTENSION.get() is not None


def quantize_activations(x: torch.Tensor, block: int = ACTIVATION_BLOCK
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` as the kernels quantize it in blocks of `block` values: (int8 codes `[M, K]`, float32 scales
    d `[M, K / block]`, int32 sum(codes) `[M, K / block]`, float32 d * sum(codes) `[M, K / block]`).
    q = round half to even of x * (1 / d), d = max|x| / 127 per block (q = 0 for an all-zero block): float32
    operations in the kernel's order, so the two agree bit for bit."""
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"in_features={cols} is not a multiple of {block}")
    blocks = x.float().reshape(rows, -1, block)
    scale = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(blocks * inverse.unsqueeze(-1)).to(torch.int8)
    sums = codes.sum(dim=-1, dtype=torch.int32)
    return codes.reshape(rows, cols), scale, sums, scale * sums.float()


def qdot_reference(x: torch.Tensor, tensor: GGMLTensor) -> torch.Tensor:
    """float64 `x @ W^T` with `x` quantized as the kernels do and exact integer sums per group of weights sharing
    a scale: the kernels' result before their float32 rounding. `tensor`: GGML blocks of a `QDOT_TYPES` type,
    `[out_features, K]`."""
    block = activation_block(tensor.ggml_type)
    codes, scale, _, _ = quantize_activations(x, block)
    fmt = block_type(tensor.ggml_type)
    affine = fmt.decode(tensor.data.reshape(-1, fmt.type_size))
    rows, group = tensor.num_rows, affine.group_size
    weight_codes = affine.codes.reshape(rows, -1, group).double()  # [N, groups, group]
    q = codes.reshape(codes.shape[0], -1, group).double()  # [M, groups, group]
    sums = torch.einsum("ngi,mgi->mng", weight_codes, q)  # integers, exact in float64
    w_scale = affine.scale.reshape(rows, -1).double()
    x_scale = scale.double().repeat_interleave(block // group, dim=1)  # [M, groups]
    y = (sums * w_scale * x_scale.unsqueeze(1)).sum(-1)
    if affine.bias is not None:
        y = y + (affine.bias.reshape(rows, -1).double() * (x_scale * q.sum(-1)).unsqueeze(1)).sum(-1)
    return y


def activation_error_bound(x: torch.Tensor, dequantized: torch.Tensor, block: int = ACTIVATION_BLOCK
                           ) -> torch.Tensor:
    """A bound on |qdot_reference(x, W) - x @ W^T| per output `[M, N]`, W = `dequantized` `[N, K]` (float), for
    activation blocks of `block` values: each activation block is off by at most d / 2 per value
    (d = max|x| / 127 of the block; the product by 1/d and its rounding add at most a few units of float32
    rounding of x, covered by the factor 0.51), so an output is off by at most sum over blocks of
    0.51 d * sum |w| of the weights in the block."""
    rows = x.shape[0]
    scale = x.double().reshape(rows, -1, block).abs().amax(-1) / 127  # [M, blocks]
    weight_mass = dequantized.double().abs().reshape(dequantized.shape[0], -1, block).sum(-1)
    return 0.51 * scale @ weight_mass.T
