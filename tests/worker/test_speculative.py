"""The acceptance rule of speculative decoding (mistralrs/worker/speculative.py) on synthetic distributions.

The tokens a sequence keeps must be distributed exactly as the target's own samples: the first kept token as p_1,
the second (when the first draft token was accepted) as p_2, whatever the draft's q. A chi-square test over many
draws with fixed generators checks it; the draft's q is far from p, so sampling from p (instead of the residual
norm(max(0, p - q))) after a rejection would miss by a wide margin (checked too).
"""

from __future__ import annotations

import math

import torch

from mistralrs.sample import SamplingParams, SamplingRow
from mistralrs.sample.sampler import truncate
from mistralrs.worker.speculative import SpeculativeRunner, _Proposal

VOCAB = 6
NUM_DRAWS = 2_000
P_VALUE = 1e-6  # the draws are seeded, so the test is deterministic; this only says how far is too far


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` over the tokens with a non-zero probability, and its
    degrees of freedom (a count on a zero-probability token makes it infinite)."""
    support = probs > 0
    if bool((counts[~support] > 0).any()):
        return math.inf, int(support.sum()) - 1
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def critical_value(degrees: int, p_value: float = P_VALUE) -> float:
    """The chi-square statistic whose upper tail has probability `p_value` (bisection on torch's gammaincc)."""
    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        tail = float(torch.special.gammaincc(torch.tensor(degrees / 2), torch.tensor(middle / 2)))
        low, high = (middle, high) if tail > p_value else (low, middle)
    return high


def rows_for(params: SamplingParams, generator: torch.Generator, count: int) -> list[SamplingRow]:
    return [SamplingRow(params, [0, 1], 1, generator) for _ in range(count)]


def test_kept_tokens_follow_the_target_distribution_not_the_drafts():
    params = SamplingParams(temperature=0.8, top_k=5)
    target_logits = torch.tensor([[0.6, 0.4, 0.2, -1.0, 0.0, 0.5], [0.0, 0.5, 2.0, 1.0, -1.0, 0.0],
                                  [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    q = torch.tensor([[0.45, 0.45, 0.02, 0.04, 0.02, 0.02], [0.6, 0.1, 0.05, 0.05, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(1234)
    rows = rows_for(params, generator, 3)
    scaled = target_logits / params.temperature
    p = truncate(scaled, rows).softmax(dim=-1)   # top-k 5 drops one token of each row
    assert bool((p == 0).any(dim=-1).all())
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(NUM_DRAWS):
        drafted = [int(torch.multinomial(q[j], 1, generator=generator)) for j in range(2)]
        kept = SpeculativeRunner._accept(scaled, rows, _Proposal(drafted, [q[0], q[1]]))
        first[kept[0]] += 1
        if len(kept) > 1:
            second[kept[1]] += 1
    for counts, expected in ((first, p[0]), (second, p[1])):
        statistic, degrees = chi_square(counts, expected)
        assert statistic < critical_value(degrees), (counts / counts.sum(), expected)
    # the test's power: drawing from p instead of the residual after a rejection would give this first token
    accept = torch.minimum(torch.ones(VOCAB), p[0] / q[0])
    wrong = q[0] * accept + (1 - (q[0] * accept).sum()) * p[0]
    statistic, degrees = chi_square(NUM_DRAWS * wrong, p[0])
    assert statistic > 5 * critical_value(degrees)


def test_greedy_keeps_the_drafts_equal_to_the_targets_argmax_then_the_argmax():
    params = SamplingParams(temperature=0.0)
    rows = rows_for(params, None, 4)
    scaled = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    assert SpeculativeRunner._accept(scaled, rows, _Proposal([1, 0, 1])) == [1, 0, 2]   # third rejected
    assert SpeculativeRunner._accept(scaled, rows, _Proposal([1, 0, 2])) == [1, 0, 2, 0]   # bonus token
    assert SpeculativeRunner._accept(scaled, rows, _Proposal([2, 0, 2])) == [1]
