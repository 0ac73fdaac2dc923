"""The fused decoder-layer path: a Llama- or Gemma-family layer's op sequence run by one C++ call instead of
Python modules.

At decode sizes a layer is 4 weight-only matmuls and ~45 small ATen calls (~120 ATen ops with the nested ones),
and the Python that issues them (module calls, the linear method, views and splits) costs about as much as the
small calls themselves. `FusedDecoderLayer` hands the layer's tensors once to a small C++ extension
(`fused_decode.cpp`) that makes the very same ATen calls in the same order, so its output is bit for bit the
plain path's; only the interpreter's work between the calls goes away. On the 2-core development CPU a SmolLM2
decode step (model forward and LM head) takes ~10 ms instead of ~14 ms, and single-stream decode through the
Runner goes from ~73 to ~95 tok/s (bench/bench_smollm2.py --ab-fused).

Since the int8 dot-product kernels halved the matmuls, the small calls are about half of a decode step's forward.
A decode step (one new token per sequence, fewer than 64 of them, float32 or bfloat16 activations) therefore runs
by default without them (`DecoderLayerPlan::native_forward`): the norms, RoPE, the KV write, decode attention over
each sequence's cached blocks (GQA, sliding window, soft-cap; parallel over sequences and heads), the gated
activation and the residual adds are hand-written loops (mistralrs/layers/native_decode.h) over float32 buffers,
and the int8 dot-product kernels are called on those buffers directly. The loops round to the model's dtype where
the ATen calls store a result, but they sum in their own order, so they agree with the ATen calls within a
tolerance instead of bit for bit (float32: 1e-5 of the largest magnitude; bfloat16: a few ulps, and equal greedy
tokens on the real GGUFs: tests/layers/test_native_decode.py). The ATen calls stay as their twin: every other step
(prefill, chunks, padded batches) takes them, and `ExecutionOptions.native_decode` (`MISTRALRS_NATIVE_DECODE=0`)
sends decode steps to them too, bit for bit the plain modules. Figures: docs/benchmarks.md (issue 20).

The same plan runs the Gemma family's layers (mistralrs/models/gemma.py): `(1 + w)` norms computed in float32,
Gemma 2/3's sandwich norms, Gemma 3's per-head q/k norms, RoPE over `cat(q, k)`, the tanh-gelu MLP, and Gemma 2's
soft-capped attention (its explicit matmul / tanh / softmax sequence, as `_softcapped_attention`). A linear layer
whose weights are several packed shards of different types (Gemma 3 270M Q4_K_M: Q5_0 q/k with a Q8_0 v) is
computed as its quant method does: each shard, concatenated, then the bias. On that model a decode step's layers
take ~19 ms instead of ~26 ms (its 262k-row LM head another ~15 ms), and single-stream decode through the Runner
goes from ~30 to ~33 tok/s.

A model file does not call this path: a decoder layer class declares its modules (`decoder_layout()`, a
`PreNormDecoderLayout`, mistralrs/layers/decoder_layout.py) and the model runner attaches the fused twin in front
of each such layer's forward (`attach_fused_decode`) when the one switch, `ExecutionOptions.fused_decode`
(mistralrs/worker/options.py; `MISTRALRS_FUSED_DECODE=0` turns it off), is on. The plain modules stay the
reference twin: they alone run when the switch is off, and in place of the fused call whenever it cannot run:
the extension is not built (yet), a linear layer has adapters or a weight form the C++ side does not know (only
dense weights, torch's CPU int4 forms and the int8 dot-product form of mistralrs/quant/qdot.py, whose kernels
live in this extension, are handled), a norm or activation other than those above, a forward
hook watches one of the layer's modules (imatrix collection), the step uses the "reference" attention backend,
or the layer is not on the CPU.

The extension (`EXTENSION`, a `LazyExtension` of mistralrs/layers/cpp_extension.py) is compiled with the system
C++ compiler against the installed torch, once per machine: by `make chat` / `make test` up front, or else on
first use at low priority in the background while the plain path serves (about 30 s on the development machine);
it is cached under `~/.cache/mistralrs/extensions` (keyed by the .cpp file and the headers of layers/qdot/ it
includes) and later processes import the cached build (~40 ms). A build that fails logs one warning and the plain
path is used from then on.
"""

from __future__ import annotations

import copy
import enum
import operator
import weakref
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.cpp_extension import LazyExtension
from mistralrs.layers.decoder_layout import PreNormDecoderLayout

if TYPE_CHECKING:
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.packed import FusedLinearPart
    from mistralrs.worker.forward_batch import ForwardBatch

SOURCE = Path(__file__).with_name("fused_decode.cpp")
# the quantized dot-product kernels it includes (mistralrs/layers/qdot/qdot.h); every file there is in the cache key
QDOT_HEADERS = tuple(sorted(path for path in Path(__file__).with_name("qdot").iterdir()
                            if path.suffix in (".h", ".inc")))
