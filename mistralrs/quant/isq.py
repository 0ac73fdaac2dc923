"""In-situ quantization (ISQ, REFERENCE §3): full-precision checkpoint weights quantized as they load.

`IsqQuantConfig.prepare(model)` gives every layer that ISQ quantizes an `IsqLinearMethod` (or, for the stacked
experts of a `FusedMoE`, an `IsqMoEMethod` from `quant/isq_moe.py`) before any weight is read. Each checkpoint
linear (a shard of a fused projection, q/k/v or gate/up, is its own layer, as in the reference's `get_layers()`)
is quantized the moment its tensor arrives and kept as one `IsqLayerState`, so the model is never held in full
precision next to its quantized copy. Once all shards of a layer are in, they are packed for compute: GGML
shards of one type concatenated and packed by `gguf_linear.build_packed_weight` (the CPU int4 kernel where it
applies, else dequantized once to the activation dtype), HQQ and FP8 through their `PackedWeight`s, unquantized
shards as a dense weight. `use_fast_kernels=False` is the plain twin: every shard dequantized at load, `F.linear`.

Which layers: `isq_layer_names(model)`, the reference order (LM head first, then each decoder layer's linears in
module order; MoE experts per expert as gate, down, up; Phi-3.5-MoE's router is left out as the reference
does). Embeddings and norms are never quantized. A tied LM head is quantized as its own copy, as the reference
does, while the embedding table keeps the full-precision weights (lookups stay exact).
With MoQE (`moqe=True`) only the LM head and `FusedMoE` experts are quantized; a model without such experts
falls back to the default list. The per-layer type comes from the topology when it covers the layer, else the
global type.

A weight whose input width is not a multiple of its type's block size falls back as the reference does (Q4K to
Q4_1, ...; see `isq_types.GGML_FALLBACK`), or stays unquantized when no fallback fits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear, UnquantizedLinearMethod
from mistralrs.layers.moe import FusedMoE
from mistralrs.quant.config import QuantConfig
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.gguf_linear import build_packed_weight
from mistralrs.quant.isq_state import IsqLayerState
from mistralrs.quant.isq_types import IsqType, ggml_type_for_width, parse_isq_type
from mistralrs.quant.packed import DenseWeight, PackedWeight, runs_by_key
from mistralrs.quant.packed_linear import PackedLinearMethod
from mistralrs.quant.topology import Topology

logger = logging.getLogger(__name__)

# GGML types whose rounding an importance matrix weights.
IMATRIX_GGML_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Linears the reference leaves out of a family's ISQ list (module path patterns, by model class name).
_NOT_ISQ_LAYERS: dict[str, re.Pattern] = {"PhiMoEForCausalLM": re.compile(r"\.block_sparse_moe\.gate$")}


# ---- one weight ---------------------------------------------------------------------------------------------

def quantize_state(weight: torch.Tensor | GGMLTensor, bias: torch.Tensor | None, isq: IsqType | None,
                   layer_dtype: torch.dtype, imatrix: torch.Tensor | None = None) -> IsqLayerState:
    """One checkpoint linear's weight `[out, in]` in `isq`'s form (unquantized when `isq` is None or no block type
    fits its width); the bias is kept in float32. `imatrix` `[in]` weights the GGML rounding error."""
    if isinstance(weight, GGMLTensor):
        weight = weight.dequantize(torch.float32)
    bias = None if bias is None else bias.float()
    if isq is None:
        return IsqLayerState(bias=bias, dense=weight.to(layer_dtype))
    if imatrix is not None and not isq.supports_imatrix:
        raise ValueError(f"ISQ type {isq.name} ({isq.kind.upper()}) does not support imatrix")
    if isq.kind == "hqq":
        from mistralrs.quant.hqq import HQQ_GROUP_SIZE, hqq_quantize
        if weight.numel() % HQQ_GROUP_SIZE:
            logger.warning("ISQ: weight of shape %s left unquantized (HQQ needs a multiple of %d elements)",
                           tuple(weight.shape), HQQ_GROUP_SIZE)
            return IsqLayerState(bias=bias, dense=weight.to(layer_dtype))
        return IsqLayerState(bias=bias, hqq=hqq_quantize(weight, isq.bits))
    if isq.kind == "fp8":
        from mistralrs.quant.fp8 import fp8_quantize
        # the reference's ISQ records F8E4M3 as the FP8 layer's dtype (UQFF blobs carry it); compute follows x
        return IsqLayerState(bias=bias, fp8=fp8_quantize(weight, torch.float8_e4m3fn))
    ggml_type = ggml_type_for_width(isq.ggml_type, weight.shape[-1])
    if ggml_type is None:
        logger.warning("ISQ: weight of shape %s left unquantized (its width fits no block size)", tuple(weight.shape))
        return IsqLayerState(bias=bias, dense=weight.to(layer_dtype))
    from mistralrs.quant.quantize import quantize_ggml
    # llama.cpp's 8-bit types round to nearest whatever the importance (the reference ignores it there too).
    imatrix = None if imatrix is None or ggml_type not in IMATRIX_GGML_TYPES else imatrix.float().cpu()
    return IsqLayerState(bias=bias, ggml=quantize_ggml(weight.float().cpu(), ggml_type, imatrix))


def dequantize_state(state: IsqLayerState) -> torch.Tensor:
    """The layer's weight `[out, in]` in float32 (what re-ISQ quantizes again)."""
    if state.ggml is not None:
        return state.ggml.dequantize(torch.float32)
    if state.dense is not None:
        return state.dense.float()
    if state.hqq is not None:
        from mistralrs.quant.hqq import hqq_dequantize
        return hqq_dequantize(state.hqq).float()
    return state.fp8.weight.float() * state.fp8.dequant_w_scale


