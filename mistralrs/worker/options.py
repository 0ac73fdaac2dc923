"""How the engine executes a loaded model: which twin of each fast path runs, and the CPU thread policy.

One `ExecutionOptions` is chosen at load and handed down explicitly. The model runner applies the model-side
switches when it is built (`apply_execution_options`: the MoE backend of every `FusedMoE`, the fused decoder layer
attached to every layer that declares its layout), passes the attention backend to every step's `ForwardBatch`,
and runs its CPU thread chooser under the policy (mistralrs/worker/cpu_threads.py). `fast_kernels` is what the
quant configs take as `use_fast_kernels` at load (True, "int4" or False: mistralrs/quant/gguf_linear.py).

Environment variables that choose an execution path are read here and nowhere else, by `from_env`, which every
entry point (a `Runner` without `execution=`, the CLI, the server) uses; a variable that is set overrides the
default, and an unset or empty one leaves it. Any other value than those below is a `ValueError` naming the variable.

- `MISTRALRS_FUSED_DECODE`: "0" (or "false", "off", "no") keeps every decoder layer on its plain PyTorch modules
  instead of the fused C++ layer (mistralrs/layers/fused_decode.py); "1" (or "true", "on", "yes"): fused (the
  default everywhere).
- `MISTRALRS_NATIVE_DECODE`: "0" (or "false", "off", "no") runs the fused layers' decode steps as the plain
  modules' ATen calls (bit for bit the plain path) instead of the hand-written loops of
  mistralrs/layers/native_decode.h (within a tolerance of it); "1" (or "true", "on", "yes"): the loops (the default).
- `MISTRALRS_CPU_THREADS`: "auto" runs each step on the thread count the engine measures to be faster for its
  size, set on the engine thread alone (the default everywhere; see mistralrs/worker/cpu_threads.py); "fixed"
  never changes a thread count (the steps run on the count torch gives the engine thread). The `Runner`
  arguments are the reference API's, so this is how a library user opts out.
- `MISTRALRS_TP_SIZE`: N >= 1 processes (ranks) the model is sharded over with tensor parallelism (one CUDA GPU
  each with NCCL, CPU processes with gloo; mistralrs/engine/tensor_parallel.py); unset: every visible CUDA GPU
  when there are several and NCCL is on, else 1. The CLI's `--tp-size N` sets the same field.
- `MISTRALRS_TP_TIMEOUT`: seconds (a positive number, default 60) a tensor-parallel rank waits in one collective
  or for the head's next message: the bound on detecting a hung rank (or head). Every process of a run reads its
  own; the head's child ranks get the head's.
- `MISTRALRS_NO_NCCL`: "1" (or "true", "on", "yes") turns off the automatic tensor parallelism over several GPUs
  (the device map applies instead), as in the reference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import nn

from mistralrs.layers.fused_decode import attach_fused_decode
from mistralrs.layers.moe import MOE_BACKENDS, FusedMoE
from mistralrs.worker.cpu_threads import CPU_THREAD_POLICIES
from mistralrs.worker.forward_batch import ATTENTION_BACKENDS

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")
# environment variable -> (the field it sets, its accepted values, lower case -> the field's value)
_BOOL = {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)}
ENVIRONMENT = {
    "MISTRALRS_FUSED_DECODE": ("fused_decode", _BOOL),
    "MISTRALRS_NATIVE_DECODE": ("native_decode", _BOOL),
    "MISTRALRS_CPU_THREADS": ("cpu_threads", {policy: policy for policy in CPU_THREAD_POLICIES}),
    "MISTRALRS_NO_NCCL": ("nccl", {key: not value for key, value in _BOOL.items()}),
}
TP_SIZE_VARIABLE = "MISTRALRS_TP_SIZE"  # a positive integer: ExecutionOptions.tp_size
TP_TIMEOUT_VARIABLE = "MISTRALRS_TP_TIMEOUT"  # positive seconds: ExecutionOptions.tp_timeout_s


@dataclass(frozen=True)
class ExecutionOptions:
    """Which implementation runs each fast path (every one has a plain twin) and how CPU threads are used.

    The defaults are the fast paths and the measured thread count per step, for a library's `Runner` and for the
    CLI and the server alike (`from_env` applies the environment variables).
    """

    attention_backend: str = "sdpa"  # "sdpa": batched attention; "reference": per-sequence float32 plain twin
    moe_backend: str = "fused"  # "fused": tokens grouped by expert; "reference": per-token plain twin
    fused_decode: bool = True  # fused C++ decoder layers where a layer declares its layout (CPU)
    # the fused layers' decode steps (one token per sequence) through hand-written loops (a documented tolerance
    # of the plain path); False: the plain modules' ATen calls from C++ (bit for bit the plain path)
    native_decode: bool = True
    # quantized matmul kernels: True, the int8-activation dot products where a GGML type has one (CPU, bfloat16;
    # mistralrs/quant/qdot.py) and torch's int4 kernel for the others; "int4": torch's int4 kernel for every type
    # (the previous fast path); False: weights dequantized at load, F.linear (the plain twin)
    fast_kernels: bool | str = True
    cpu_threads: str = "auto"  # "auto": engine thread's count chosen per step; "fixed": never touched
    tp_size: int | None = None  # ranks of tensor parallelism; None: every CUDA GPU when several (and nccl), else 1
    nccl: bool = True  # several visible CUDA GPUs and no tp_size: tensor parallelism over all of them (NCCL)
    tp_timeout_s: float = 60.0  # longest wait of a tensor-parallel rank in one collective: a hung rank's bound

    def __post_init__(self) -> None:
        for name, value, accepted in (("attention_backend", self.attention_backend, ATTENTION_BACKENDS),
                                      ("moe_backend", self.moe_backend, MOE_BACKENDS),
                                      ("cpu_threads", self.cpu_threads, CPU_THREAD_POLICIES)):
            if value not in accepted:
                raise ValueError(f"{name}={value!r}; accepted values: {list(accepted)}")
        for name in ("fused_decode", "native_decode", "nccl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.fast_kernels, bool) or self.fast_kernels == "int4"):
            raise ValueError(f"fast_kernels must be True, False or 'int4', got {self.fast_kernels!r}")
        if self.tp_size is not None and (isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int)
                                         or self.tp_size < 1):
            raise ValueError(f"tp_size must be an int >= 1 or None, got {self.tp_size!r}")
        if isinstance(self.tp_timeout_s, bool) or not isinstance(self.tp_timeout_s, (int, float)) \
                or not 0 < self.tp_timeout_s < math.inf:
            raise ValueError(f"tp_timeout_s must be a positive number of seconds, got {self.tp_timeout_s!r}")

    @classmethod
    def from_env(cls, defaults: ExecutionOptions | None = None,
                 environ: Mapping[str, str] | None = None) -> ExecutionOptions:
        """`defaults` (default: `ExecutionOptions()`) with each field whose environment variable is set in `environ`
        (default: `os.environ`) taken from it (see the module docstring)."""
        environ = os.environ if environ is None else environ
        values = {}
        for variable, (name, accepted) in ENVIRONMENT.items():
            raw = environ.get(variable, "").strip().lower()
            if not raw:
                continue
            if raw not in accepted:
                raise ValueError(f"{variable}={environ[variable]!r}; accepted values: {list(accepted)}")
            values[name] = accepted[raw]
        raw = environ.get(TP_SIZE_VARIABLE, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{TP_SIZE_VARIABLE}={environ[TP_SIZE_VARIABLE]!r}; accepted values: an integer >= 1")
            values["tp_size"] = int(raw)
        raw = environ.get(TP_TIMEOUT_VARIABLE, "").strip()
        if raw:
            seconds = _positive_seconds(raw)
            if seconds is None:
                raise ValueError(f"{TP_TIMEOUT_VARIABLE}={environ[TP_TIMEOUT_VARIABLE]!r}; accepted values: a "
                                 "positive number of seconds")
            values["tp_timeout_s"] = seconds
        return replace(cls() if defaults is None else defaults, **values)


def _positive_seconds(raw: str) -> float | None:
    """`raw` as a positive, finite number of seconds; None when it is not one."""
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if 0 < seconds < math.inf else None


def apply_execution_options(model: nn.Module, options: ExecutionOptions) -> None:
    """Sets the model-side switches of `options` on `model`: every `FusedMoE` layer's backend, and the fused
    decoder layer attached to (or removed from) every decoder layer that declares its layout."""
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.set_backend(options.moe_backend)
    attach_fused_decode(model, options.fused_decode, options.native_decode)
