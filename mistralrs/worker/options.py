"""How the engine executes a loaded model: which twin of each fast path runs, and the CPU thread policy.

One `ExecutionOptions` is chosen at load and handed down explicitly. The model runner applies the model-side
switches when it is built (`apply_execution_options`: the MoE backend of every `FusedMoE`, the fused decoder layer
attached to every layer that declares its layout), passes the attention backend to every step's `ForwardBatch`,
and runs its CPU thread chooser under the policy (mistralrs/worker/cpu_threads.py). `fast_kernels` is what the
quant configs take as `use_fast_kernels` at load.

Environment variables that choose an execution path are read here and nowhere else, by `from_env` (and so by
`for_library` / `for_service`); a value given by the caller wins over the environment:

- `MISTRALRS_FUSED_DECODE`: "0" (or "false", "off", "no") keeps every decoder layer on its plain PyTorch modules
  instead of the fused C++ layer (mistralrs/layers/fused_decode.py); "1" (or "true", "on", "yes") or unset: fused.
  Any other value is a `ValueError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from torch import nn

from mistralrs.layers.fused_decode import attach_fused_decode
from mistralrs.layers.moe import MOE_BACKENDS, FusedMoE
from mistralrs.worker.cpu_threads import CPU_THREAD_POLICIES
from mistralrs.worker.forward_batch import ATTENTION_BACKENDS

# environment variable -> the boolean field it sets (see the module docstring)
ENVIRONMENT_SWITCHES = {"MISTRALRS_FUSED_DECODE": "fused_decode"}
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class ExecutionOptions:
    """Which implementation runs each fast path (every one has a plain twin) and how CPU threads are used.

    The defaults are the fast paths and the thread policy of a library (`for_library`); the CLI and the server use
    `for_service`.
    """

    attention_backend: str = "sdpa"  # "sdpa": batched attention; "reference": per-sequence float32 plain twin
    moe_backend: str = "fused"  # "fused": tokens grouped by expert; "reference": per-token plain twin
    fused_decode: bool = True  # fused C++ decoder layers where a layer declares its layout (CPU, bit-exact)
    fast_kernels: bool = True  # quantized matmul kernels; False: weights dequantized at load, F.linear (plain)
    cpu_threads: str = "fixed"  # "auto": thread count chosen per step; "fixed": torch's setting never touched

    def __post_init__(self) -> None:
        for name, value, accepted in (("attention_backend", self.attention_backend, ATTENTION_BACKENDS),
                                      ("moe_backend", self.moe_backend, MOE_BACKENDS),
                                      ("cpu_threads", self.cpu_threads, CPU_THREAD_POLICIES)):
            if value not in accepted:
                raise ValueError(f"{name}={value!r}; accepted values: {list(accepted)}")
        for name in ("fused_decode", "fast_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **choices) -> ExecutionOptions:
        """The options with the fields in `choices` as given, the others from their environment variable when it
        is set (`environ`, default `os.environ`; see the module docstring), else their default."""
        environ = os.environ if environ is None else environ
        unknown = set(choices) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown execution options {sorted(unknown)}; accepted: {[f.name for f in fields(cls)]}")
        values = {}
        for variable, name in ENVIRONMENT_SWITCHES.items():
            raw = environ.get(variable, "").strip().lower()
            if name in choices or not raw:
                continue
            if raw not in _TRUE + _FALSE:
                raise ValueError(f"{variable}={environ[variable]!r}; accepted values: {list(_TRUE + _FALSE)}")
            values[name] = raw in _TRUE
        return cls(**values, **choices)

    @classmethod
    def for_library(cls, environ: Mapping[str, str] | None = None) -> ExecutionOptions:
        """A `Runner` in the user's own program: the thread count is left to the program ("fixed"; the chooser
        would change it for every thread the program starts afterwards, see mistralrs/worker/cpu_threads.py)."""
        return cls.from_env(environ, cpu_threads="fixed")

    @classmethod
    def for_service(cls, environ: Mapping[str, str] | None = None) -> ExecutionOptions:
        """The CLI and the HTTP server, which own their process: decode steps on the measured faster thread count."""
        return cls.from_env(environ, cpu_threads="auto")


def apply_execution_options(model: nn.Module, options: ExecutionOptions) -> None:
    """Sets the model-side switches of `options` on `model`: every `FusedMoE` layer's backend, and the fused
    decoder layer attached to (or removed from) every decoder layer that declares its layout."""
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.set_backend(options.moe_backend)
    attach_fused_decode(model, options.fused_decode)
