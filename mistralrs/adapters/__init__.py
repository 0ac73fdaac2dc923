"""LoRA and X-LoRA adapters on top of a loaded base model (REFERENCE §6): the ordering file, PEFT adapter loading,
merging into the base weights, adapters held separately in `Linear.adapters` (and in `FusedMoE.adapters` for
expert projections, moe_lora.py), the X-LoRA classifier, and the per-token adapter weights each engine step runs
with (runtime.py)."""

from mistralrs.adapters.lora import (
    LoraAdapter,
    LoraHook,
    LoraState,
    activate_adapters,
    apply_lora,
    load_lora_adapter,
    lora_state_of,
)
from mistralrs.adapters.moe_lora import ExpertLoraHook
from mistralrs.adapters.ordering import OrderingFile, PreloadAdapter, read_ordering
from mistralrs.adapters.runtime import (
    AdapterRuntime,
    adapter_cache_salt,
    adapter_runtime_of,
    request_adapter_set,
)
from mistralrs.adapters.xlora import (
    XLoraClassifier,
    XLoraConfig,
    apply_xlora,
    parse_xlora_config,
)

__all__ = [
    "AdapterRuntime", "ExpertLoraHook", "LoraAdapter", "LoraHook", "LoraState", "OrderingFile", "PreloadAdapter", "XLoraClassifier",
    "XLoraConfig", "activate_adapters", "adapter_cache_salt", "adapter_runtime_of", "apply_lora", "apply_xlora",
    "load_lora_adapter", "lora_state_of", "parse_xlora_config", "read_ordering", "request_adapter_set",
]