def _pack_key(index: int, state: IsqLayerState) -> str:
    """Consecutive shards with the same key are concatenated before packing (HQQ/FP8 shards never are)."""
    if state.ggml is not None:
        return state.ggml.ggml_type
    return "dense" if state.dense is not None else f"{state.kind}{index}"


def _pack_one(run: list[IsqLayerState], dtype: torch.dtype, device: torch.device,
              use_fast_kernels: bool) -> PackedWeight:
    first = run[0]
    if not use_fast_kernels or first.dense is not None:
        dense = torch.cat([dequantize_state(s) if s.dense is None else s.dense for s in run])
        return DenseWeight(dense.to(device=device, dtype=dtype))
    if first.ggml is not None:
        tensor = first.ggml if len(run) == 1 else GGMLTensor.cat_rows([s.ggml for s in run])
        return build_packed_weight(tensor, dtype, device, use_fast_kernels)
    if first.hqq is not None:
        from mistralrs.quant.hqq import HqqWeight
        params = first.hqq
        return HqqWeight(replace(params, w_q=params.w_q.to(device), scales=params.scales.to(device),
                                 zeros=params.zeros.to(device)))
    from mistralrs.quant.fp8 import Fp8Weight
    return Fp8Weight(replace(first.fp8, weight=first.fp8.weight.to(device)))


def pack_states(states: Sequence[IsqLayerState], dtype: torch.dtype, device: torch.device,
                use_fast_kernels: bool = True) -> list[PackedWeight]:
    """The compute forms of a layer's shards in output-row order (runs of one GGML type, or dense, as one)."""
    keys = [_pack_key(index, state) for index, state in enumerate(states)]
    return [_pack_one(run, dtype, device, use_fast_kernels) for run in runs_by_key(states, keys)]