# the native decode step's loops (the extension's other header; in the cache key as well)
NATIVE_HEADER = Path(__file__).with_name("native_decode.h")


class NormKind(enum.IntEnum):
    """Which norm module the C++ side reproduces (`NormKind` of fused_decode.cpp)."""

    RMS = 0  # RMSNorm
    GEMMA_RMS = 1  # GemmaRMSNorm: float32 statistics and (1 + w) scale


class Activation(enum.IntEnum):
    """The gated MLP's activation on the C++ side (`Activation` of fused_decode.cpp)."""

    SILU = 0  # F.silu
    GELU_TANH = 1  # F.gelu(approximate="tanh")


# the process's one copy of the compiled module
EXTENSION = LazyExtension(SOURCE, "mistralrs_fused_decode", (NATIVE_HEADER, *QDOT_HEADERS))


def linear_spec(linear: Linear) -> tuple[list[FusedLinearPart], torch.Tensor | None] | None:
    """`(parts, bias)` of a linear layer the C++ side computes exactly as its quant method does (the method's
    `fused_parts`); or None (adapters, or a weight form the C++ side does not compute)."""
    if linear.adapters:
        return None
    parts = linear.quant_method.fused_parts(linear)
    return None if parts is None else (parts, linear.bias)


def norm_spec(norm: nn.Module) -> tuple[NormKind, torch.Tensor, torch.Tensor | None, float] | None:
    """`(kind, weight, doubled weight, eps)` of a norm the C++ side computes exactly as the module does, or None."""
    from mistralrs.layers.norm import GemmaRMSNorm, RMSNorm

    if type(norm) is RMSNorm:
        return NormKind.RMS, norm.weight, norm.doubled_weight(), norm.eps
    if type(norm) is GemmaRMSNorm:
        return NormKind.GEMMA_RMS, norm.scale_weight(), None, norm.eps
    return None


def activation_kind(act_fn) -> Activation | None:
    """The C++ side's form of a gated MLP's activation function, or None."""
    from mistralrs.layers.activation import gelu_tanh

    return {F.silu: Activation.SILU, gelu_tanh: Activation.GELU_TANH}.get(act_fn)


class FusedDecoderLayer:
    """The fused twin of one pre-norm decoder layer `h += attn(norm(h)); h += down(act(gate) * up)(norm(h))`,
    optionally with the Gemma additions of its layout (sandwich norms, q/k norms, RoPE over cat(q, k)).

    Holds the layer's declared modules, and a C++ plan built from their tensors on first use; the plan is rebuilt
    when a quant method, packed weight list, bias, adapter list or norm weight changes (re-ISQ, adapters added).
    `forward` returns the layer's output, or None when the plain modules must run.
    """

    def __init__(self, layout: PreNormDecoderLayout, native: bool = True):
        self.native = native  # decode steps through the hand-written loops (False: the ATen calls alone)
        self.layout = layout  # the layer's modules, as its class declares them; the three below are read often
        self.linears = layout.linears  # (qkv_proj, o_proj, gate_up_proj, down_proj)
        self.attn = layout.attn  # its geometry, scale, window, soft-cap and cache index
        self.act_fn = layout.act_fn  # F.silu or tanh gelu (activation.gelu_tanh) are fused
        self._all_norms = (*layout.norms, *(layout.feedforward_norms or ()), *(layout.qk_norms or ()))  # every norm
        self._plan = None  # the C++ DecoderLayerPlan (None: not built, or the layer cannot be fused)
        self._sources: list = []  # the objects the plan was built from, compared by identity
        self._versions: list[int] = []  # the norm weights' versions when it was built

    def __getstate__(self) -> dict:
        """Copies and pickles (`copy.deepcopy(model)`) leave the C++ plan behind; the copy builds its own."""
        return {**self.__dict__, "_plan": None, "_sources": [], "_versions": []}

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor | None:
        """The layer's output `[num_tokens, hidden]`, or None: run the plain modules."""
        if fb.attention_backend != "sdpa" or hidden.device.type != "cpu" or self._observed():
            return None
        plan = self._current_plan()
        if plan is None:
            return None
        attn = self.attn
        k_cache, v_cache = fb.kv_caches[attn.layer_idx]
        start = fb.contiguous_start
        return plan.forward(hidden, cos, sin, k_cache, v_cache, fb.slot_mapping, -1 if start is None else start,
                            fb.gather_indices, fb.attention_mask(attn.sliding_window), fb.query_pad_indices,
                            fb.num_seqs, fb.max_query_len, fb.max_context_len, fb.context_lens, self.native)

    def _observed(self) -> bool:
        """Whether a forward hook watches one of the fused modules (e.g. imatrix collection on the linear layers):
        the fused call would bypass it, so the plain modules run."""
        if nn.modules.module._global_forward_pre_hooks or nn.modules.module._global_forward_hooks:
            return True
        return any(module._forward_pre_hooks or module._forward_hooks
                   for module in (*self._all_norms, *self.linears, self.attn))

    def _current_plan(self):
        sources: list = []  # Parameters are read from `_parameters` directly: nn.Module.__getattr__ is slow
        for linear in self.linears:
            method, params = linear.quant_method, linear._parameters
            sources += (method, getattr(method, "weights", None), params.get("weight"), params.get("bias"),
                        bool(linear.adapters))
        weights = [norm._parameters["weight"] for norm in self._all_norms]
        sources += weights
        versions = [weight._version for weight in weights]
        if versions == self._versions and len(sources) == len(self._sources) and all(
                map(operator.is_, sources, self._sources)):
            return self._plan
        extension = EXTENSION.get()
        if extension is None:
            return None
        self._plan, self._sources, self._versions = self._build(extension), sources, versions
        return self._plan

    def _build(self, extension: ModuleType):
        specs = [linear_spec(linear) for linear in self.linears]
        norms = [norm_spec(norm) for norm in self._all_norms]
        activation = activation_kind(self.act_fn)
        if any(spec is None for spec in (*specs, *norms)) or activation is None:
            return None
        norms = [extension.make_norm(int(kind), *rest) for kind, *rest in norms]
        linears = [extension.make_linear([extension.make_linear_part(int(kind), *rest) for kind, *rest in parts],
                                         bias) for parts, bias in specs]
        attn, layout = self.attn, self.layout
        extra = iter(norms[2:])
        feedforward = (next(extra), next(extra)) if layout.feedforward_norms else (None, None)
        qk = (next(extra), next(extra)) if layout.qk_norms else (None, None)
        return extension.DecoderLayerPlan(
            *norms[:2], *linears, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale,
            pre_feedforward_norm=feedforward[0], post_feedforward_norm=feedforward[1], q_norm=qk[0], k_norm=qk[1],
            concat_qk=layout.concat_qk, activation=int(activation), softcap=attn.logit_softcap,
            sliding_window=attn.sliding_window or 0)


