"""LoRA adapters on top of a loaded base model (REFERENCE §6.1-6.2): the ordering file, PEFT adapter loading,
merging into the base weights, and separate switchable adapters hooked into `Linear.adapters`."""

from mistralrs.adapters.lora import (
    LoraAdapter,
    LoraHook,
    LoraState,
    activate_adapters,
    apply_lora,
    load_lora_adapter,
    lora_state_of,
)
from mistralrs.adapters.ordering import OrderingFile, PreloadAdapter, read_ordering

__all__ = [
    "LoraAdapter", "LoraHook", "LoraState", "OrderingFile", "PreloadAdapter", "activate_adapters", "apply_lora",
    "load_lora_adapter", "lora_state_of", "read_ordering",
]