def _shard_bias(states: Sequence[IsqLayerState], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if all(s.bias is None for s in states):
        return None
    if any(s.bias is None for s in states):
        raise ValueError("ISQ states: either every shard of a fused layer has a bias or none has")
    return torch.cat([s.bias for s in states]).to(device=device, dtype=dtype)


# ---- the linear method ---------------------------------------------------------------------------------------

class IsqLinearMethod(PackedLinearMethod):
    """One `Linear`'s weights quantized per checkpoint shard (`states`, one `IsqLayerState` each) and packed.

    Built with an ISQ type (shards quantized as they load) or from ready states (`from_states`, for UQFF).
    `num_shards`: checkpoint tensors of the layer; one per fused partition (the default) or 1 when the checkpoint
    stores the fused projection whole (Phi-3's qkv_proj).
    """

    def __init__(self, isq: IsqType | None, *, imatrix: Sequence[torch.Tensor | None] | None = None,
                 use_fast_kernels: bool = True, num_shards: int | None = None):
        super().__init__(use_fast_kernels)
        self.isq = isq                          # the type shards are quantized to (None: kept unquantized)
        self.num_shards = num_shards            # checkpoint tensors (None: one per output partition)
        self.imatrix = imatrix                  # per shard: importance `[in_features]` or None
        self.states: list[IsqLayerState | None] = []  # per shard, in shard order; complete once loaded
        self._biases: list[torch.Tensor | None] = []  # checkpoint biases of shards whose weight has not arrived

    @classmethod
    def from_states(cls, states: Sequence[IsqLayerState], use_fast_kernels: bool = True) -> IsqLinearMethod:
        """A method holding ready states (one per shard); packed when a `Linear` adopts it."""
        method = cls(None, use_fast_kernels=use_fast_kernels)
        method.states = list(states)
        return method

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device | str) -> None:
        if self.states:
            self._dtype, self._device = dtype, torch.device(device)
            self.num_shards = len(self.states)
            self._adopt(layer)
            return
        num_shards = self.num_shards or len(layer.output_partition_sizes)
        partitions = len(layer.output_partition_sizes)
        if num_shards not in (1, partitions):
            raise ValueError(f"{layer.prefix}: {num_shards} checkpoint shards for a layer of {partitions} partitions")
        if layer.tp is not None and num_shards < partitions:
            # a tensor-parallel layer gets a fused checkpoint tensor cut per part (`Linear.local_pieces`); every part
            # has the whole input, so each takes the tensor's importances
            num_shards = partitions
            self.imatrix = None if self.imatrix is None else list(self.imatrix) * partitions
        self.num_shards = num_shards
        self.states = [None] * num_shards
        self._biases = [None] * num_shards
        super().create_weights(layer, dtype, device)

    def shard_range(self, layer: Linear, shard_index: int | None) -> tuple[int, int]:
        """(row offset, rows) of checkpoint shard `shard_index` (the whole layer when it has one shard)."""
        return (0, layer.out_features) if self.num_shards == 1 else layer.shard_range(shard_index or 0)

    def _adopt(self, layer: Linear) -> None:
        """Checks the ready states against the layer and packs them."""
        if len(self.states) not in (1, len(layer.output_partition_sizes)):
            raise ValueError(f"{layer.prefix}: {len(self.states)} ISQ states for a layer of "
                             f"{len(layer.output_partition_sizes)} partitions")
        for index, state in enumerate(self.states):
            shape, size = tuple(dequantized_shape(state)), self.shard_range(layer, index)[1]
            if shape != (size, layer.in_features):
                raise ValueError(f"{layer.prefix}: ISQ state of shape {shape}, expected {(size, layer.in_features)}")
        bias = _shard_bias(self.states, self._dtype, self._device)
        if (bias is not None) != layer.has_bias:
            raise ValueError(f"{layer.prefix}: ISQ states {'have' if bias is not None else 'lack'} a bias; "
                             f"the layer has_bias={layer.has_bias}")
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.weights = pack_states(self.states, self._dtype, self._device, self.use_fast_kernels)

    def bias_loaded(self, shard_index: int | None, bias: torch.Tensor) -> None:
        index = shard_index or 0
        if self.states[index] is not None:
            self.states[index].bias = bias.float().clone()
        else:
            self._biases[index] = bias.float().clone()

    def store_weight(self, layer: Linear, shard_index: int | None, loaded: torch.Tensor | GGMLTensor) -> None:
        index = shard_index or 0
        imatrix = self.imatrix[index] if self.imatrix is not None else None
        self.states[index] = quantize_state(loaded, self._biases[index], self.isq, self._dtype, imatrix)
        if all(state is not None for state in self.states):
            self.weights = pack_states(self.states, self._dtype, self._device, self.use_fast_kernels)

    def requantize(self, layer: Linear, isq: IsqType | None, imatrix: Sequence[torch.Tensor | None] | None = None
                   ) -> None:
        """Quantizes the layer's current weights again to `isq` (re-ISQ)."""
        self.isq, self.imatrix = isq, imatrix
        self.states = [quantize_state(dequantize_state(s), s.bias, isq, self._dtype,
                                      None if imatrix is None else imatrix[i]) for i, s in enumerate(self.states)]
        self.weights = pack_states(self.states, self._dtype, self._device, self.use_fast_kernels)

    def dense_weight(self, layer: Linear) -> torch.Tensor | None:
        """The dense weight only while no shard is quantized (the plain twin's dequantized copy is not one)."""
        unquantized = self.states and all(s is not None and s.dense is not None for s in self.states)
        return super().dense_weight(layer) if unquantized else None


