"""`AnyMoeMlp` routing rules (mistralrs/adapters/anymoe.py) on hand-made experts and gates: one expert per
sequence in a packed batch, the mean over the prompt tokens so far across chunks, the prompt's expert kept while
decoding, a retried chunk counted once, a new sequence on a reused block started afresh, training's gate output."""

from __future__ import annotations

import torch
from torch import nn

from mistralrs.adapters.anymoe import AnyMoeMlp
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec, SeqChunk, allocate_kv_caches

HIDDEN, BLOCK = 4, 4


class Scale(nn.Module):
    """An expert that multiplies by `factor`, so an output row tells which expert made it."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _moe() -> AnyMoeMlp:
    """Three experts (x1, x2, x3); the gate sends the one-hot row e_j to expert j with probability ~1."""
    moe = AnyMoeMlp([Scale(1.0), Scale(2.0), Scale(3.0)], HIDDEN, 0, device=torch.device("cpu"),
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3, HIDDEN) * 20)
        moe.gate.bias.zero_()
    return moe


def _rows(experts: list[int]) -> torch.Tensor:
    """One-hot rows e_j for the listed j."""
    return torch.eye(HIDDEN)[experts]


def _step(moe: AnyMoeMlp, seqs: list[tuple[list[int], int, int, int]]) -> tuple[list[int], torch.Tensor]:
    """Runs `moe` on one packed step of `(rows' experts, start position, prompt length, first block)` per
    sequence; returns its routing and output."""
    kv = allocate_kv_caches(KVCacheSpec(1, 1, 1), 64, BLOCK, torch.float32, "cpu")
    chunks = [SeqChunk([0] * len(rows), start, list(range(first, first + 8)), prompt)
              for rows, start, prompt, first in seqs]
    x = torch.cat([_rows(rows) for rows, _, _, _ in seqs])
    with ForwardBatch.build(chunks, BLOCK, kv, "cpu").active():
        out = moe(x)
    return list(moe.last_routing), out


def test_each_sequence_of_a_packed_batch_gets_its_own_expert():
    moe = _moe()
    routing, out = _step(moe, [([1, 1, 0], 0, 3, 0), ([2, 0, 2, 2], 0, 4, 8), ([0], 0, 1, 16)])
    assert routing == [1, 2, 0]
    factors = torch.tensor([2.0] * 3 + [3.0] * 4 + [1.0])
    assert torch.equal(out, torch.cat([_rows([1, 1, 0]), _rows([2, 0, 2, 2]), _rows([0])]) * factors[:, None])


def test_chunks_route_by_the_prompt_so_far_and_decoding_keeps_the_expert():
    moe = _moe()
    assert _step(moe, [([1, 1], 0, 6, 0)])[0] == [1]
    assert _step(moe, [([2, 2, 2, 2], 2, 6, 0)])[0] == [2]   # 4 x e2 against 2 x e1 over the whole prompt
    routing, out = _step(moe, [([1], 6, 6, 0)])   # a generated token that the gate alone would send to 1
    assert routing == [2] and torch.equal(out, _rows([1]) * 3)
    assert _step(moe, [([0], 7, 6, 0)])[0] == [2]


def test_a_chunk_that_runs_again_counts_once():
    moe = _moe()
    _step(moe, [([1, 1, 1], 0, 5, 0)])
    assert _step(moe, [([2, 2], 3, 5, 0)])[0] == [1]   # 3 x e1 against 2 x e2
    assert _step(moe, [([2, 2], 3, 5, 0)])[0] == [1]   # counted twice it would be 4 x e2
    assert _step(moe, [([0], 5, 5, 0)])[0] == [1]


def test_a_sequence_starting_at_position_zero_starts_afresh():
    moe = _moe()
    _step(moe, [([1, 1, 1], 0, 3, 0)])
    assert _step(moe, [([2], 0, 1, 0)])[0] == [2]   # same first block, a new sequence (or a recomputed one)


def test_a_call_outside_a_step_routes_all_rows_as_one_sequence():
    moe = _moe()
    out = moe(_rows([2, 2, 1]))
    assert moe.last_routing == (2,) and torch.equal(out, _rows([2, 2, 1]) * 3)


def test_training_keeps_the_sequence_averaged_gate_output():
    moe = _moe()
    moe.start_training()
    routing, _ = _step(moe, [([1, 1, 0], 0, 3, 0), ([2], 0, 1, 8)])
    assert routing == [1, 2] and moe.gate_output.requires_grad
    probs = torch.softmax(moe.gate(_rows([1, 1, 0])), dim=-1).mean(dim=0)
    assert torch.allclose(moe.gate_output[0], probs)
    moe.gate_output.sum().backward()
    assert moe.gate.weight.grad is not None
    moe.finish_training()
    assert moe.gate_output is None and not moe.gate.weight.requires_grad
