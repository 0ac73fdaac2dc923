"""Linear layers whose weights come from a GGUF file: GGML blocks kept quantized, one kernel chosen per layer.

`GGUFQuantConfig` gives every `Linear` of a model a `GGUFLinearMethod` before the weights load. The method
collects the layer's checkpoint tensors (one per fused shard: q/k/v or gate/up), and once all have arrived
builds the layer's `PackedWeight`s from their types (`build_packed_weight`):

- CPU, bfloat16 activations: the types with an int8-activation dot-product kernel (`QDOT_TYPES`: Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) keep their blocks as they are and run that kernel (`QdotWeight`, mistralrs/quant/qdot.py)
  when the C++ extension is built at load; every other type with an int4 form (all quantized types but
  MXFP4/NVFP4), and those too with `use_fast_kernels="int4"` or before the extension is built, is repacked for
  torch's CPU int4 kernel (`FAST_CPU_BF16_KERNELS`, see mistralrs/quant/cpu_int4.py);
- every other quantized case (those two types, float32/float16 activations, CUDA): `BlockTiledWeight` keeps the
  blocks and dequantizes them tile by tile inside the matmul (mistralrs/quant/packed.py);
- float tensors (F32/F16/BF16, dense or GGML-typed): a dense weight in the activation dtype;
- plain path (`use_fast_kernels=False`, the twin the others are tested against): every tensor dequantized
  once, at load, to the activation dtype on the layer's device, then `F.linear`.

So no quantized weight is held dense unless the plain path is asked for. Fused shards of the same type are
concatenated along the output rows and packed as one weight; runs of shards with different types become
separate weights whose outputs are concatenated.

Choices, measured on the 2-core development CPU (decode gemv, bfloat16, weights larger than the cache):
- Q8_0 takes the exact two-plane int4 form rather than a bfloat16 copy: SmolLM2's tied 49152x576 LM head runs
  in 2.4 ms against 9-12 ms for bf16 `F.linear` under the same load (4.4 against 7.5 ms on one thread), and
  stores 35 MB against 57 MB.
- One packed weight per fused projection rather than one per shard: qkv 960x576 27 us against 37 us as three
  calls, gate_up 3072x576 66 us against 73-80 us as two.
- The plain path dequantizes once at load and stays the reference; the tiled path dequantizes at every call
  (slower than a dense product on the CPU, but it holds only the blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mistralrs.layers.linear import Linear, LinearMethodBase
from mistralrs.quant.config import QuantConfig
from mistralrs.quant.cpu_int4 import int4_cpu_form, int4_cpu_from_ggml
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.ggml_types import BLOCK_TYPES, FLOAT_TYPES
from mistralrs.quant.packed import BlockTiledWeight, DenseWeight, PackedWeight, runs_by_key
from mistralrs.quant.packed_linear import PackedLinearMethod
from mistralrs.quant.qdot import QDOT_TYPES, QdotWeight, qdot_available

# GGML type → builder of its fast form on the CPU with bfloat16 activations.
FAST_CPU_BF16_KERNELS: dict[str, Callable[[GGMLTensor, torch.dtype], PackedWeight]] = {
    name: int4_cpu_from_ggml for name in BLOCK_TYPES if int4_cpu_form(name) is not None
}

CheckpointTensor = torch.Tensor | GGMLTensor


def _kind(tensor: CheckpointTensor) -> str:
    """Shards of the same kind are concatenated before packing."""
    return tensor.ggml_type if isinstance(tensor, GGMLTensor) else "dense"


def build_packed_weight(tensor: CheckpointTensor, dtype: torch.dtype, device: torch.device,
                        use_fast_kernels: bool | str) -> PackedWeight:
    """The compute form of one weight for `dtype` activations on `device` (see the module doc): the blocks with
    the int8 dot-product kernel, an int4 form, blocks dequantized per tile, or (float tensors, and everything
    when `use_fast_kernels` is False) dense. `use_fast_kernels="int4"` leaves out the int8 dot-product form."""
    device = torch.device(device)
    if not isinstance(tensor, GGMLTensor):
        return DenseWeight(tensor.to(device=device, dtype=dtype))
    if not use_fast_kernels or tensor.ggml_type in FLOAT_TYPES:
        return DenseWeight(tensor.to(device).dequantize(dtype))
    if device.type == "cpu" and dtype == torch.bfloat16:
        if use_fast_kernels != "int4" and tensor.ggml_type in QDOT_TYPES and qdot_available():
            return QdotWeight(tensor.to(device))
        fast = FAST_CPU_BF16_KERNELS.get(tensor.ggml_type)
        if fast is not None:
            return fast(tensor, dtype)
    on_device = tensor.to(device)
    if on_device is tensor:  # own the bytes: the loader's tensors are views of the memory-mapped file
        on_device = tensor.with_rows(tensor.data.clone())
    return BlockTiledWeight(on_device)


def _cat_shards(shards: Sequence[CheckpointTensor]) -> CheckpointTensor:
    if len(shards) == 1:
        return shards[0]
    if isinstance(shards[0], GGMLTensor):
        return GGMLTensor.cat_rows(shards)
    return torch.cat(list(shards))


def pack_checkpoint_tensors(shards: Sequence[CheckpointTensor], dtype: torch.dtype, device: torch.device,
                            use_fast_kernels: bool | str) -> list[PackedWeight]:
    """The compute forms of a weight's consecutive shards: runs of one kind, each concatenated and packed."""
    return [build_packed_weight(_cat_shards(run), dtype, device, use_fast_kernels)
            for run in runs_by_key(shards, [_kind(shard) for shard in shards])]


class GGUFLinearMethod(PackedLinearMethod):
    """One layer's weights from GGUF tensors (GGML blocks or dense), packed for a kernel once all shards arrive.

    One instance per layer. After loading, `weights` lists the layer's `PackedWeight`s in output-row order.
    """

    def __init__(self, use_fast_kernels: bool | str = True):
        super().__init__(use_fast_kernels)
        self._pending: list[CheckpointTensor | None] = []  # per fused shard, until all have arrived

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device | str) -> None:
        super().create_weights(layer, dtype, device)
        self._pending = [None] * len(layer.output_partition_sizes)

    def store_weight(self, layer: Linear, shard_index: int | None, loaded: CheckpointTensor) -> None:
        if shard_index is None:
            self._pending = [loaded]
        else:
            self._pending[shard_index] = loaded
        if all(shard is not None for shard in self._pending):
            self.weights = pack_checkpoint_tensors(self._pending, self._dtype, self._device, self.use_fast_kernels)
            self._pending = []


@dataclass(frozen=True)
class GGUFQuantConfig(QuantConfig):
    """Every Linear loads through a `GGUFLinearMethod`; the one switch between fast kernels and the plain path."""

    # False: dequantize every weight at load and use F.linear (the reference); "int4": no int8 dot products
    use_fast_kernels: bool | str = True

    def linear_method(self, layer: Linear) -> LinearMethodBase:
        return GGUFLinearMethod(self.use_fast_kernels)