class FusedForward:
    """A decoder layer's `forward` while the fused twin is attached: the twin's output, or the layer's own (class)
    forward when the twin declines. Set as the layer's instance attribute `forward` by `attach_fused_decode`, so
    that `nn.Module.__call__` (and the hooks it runs, e.g. a device map's) calls it. It holds the layer weakly: the
    layer and its forward form no reference cycle, and a dropped model is freed at once."""

    def __init__(self, layer: nn.Module, twin: FusedDecoderLayer):
        self._layer = weakref.ref(layer)  # the decoder layer whose forward this is
        self.twin = twin  # the fused computation of that layer

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        fused = self.twin.forward(hidden, cos, sin, fb)
        if fused is not None:
            return fused
        layer = self._layer()
        return type(layer).forward(layer, hidden, cos, sin, fb)

    def __deepcopy__(self, memo: dict) -> FusedForward:
        """`copy.deepcopy(model)`: the copied layer (in `memo` already) gets its own twin over its own modules."""
        return FusedForward(copy.deepcopy(self._layer(), memo), copy.deepcopy(self.twin, memo))


def fused_twin(layer: nn.Module) -> FusedDecoderLayer | None:
    """The fused twin attached to `layer`, or None."""
    forward = layer.__dict__.get("forward")
    return forward.twin if isinstance(forward, FusedForward) else None


def attach_fused_decode(model: nn.Module, enabled: bool, native: bool = True) -> None:
    """With `enabled`, puts the fused twin in front of the forward of every layer of `model` whose class declares
    its layout (`decoder_layout()`, mistralrs/layers/decoder_layout.py; a layer whose `decoder_layout()` returns
    None, or whose linear layers are tensor-parallel, keeps its plain modules), keeping twins already attached, and
    sets every twin's `native` switch (decode steps through the hand-written loops); without, removes every twin,
    so that the layers' own modules run."""
    for name, value in (("enabled", enabled), ("native", native)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    for module in model.modules():
        if not callable(getattr(type(module), "decoder_layout", None)):
            continue
        twin = fused_twin(module)
        if enabled and twin is None:
            layout = module.decoder_layout()
            # None: the layer's modules are not those of its layout (an AnyMoE MLP); sharded: no collectives in C++
            if layout is not None and not layout.is_sharded:
                module.forward = FusedForward(module, FusedDecoderLayer(layout, native))
        elif enabled:
            twin.native = native
        elif twin is not None:
            del module.forward


def fused_layer_counts(model: nn.Module) -> tuple[int, int]:
    """(layers whose C++ plan is built, layers that have a fused twin) of `model`. After a step with the switch on,
    a first count below the second means that some layers decline to the plain path (see the module doc)."""
    twins = [twin for twin in map(fused_twin, model.modules()) if twin is not None]
    return sum(twin._plan is not None for twin in twins), len(twins)
