"""Topology YAML: a per-decoder-layer ISQ type and device (REFERENCE §5).

    0-8:   {isq: Q3K}            # layers 0..7 (start inclusive, end exclusive)
    8-16:  {isq: Q4K, device: cpu}
    16:    {isq: Q8_0}           # one layer

Ranges are applied in order of increasing end, so where two overlap the one with the larger end wins (a single
layer `N` is the range `N-(N+1)`). A covered layer takes the entry's ISQ type even when the entry has no `isq`
key (it is then left unquantized); uncovered layers, and layers without an index (`lm_head`), keep the global
`in_situ_quant`. `device` is `cpu`, `cuda[ORD]` (the ordinal must exist here) or `metal[ORD]` (refused: this
build has no Metal backend).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mistralrs.dependencies import import_dependency
from mistralrs.quant.isq_types import IsqType, parse_isq_type

_KEY_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_DEVICE_RE = re.compile(r"^(cpu|cuda\[(\d+)\]|metal\[(\d+)\])$")
_ENTRY_KEYS = ("isq", "device")


@dataclass(frozen=True)
class TopologyLayer:
    """What the topology says about one covered decoder layer."""

    isq: IsqType | None              # None: the layer is left unquantized
    device: torch.device | None      # None: the model's device


@dataclass(frozen=True)
class Topology:
    """Per-layer settings by decoder-layer index (`layers[i]` None where the topology does not cover layer i)."""

    layers: tuple[TopologyLayer | None, ...]

    def layer(self, index: int | None) -> TopologyLayer | None:
        """The entry of decoder layer `index`; None when uncovered or `index` is None (layers with no index)."""
        if index is None or index >= len(self.layers):
            return None
        return self.layers[index]

    def devices(self) -> set[torch.device]:
        """Devices named by any entry."""
        return {entry.device for entry in self.layers if entry is not None and entry.device is not None}

    @staticmethod
    def from_yaml(path: str) -> Topology:
        """Reads and validates a topology file; ValueError naming the bad key or value."""
        with open(path, encoding="utf-8") as f:
            data = import_dependency("yaml").safe_load(f)  # imported here: only topology files need PyYAML
        return Topology.from_dict({} if data is None else data, source=path)

    @staticmethod
    def from_dict(data: dict, source: str = "topology") -> Topology:
        """Builds a topology from the parsed YAML mapping."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a topology must be a mapping of layer ranges, got {type(data).__name__}")
        ranges = sorted((_parse_range(key, source) + (_parse_entry(key, value, source),)
                         for key, value in data.items()), key=lambda item: item[1])
        size = max((end for _, end, _ in ranges), default=0)
        layers: list[TopologyLayer | None] = [None] * size
        for start, end, entry in ranges:  # increasing end: a later (larger-end) range overwrites
            layers[start:end] = [entry] * (end - start)
        return Topology(tuple(layers))


def _parse_range(key, source: str) -> tuple[int, int]:
    match = _KEY_RE.match(str(key).strip())
    if match is None:
        raise ValueError(f"{source}: key {key!r} must be a layer range 'start-end' or a single layer 'N'")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start + 1
    if end <= start:
        raise ValueError(f"{source}: range {key!r} must have end > start")
    return start, end


def _parse_entry(key, value, source: str) -> TopologyLayer:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{source}: entry {key!r} must be a mapping with keys {list(_ENTRY_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{source}: entry {key!r} has unknown keys {unknown}; accepted: {list(_ENTRY_KEYS)}")
    isq = parse_isq_type(str(value["isq"])) if value.get("isq") is not None else None
    device = parse_topology_device(str(value["device"]), source) if value.get("device") is not None else None
    return TopologyLayer(isq, device)


def parse_topology_device(text: str, source: str = "topology") -> torch.device:
    """`cpu` or `cuda[ORD]` as a torch device; ValueError for a malformed or absent device and for Metal."""
    match = _DEVICE_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{source}: device {text!r} must be one of cpu, cuda[ORD], metal[ORD]")
    if match.group(3) is not None:
        raise ValueError(f"{source}: device {text!r}: Metal is not supported by this build (use cpu or cuda[ORD])")
    if match.group(2) is None:
        return torch.device("cpu")
    ordinal = int(match.group(2))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ordinal >= count:
        raise ValueError(f"{source}: device {text!r}: this machine has {count} CUDA device(s)")
    return torch.device("cuda", ordinal)