def dequantized_shape(state: IsqLayerState) -> tuple[int, ...]:
    """The `[out, in]` shape of a state's weight."""
    if state.ggml is not None:
        return tuple(state.ggml.shape)
    if state.dense is not None:
        return tuple(state.dense.shape)
    if state.hqq is not None:
        return tuple(state.hqq.shape)
    return tuple(state.fp8.weight.shape)


# ---- which layers ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IsqLayer:
    """One ISQ-able module of a model: a `Linear` (with its checkpoint shard names) or a `FusedMoE`."""

    path: str                  # module path in our tree
    module: nn.Module          # the Linear or FusedMoE
    names: tuple[str, ...]     # its checkpoint linear names, in the reference's order
    layer_index: int | None    # decoder layer index (None: lm_head)


def _linear_shard_names(model: nn.Module, path: str, linear: Linear) -> tuple[str, ...]:
    parent, _, local = path.rpartition(".")
    stacked = sorted((e for e in getattr(model, "STACKED_PARAMS", ()) if e.fused_name == local),
                     key=lambda e: e.shard_index)
    if not stacked or len(stacked) != len(linear.output_partition_sizes):
        return (path,)
    return tuple(f"{parent}.{e.shard_name}" if parent else e.shard_name for e in stacked)


def expert_projection_names(moe: FusedMoE) -> list[tuple[str, str]]:
    """(checkpoint name, role) of each expert's projections in the reference's order: gate, down, up."""
    by_role = {role: name for name, role in moe._projection_of.items()}
    return [(by_role[role], role) for role in ("gate", "down", "up")]


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def isq_layers(model: nn.Module, moqe: bool = False) -> list[IsqLayer]:
    """The model's ISQ-able modules in the reference's order (see the module docstring)."""
    excluded = _NOT_ISQ_LAYERS.get(type(model).__name__)
    modules = [(p, m) for p, m in model.named_modules() if isinstance(m, (Linear, FusedMoE))]
    modules.sort(key=lambda item: item[0] != "lm_head")  # stable: lm_head first, the rest in module order
    has_experts = any(isinstance(m, FusedMoE) for _, m in modules)
    layers = []
    for path, module in modules:
        if excluded is not None and excluded.search(path):
            continue
        if isinstance(module, FusedMoE):
            names = tuple(f"{path}.{e}.{name}" for e in range(module.num_experts)
                          for name, _ in expert_projection_names(module))
        elif moqe and has_experts and path != "lm_head":
            continue
        else:
            names = _linear_shard_names(model, path, module)
        layers.append(IsqLayer(path, module, names, _layer_index(path)))
    return layers


def isq_layer_names(model: nn.Module, moqe: bool = False) -> list[str]:
    """Checkpoint linear names (no `.weight`) in the reference's `get_layers()` order: the index of a name is its
    layer index in UQFF files and `.cimatrix` files."""
    return [name for layer in isq_layers(model, moqe) for name in layer.names]


def isq_layer_states(model: nn.Module, moqe: bool = False) -> list[IsqLayerState]:
    """Every ISQ layer's state in `isq_layer_names` order (unquantized layers as dense states), for UQFF."""
    from mistralrs.quant.isq_moe import moe_states
    states: list[IsqLayerState] = []
    for layer in isq_layers(model, moqe):
        if isinstance(layer.module, FusedMoE):
            states.extend(moe_states(layer.module))
        else:
            states.extend(linear_states(layer.module, len(layer.names)))
    return states


def linear_states(linear: Linear, num_shards: int | None = None) -> list[IsqLayerState]:
    """A `Linear`'s per-checkpoint-shard states (built from its dense weight when it is not ISQ-quantized);
    `num_shards` 1 when the checkpoint stores a fused projection whole."""
    method = linear.quant_method
    if isinstance(method, IsqLinearMethod):
        return list(method.states)
    weight = method.dense_weight(linear)
    if weight is None:
        raise ValueError(f"{linear.prefix}: its {type(method).__name__} weights cannot be read back as ISQ states")
    bias = linear.bias
    whole = num_shards == 1
    states = []
    for index in range(1 if whole else len(linear.output_partition_sizes)):
        offset, size = (0, linear.out_features) if whole else linear.shard_range(index)
        shard_bias = None if bias is None else bias.detach()[offset:offset + size].float().clone()
        states.append(IsqLayerState(bias=shard_bias, dense=weight.detach()[offset:offset + size].clone()))
    return states


