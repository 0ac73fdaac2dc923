"""Topology YAML (REFERENCE §5): ranges, overlaps, single layers, per-layer ISQ, devices, and bad input."""

from __future__ import annotations

import pytest
import torch

from mistralrs.quant.isq_types import parse_isq_type
from mistralrs.quant.topology import Topology, TopologyLayer


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "topology.yml"
    path.write_text(text)
    return str(path)


def _types(topology: Topology) -> list[str | None]:
    return [None if entry is None else (entry.isq.name if entry.isq else "none") for entry in topology.layers]


def test_reference_example_ranges(tmp_path):
    """The shipped `topologies/isq.yml`: 0-8 Q3K, 8-16 Q4K, 16-24 Q6K, 24-28 uncovered, 28-32 Q8_0."""
    topology = Topology.from_yaml(_write(tmp_path, "0-8:\n  isq: Q3K\n8-16:\n  isq: Q4K\n16-24:\n  isq: Q6K\n"
                                                   "28-32:\n  isq: Q8_0\n"))
    assert _types(topology) == ["Q3K"] * 8 + ["Q4K"] * 8 + ["Q6K"] * 8 + [None] * 4 + ["Q8_0"] * 4
    assert topology.layer(24) is None and topology.layer(100) is None
    assert topology.layer(None) is None  # layers without an index (lm_head) are never covered


def test_overlaps_resolve_by_increasing_end_whatever_the_file_order(tmp_path):
    """The range with the larger end wins where two overlap, even when it comes first in the file."""
    topology = Topology.from_yaml(_write(tmp_path, "2-6: {isq: q4_0}\n0-4: {isq: Q8_0}\n3: {isq: hqq8}\n"))
    # 0-4 (end 4) applied first, then 3-4 (end 4, single layer), then 2-6 (end 6) over both
    assert _types(topology) == ["Q8_0", "Q8_0", "Q4_0", "Q4_0", "Q4_0", "Q4_0"]


def test_single_layer_wins_inside_a_larger_earlier_range(tmp_path):
    topology = Topology.from_yaml(_write(tmp_path, "0-2: {isq: Q4K}\n3: {isq: Q6K}\n1: {isq: Q8_0}\n"))
    assert _types(topology) == ["Q4K", "Q8_0", None, "Q6K"]  # "1" (end 2) ties with 0-2 and is applied after it
    assert parse_isq_type("q6k") == topology.layer(3).isq


def test_covered_layer_without_isq_is_left_unquantized(tmp_path):
    topology = Topology.from_yaml(_write(tmp_path, "0-2:\n  device: cpu\n"))
    assert topology.layer(0) == TopologyLayer(isq=None, device=torch.device("cpu"))
    assert topology.devices() == {torch.device("cpu")}


def test_empty_file_covers_nothing(tmp_path):
    assert Topology.from_yaml(_write(tmp_path, "")).layers == ()


@pytest.mark.parametrize("text, message", [
    ("a-b: {isq: Q4K}\n", "layer range"),
    ("4-2: {isq: Q4K}\n", "end > start"),
    ("3-3: {isq: Q4K}\n", "end > start"),
    ("0-2: {isq: Q4K, dev: cpu}\n", "unknown keys"),
    ("0-2: Q4K\n", "must be a mapping"),
    ("0-2: {isq: Q9K}\n", "ISQ type Q9K unknown"),
    ("0-2: {device: gpu}\n", "cpu, cuda[ORD], metal[ORD]"),
    ("0-2: {device: 'metal[0]'}\n", "Metal is not supported"),
    ("- 1\n- 2\n", "must be a mapping of layer ranges"),
])
def test_bad_topology_raises_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Topology.from_yaml(_write(tmp_path, text))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() > 7, reason="needs fewer than 8 GPUs")
def test_absent_cuda_device_raises(tmp_path):
    with pytest.raises(ValueError, match="CUDA device"):
        Topology.from_yaml(_write(tmp_path, "0-2: {device: 'cuda[7]'}\n"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_present_cuda_device_parses(tmp_path):
    topology = Topology.from_yaml(_write(tmp_path, "0: {device: 'cuda[0]'}\n"))
    assert topology.layer(0).device == torch.device("cuda", 0)
