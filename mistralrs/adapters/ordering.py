"""The adapter ordering file (REFERENCE §6.1): base model id, adapter order, layer numbering, preloads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreloadAdapter:
    """An adapter loaded at start-up but kept separate (switchable), from its own repo or directory."""

    name: str  # the adapter's name (its folder inside `adapter_model_id`, or the repo itself)
    adapter_model_id: str  # repo or directory holding the adapter


@dataclass(frozen=True)
class OrderingFile:
    """The parsed ordering JSON."""

    base_model_id: str  # the base model the adapters were trained on
    order: list[str] = field(default_factory=list)  # LoRA: adapters active at start-up (merged without preloads)
    layers: dict[str, int] = field(default_factory=dict)  # full module name -> LoRA-layer index
    preload_adapters: list[PreloadAdapter] = field(default_factory=list)  # adapters kept separate, switchable


def _str_list(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"ordering file: {what} must be a list of adapter names, got {value!r}")
    return list(value)


def _preloads(value) -> list[PreloadAdapter]:
    if not isinstance(value, list):
        raise ValueError(f"ordering file: preload_adapters must be a list, got {value!r}")
    result = []
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("adapter_model_id"), str)):
            raise ValueError("ordering file: each preload_adapters entry needs string 'name' and "
                             f"'adapter_model_id', got {entry!r}")
        result.append(PreloadAdapter(entry["name"], entry["adapter_model_id"]))
    return result


def parse_ordering(data: dict) -> OrderingFile:
    """Validates the JSON object of an ordering file."""
    if not isinstance(data, dict):
        raise ValueError(f"ordering file must hold a JSON object, got {type(data).__name__}")
    base = data.get("base_model_id")
    if not isinstance(base, str) or not base:
        raise ValueError(f"ordering file: base_model_id is required (a model id string), got {base!r}")
    layers = data.get("layers") or {}
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in layers.items()):
        raise ValueError(f"ordering file: layers must map module names to integers, got {layers!r}")
    order = _str_list(data.get("order") or [], "order")
    if len(set(order)) != len(order):
        raise ValueError(f"ordering file: order names an adapter twice: {order!r}")
    return OrderingFile(base, order, dict(layers), _preloads(data.get("preload_adapters") or []))


def read_ordering(path: str) -> OrderingFile:
    """Reads and validates the ordering JSON file at `path`."""
    if not os.path.isfile(path):
        raise ValueError(f"order: ordering file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"order: ordering file {path!r} is not valid JSON ({exc})") from exc
    return parse_ordering(data)


def same_model_id(a: str, b: str) -> bool:
    """True when two model ids name the same model (equal strings, or the same local directory)."""
    if a == b:
        return True
    a_dir, b_dir = os.path.expanduser(a), os.path.expanduser(b)
    return os.path.isdir(a_dir) and os.path.isdir(b_dir) and os.path.samefile(a_dir, b_dir)