# ---- the config --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IsqQuantConfig(QuantConfig):
    """ISQ for a whole model: the global type, the topology's per-layer types, MoQE, an importance matrix."""

    isq: IsqType | None = None              # global type (uncovered layers and lm_head); None: only the topology's
    topology: Topology | None = None        # per-decoder-layer types
    moqe: bool = False                      # IsqOrganization.MoQE: only the LM head and MoE experts
    imatrix: Mapping[str, torch.Tensor] = field(default_factory=dict)  # checkpoint linear name -> `[in]` weights
    imatrix_path: str | None = None         # an .imatrix/.cimatrix file, read against the model at `prepare`
    use_fast_kernels: bool = True           # False: the plain twin (dequantize at load, F.linear)

    def __post_init__(self) -> None:
        if self.isq is not None:
            object.__setattr__(self, "isq", parse_isq_type(self.isq))
        if self.isq is None and not self.types_used():
            raise ValueError("ISQ needs a type: in_situ_quant, or a topology with at least one `isq` entry")
        if self.imatrix or self.imatrix_path is not None:
            for isq in self.types_used():
                if not isq.supports_imatrix:
                    raise ValueError(f"ISQ type {isq.name} ({isq.kind.upper()}) does not support imatrix")

    def types_used(self) -> set[IsqType]:
        """Every ISQ type this config may apply."""
        types = {self.isq} if self.isq is not None else set()
        if self.topology is not None:
            types |= {entry.isq for entry in self.topology.layers if entry is not None and entry.isq is not None}
        return types

    def type_for(self, layer_index: int | None) -> IsqType | None:
        """The type of decoder layer `layer_index` (None: a layer without index, which takes the global type)."""
        entry = self.topology.layer(layer_index) if self.topology is not None else None
        return entry.isq if entry is not None else self.isq

    def _plan(self, model: nn.Module) -> Iterator[tuple[IsqLayer, IsqType, list[torch.Tensor | None] | None]]:
        """(layer, its type, its per-name importance vectors or None) for every layer this config quantizes."""
        vectors = dict(self.imatrix)
        if self.imatrix_path is not None:
            from mistralrs.quant.imatrix import load_imatrix
            vectors.update(load_imatrix(self.imatrix_path, model, self.moqe))
        for layer in isq_layers(model, self.moqe):
            isq = self.type_for(layer.layer_index)
            if isq is None:
                continue
            found = [vectors.get(name) for name in layer.names]
            yield layer, isq, (local_importances(layer.module, found) if any(v is not None for v in found) else None)

    def prepare(self, model: nn.Module) -> None:
        """Gives each ISQ layer whose type is not None its ISQ method (a tied LM head loads from the embedding's
        checkpoint tensor); every other layer keeps its dense method."""
        from mistralrs.quant.isq_moe import IsqMoEMethod
        for layer, isq, imatrix in self._plan(model):
            if isinstance(layer.module, FusedMoE):
                layer.module.set_quant_method(IsqMoEMethod(isq, imatrix=imatrix,
                                                           use_fast_kernels=self.use_fast_kernels))
            else:
                _set_linear_method(model, layer.module, IsqLinearMethod(
                    isq, imatrix=imatrix, use_fast_kernels=self.use_fast_kernels, num_shards=len(layer.names)))

    def quantize_loaded(self, model: nn.Module) -> int:
        """Quantizes an already loaded model in place (re-ISQ, LoRA merged first, calibration); returns the number
        of modules quantized. Layers this config gives no type keep their current weights."""
        from mistralrs.quant.isq_moe import requantize_moe
        count = 0
        for layer, isq, imatrix in list(self._plan(model)):
            if isinstance(layer.module, FusedMoE):
                requantize_moe(layer.module, isq, imatrix, self.use_fast_kernels)
            else:
                _requantize_linear(layer.module, isq, imatrix, self.use_fast_kernels, len(layer.names))
            count += 1
        return count


