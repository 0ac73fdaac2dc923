"""The linear layer: storage and math delegated to a quant method, adapters added after the base product.

Quantization (GGUF blocks, ISQ) enters by giving a `Linear` another `LinearMethodBase` (a `QuantConfig`
does so for a whole model through `Linear.set_quant_method` before loading); LoRA and X-LoRA enter through
`Linear.adapters`. A fused projection (qkv_proj, gate_up_proj) is one `Linear` whose output
rows are the concatenation of `output_partition_sizes`; each checkpoint tensor is loaded into its shard.
A tensor-parallel `Linear` (`tp`, a `LinearShard` of mistralrs/distributed/parallel.py) holds only its rank's
rows (column-parallel) or input columns (row-parallel): it narrows each checkpoint tensor before its quant method
sees it, so every quant method stores and quantizes just that piece, and combines the ranks' outputs after the
adapters (all-reduce, or all-gather for the LM head).

The helpers at the bottom route `(hf_name, tensor)` checkpoint pairs into a module tree through a
declarative `StackedParam` table, so checkpoint names stay the truth.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.distributed.parallel import LinearShard, QuantizedPiece, narrow_rows
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.packed import FusedLinearPart, LinearKind

Adapter = Callable[[torch.Tensor], torch.Tensor]


class LinearMethodBase:
    """How a `Linear` stores its weights, loads checkpoint tensors into them, and computes `x @ W^T + b`."""

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device | str) -> None:
        """Registers the layer's parameters or buffers."""
        raise NotImplementedError

    def load_weight(self, layer: Linear, param_name: str, loaded: torch.Tensor | GGMLTensor,
                    shard_index: int | None) -> None:
        """Stores checkpoint tensor `loaded` (dense, or GGML blocks from a GGUF file) as `param_name` ("weight"
        or "bias"), into shard `shard_index` if fused."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., in_features]` -> `[..., out_features]`."""
        raise NotImplementedError

    def apply_float(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """`apply` with a float32 result. By default `apply(x).float()`; a method whose kernels sum in float32
        whatever the activation dtype returns those sums as they are, not rounded to the model dtype first (the
        LM head's logits: llama.cpp's and the reference's quantized heads give float32 logits too)."""
        return self.apply(layer, x).float()

    def dense_weight(self, layer: Linear) -> torch.Tensor | None:
        """The layer's whole weight as one dense `[out_features, in_features]` tensor, if that is how it is stored
        (a tied embedding then shares it); None otherwise."""
        return None

    def row_lookup(self, layer: Linear) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None:
        """`(ids, dtype) -> [*ids.shape, in_features]`: rows of the layer's weight read from its own storage, when
        its form has such a lookup (a tied embedding then uses it instead of a second copy); None otherwise."""
        return None

    def fused_parts(self, layer: Linear) -> list[FusedLinearPart] | None:
        """What `apply` computes before the bias, as the weights the fused C++ decoder layer multiplies in turn
        (their outputs concatenated, then the bias added), bit for bit the same; None (the default) when the C++
        side cannot compute it (layers/fused_decode.py then runs the plain modules)."""
        return None


def copy_checked(param: torch.Tensor, loaded: torch.Tensor | GGMLTensor, name: str) -> None:
    """Copies `loaded` into `param` (casting dtype; GGML blocks are dequantized); ValueError naming `name` when
    the shapes differ."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    if isinstance(loaded, GGMLTensor):
        loaded = loaded.to(param.device).dequantize(param.dtype)
    with torch.no_grad():
        param.copy_(loaded)


_DENSE_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("dense_on_meta", default=False)


@contextlib.contextmanager
def dense_weights_on_meta() -> Iterator[None]:
    """Models built inside allocate their dense (unquantized) linear and expert weights on the meta device: a quant
    config is about to replace them, so no full-precision copy of the model is ever allocated (on CUDA `empty` is a
    real allocation). `materialize_meta_weights` gives the layers the config left dense their real storage."""
    token = _DENSE_ON_META.set(True)
    try:
        yield
    finally:
        _DENSE_ON_META.reset(token)


def dense_device(device: torch.device | str) -> torch.device | str:
    """Where a dense method allocates: `device`, or the meta device inside `dense_weights_on_meta`."""
    return "meta" if _DENSE_ON_META.get() else device


class UnquantizedLinearMethod(LinearMethodBase):
    """Dense weights in the model dtype; one `F.linear` call."""

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device | str) -> None:
        device = dense_device(device)
        weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        bias = torch.zeros(layer.out_features, dtype=dtype, device=device) if layer.has_bias else None
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def load_weight(self, layer: Linear, param_name: str, loaded: torch.Tensor | GGMLTensor,
                    shard_index: int | None) -> None:
        param = getattr(layer, param_name)
        if param is None:
            raise ValueError(f"{layer.prefix or 'linear'}: checkpoint has a {param_name!r} the layer was built without")
        if shard_index is not None:
            offset, size = layer.shard_range(shard_index)
            param = param.narrow(0, offset, size)
        copy_checked(param, loaded, f"{layer.prefix}.{param_name}[shard {shard_index}]" if shard_index is not None
                     else f"{layer.prefix}.{param_name}")

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def dense_weight(self, layer: Linear) -> torch.Tensor | None:
        return layer.weight

    def fused_parts(self, layer: Linear) -> list[FusedLinearPart]:
        return [FusedLinearPart(LinearKind.DENSE, 0, layer.out_features, layer.weight, None)]


class CheckpointModule(nn.Module):
    """A module that takes its checkpoint tensors through `load_weight` (they may be GGML blocks) rather than
    exposing Parameters to copy into. `load_checkpoint_weights` routes its names to it."""

    def checkpoint_param_names(self) -> list[str]:
        """Local names the checkpoint provides for this module, whatever it stores."""
        raise NotImplementedError

    def load_weight(self, param_name: str, loaded: torch.Tensor | GGMLTensor, shard_index: int | None = None) -> None:
        """Stores one checkpoint tensor (into fused shard `shard_index` when given)."""
        raise NotImplementedError


class Linear(CheckpointModule):
    """`y = quant_method(x) + sum(adapter(x) for adapter in adapters)`.

    Args:
        in_features: input width.
        output_partition_sizes: output widths of the fused shards (one entry for an unfused layer);
            out_features is their sum and shard i occupies rows `[sum(sizes[:i]), sum(sizes[:i+1]))`.
        bias: whether the layer has a bias vector.
        quant_method: storage and math; `UnquantizedLinearMethod()` when None.
        prefix: the layer's module path (for error messages and quantization rules).
        tp: the tensor-parallel split (None: the whole weight). `in_features` and `output_partition_sizes` are
            the full layer's; the layer's own become this rank's (`checkpoint_partition_sizes` keeps the full ones).
    """

    def __init__(
        self,
        in_features: int,
        output_partition_sizes: int | Sequence[int],
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        quant_method: LinearMethodBase | None = None,
        prefix: str = "",
        tp: LinearShard | None = None,
    ):
        super().__init__()
        sizes = [output_partition_sizes] if isinstance(output_partition_sizes, int) else list(output_partition_sizes)
        self.checkpoint_partition_sizes = sizes  # the full layer's fused parts, as the checkpoint stores them
        self.tp = tp
        if tp is not None:
            sizes, in_features = tp.local_sizes(sizes, in_features)
        self.in_features = in_features
        self.output_partition_sizes = sizes
        self.out_features = sum(sizes)
        self.has_bias = bias
        self.prefix = prefix
        self.params_dtype = dtype  # the model dtype: activations, and weights a quant method keeps dense
        self.params_device = torch.device(device)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.adapters: list[Adapter] = []  # each called as y = y + adapter(x); LoRA / X-LoRA hook
        self.float_output = False  # True: float32 results (`LinearMethodBase.apply_float`; the LM head's logits)
        self.quant_method.create_weights(self, dtype, device)

    def set_quant_method(self, quant_method: LinearMethodBase) -> None:
        """Replaces the quant method before any weight is loaded; the old method's storage is dropped."""
        for name in ("weight", "bias"):
            if name in self._parameters:
                del self._parameters[name]
        self.quant_method = quant_method
        quant_method.create_weights(self, self.params_dtype, self.params_device)

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """(row offset, row count) of fused shard `shard_index`."""
        if not 0 <= shard_index < len(self.output_partition_sizes):
            raise ValueError(f"{self.prefix}: shard_index {shard_index} out of range "
                             f"(layer has {len(self.output_partition_sizes)} shards)")
        return sum(self.output_partition_sizes[:shard_index]), self.output_partition_sizes[shard_index]

    def checkpoint_param_names(self) -> list[str]:
        return ["weight", "bias"] if self.has_bias else ["weight"]

    def load_weight(self, param_name: str, loaded: torch.Tensor | GGMLTensor, shard_index: int | None = None) -> None:
        """Loads a checkpoint tensor through the quant method (this rank's piece of it when split)."""
        for piece, index in self.local_pieces(param_name, loaded, shard_index):
            self.quant_method.load_weight(self, param_name, piece, index)

    def local_pieces(self, param_name: str, loaded: torch.Tensor | QuantizedPiece, shard_index: int | None = None
                     ) -> Iterator[tuple[torch.Tensor | QuantizedPiece, int | None]]:
        """(this rank's piece, its shard index) of checkpoint tensor `loaded` ("weight" or "bias" of shard
        `shard_index`): the tensor itself without a split; one piece per part of a projection the checkpoint stores
        fused (Phi-3's qkv_proj)."""
        if self.tp is None:
            yield loaded, shard_index
        elif shard_index is None and len(self.checkpoint_partition_sizes) > 1:
            offset = 0
            for part, size in enumerate(self.checkpoint_partition_sizes):
                yield from self.local_pieces(param_name, narrow_rows(loaded, offset, size), part)
                offset += size
        else:
            yield self.tp.local_piece(param_name, loaded, shard_index or 0, self.params_dtype), shard_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply_float(self, x) if self.float_output else self.quant_method.apply(self, x)
        for adapter in self.adapters:
            y = y + adapter(x)
        return y if self.tp is None else self.tp.combine(y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, output_partition_sizes={self.output_partition_sizes}, "
                f"bias={self.has_bias}, quant_method={type(self.quant_method).__name__}"
                + ("" if self.tp is None else f", tp={self.tp.kind}"))


@dataclass(frozen=True)
class StackedParam:
    """One row of a fused-projection table: checkpoint module `shard_name` is shard `shard_index` of `fused_name`."""

    fused_name: str  # module name in our tree, e.g. "qkv_proj"
    shard_name: str  # module name in the checkpoint, e.g. "k_proj"
    shard_index: int  # position of the shard in the fused layer's output_partition_sizes


def _resolve(name: str, stacked: Sequence[StackedParam]) -> tuple[str, int | None]:
    """Checkpoint name -> (our parameter path, shard index or None)."""
    parts = name.split(".")
    for entry in stacked:
        if entry.shard_name in parts[:-1]:
            parts[parts.index(entry.shard_name)] = entry.fused_name
            return ".".join(parts), entry.shard_index
    return name, None


def load_checkpoint_weights(
    root: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | GGMLTensor]],
    stacked: Sequence[StackedParam],
    ignored: Callable[[str], bool],
) -> set[str]:
    """Loads `(checkpoint_name, tensor)` pairs into `root`; returns the names consumed.

    Names for which `ignored(name)` is true are consumed and dropped. Names that match nothing in `root`
    are not consumed (the caller reports them). Linear layers (and every `CheckpointModule`) load through
    their own `load_weight`.
    """
    modules = dict(root.named_modules())
    consumed: set[str] = set()
    for name, tensor in weights:
        if ignored(name):
            consumed.add(name)
            continue
        target, shard_index = _resolve(name, stacked)
        module_path, _, attr = target.rpartition(".")
        owner = modules.get(module_path)
        if isinstance(owner, CheckpointModule):
            if attr not in owner.checkpoint_param_names():
                continue
            owner.load_weight(attr, tensor, shard_index)
        elif owner is not None and shard_index is None and isinstance(getattr(owner, attr, None), nn.Parameter):
            copy_checked(getattr(owner, attr), tensor, name)
        else:
            continue
        consumed.add(name)
    return consumed


def expected_checkpoint_names(
    root: nn.Module, stacked: Sequence[StackedParam], skip: Callable[[str], bool]
) -> set[str]:
    """The checkpoint names `root` needs: fused layers expand to their shards; names where `skip` holds are left out."""
    names: set[str] = set()
    seen: set[int] = set()
    for module_path, module in root.named_modules():
        if isinstance(module, CheckpointModule):
            parent, _, local_name = module_path.rpartition(".")
            shard_names = [e.shard_name for e in stacked if e.fused_name == local_name] or [local_name]
            base = f"{parent}." if parent else ""
            names.update(f"{base}{shard}.{attr}" for shard in shard_names for attr in module.checkpoint_param_names())
            continue
        prefix = f"{module_path}." if module_path else ""
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                names.add(prefix + attr)
    return {n for n in names if not skip(n)}