def local_importances(module: Linear | FusedMoE, vectors: Sequence[torch.Tensor | None]
                      ) -> list[torch.Tensor | None]:
    """Each `[in_features]` importance vector of `module`'s checkpoint layers (in `IsqLayer.names` order) narrowed
    to the input columns this tensor-parallel rank's piece of the layer holds: a row-parallel `Linear`'s range, an
    expert down projection's range of the intermediate width; the vectors themselves for whole inputs."""
    if isinstance(module, FusedMoE):
        from mistralrs.quant.isq_moe import ROLES
        if module.tp_group is None:
            return list(vectors)
        return [v.narrow(0, *module.tp_rows) if v is not None and ROLES[i % len(ROLES)] == "down" else v
                for i, v in enumerate(vectors)]
    if module.tp is None or module.tp.kind == "column":
        return list(vectors)
    return [None if v is None else v.narrow(0, *module.tp.ranges[0]) for v in vectors]


def _set_linear_method(model: nn.Module, linear: Linear, method: IsqLinearMethod) -> None:
    """Gives `linear` the method; a head tied to an embedding is then loaded from the embedding's tensor."""
    weight = linear._parameters.get("weight")
    tied_to = next((m for m in model.modules() if isinstance(m, VocabEmbedding) and weight is not None
                    and m.weight is weight), None)
    linear.set_quant_method(method)
    if tied_to is not None:
        tied_to.tie_head(linear)


def _requantize_linear(linear: Linear, isq: IsqType, imatrix, use_fast_kernels: bool, num_shards: int) -> None:
    method = linear.quant_method
    if isinstance(method, IsqLinearMethod):
        method.use_fast_kernels = use_fast_kernels
        method.requantize(linear, isq, imatrix)
        return
    if not isinstance(method, UnquantizedLinearMethod):
        raise ValueError(f"{linear.prefix}: ISQ cannot requantize a layer with {type(method).__name__}")
    states = linear_states(linear, num_shards)
    fresh = IsqLinearMethod(isq, imatrix=imatrix, use_fast_kernels=use_fast_kernels)
    with torch.no_grad():
        fresh.states = [quantize_state(s.dense, s.bias, isq, linear.params_dtype,
                                       None if imatrix is None else imatrix[i]) for i, s in enumerate(states)]
    linear.set_quant_method(fresh)


def isq_config_from_options(isq: IsqType | None, *, topology: Topology | None = None, moqe: bool = False,
                            imatrix: str | None = None, calibration_file: str | None = None,
                            use_fast_kernels: bool = True) -> IsqQuantConfig | None:
    """The ISQ config that the load options ask for (`isq`: the parsed `in_situ_quant`); None when they ask for no
    quantization.

    ValueError for imatrix together with calibration_file, or either of them with no ISQ type or with an HQQ/FP8
    type. (The topology's `device` entries are the device map's: mistralrs/worker/device_map.py.)
    """
    if imatrix is not None and calibration_file is not None:
        raise ValueError("imatrix and calibration_file cannot be combined: give one source of importance data")
    types = ({isq} if isq is not None else set()) | ({e.isq for e in topology.layers if e is not None and e.isq}
                                                     if topology is not None else set())
    if not types:
        if imatrix is not None or calibration_file is not None:
            raise ValueError("imatrix/calibration_file need ISQ: give in_situ_quant or a topology with `isq` entries")
        return None
    if calibration_file is not None:
        for kind in types:
            if not kind.supports_imatrix:
                raise ValueError(f"ISQ type {kind.name} ({kind.kind.upper()}) does not support imatrix "
                                 "(calibration_file)")
    return IsqQuantConfig(isq=isq, topology=topology, moqe=moqe, imatrix_path=imatrix,
                          use_fast_kernels=use_fast_kernels)


def re_isq_config(previous: IsqQuantConfig | None, isq: str | IsqType,
                  use_fast_kernels: bool = True) -> IsqQuantConfig:
    """What re-ISQ to `isq` applies: the new global type with the previous topology, MoQE, imatrix and kernel
    choice (the imatrix is dropped, with a warning, when a type in use does not take one); `use_fast_kernels`
    applies when there is no previous ISQ."""
    isq = parse_isq_type(isq)
    if previous is None:
        return IsqQuantConfig(isq=isq, use_fast_kernels=use_fast_kernels)
    candidate = replace(previous, imatrix={}, imatrix_path=None, isq=isq)
    if (previous.imatrix or previous.imatrix_path) and all(t.supports_imatrix for t in candidate.types_used()):
        return replace(previous, isq=isq)
    if previous.imatrix or previous.imatrix_path:
        logger.warning("re-ISQ to %s: the imatrix is not used (it applies to GGML types only)", isq.name)
    return candidate
