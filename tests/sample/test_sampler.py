"""Tests of the batched sampler against hand computations in plain torch/Python."""

import dataclasses
import math

import pytest
import torch

from mistralrs.sample import SampledToken, Sampler, SamplingParams, SamplingRow, dry_penalties
from mistralrs.sample.sampler import apply_logit_adjustments, min_p_mask, top_k_top_p_mask, truncate


def _row(params: SamplingParams, token_ids=(0,), seed: int | None = 0) -> SamplingRow:
    generator = None if params.is_greedy else torch.Generator().manual_seed(seed)
    return SamplingRow(params=params, token_ids=list(token_ids), num_prompt_tokens=1, generator=generator)


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()[None, :]


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int) -> torch.Tensor:
    """Sample num_draws tokens in one call: a batch of identical rows sharing one generator."""
    generator = torch.Generator().manual_seed(1234)
    rows = [SamplingRow(params, [0], 1, generator) for _ in range(num_draws)]
    tokens = Sampler()(logits_row.expand(num_draws, -1), rows)
    return torch.tensor([t.token_id for t in tokens])


def _frequencies(draws: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(draws, minlength=vocab_size).float() / len(draws)


# --- greedy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1e-8])
def test_greedy_is_exact_argmax(temperature):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = [_row(SamplingParams(temperature=temperature, top_k=3, top_p=0.1, min_p=0.5)) for _ in range(6)]
    tokens = Sampler()(logits, rows)
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("vocab_size", [7, 262144])
def test_greedy_takes_the_first_of_tied_maxima_as_argmax(vocab_size):
    logits = torch.randint(0, 3, (4, vocab_size), generator=torch.Generator().manual_seed(3)).float()
    logits[2, vocab_size // 2] = math.nan
    rows = [_row(SamplingParams(temperature=0)) for _ in range(4)]
    assert [t.token_id for t in Sampler()(logits, rows)] == logits.argmax(dim=-1).tolist()


def test_sampler_does_not_modify_input_logits():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = SamplingParams(temperature=0.7, presence_penalty=1.0, logit_bias={1: 3.0}, dry_multiplier=1.0)
    Sampler()(logits, [_row(params, [1, 2, 1, 2, 1]), _row(SamplingParams(temperature=0), [3])])
    assert torch.equal(logits, before)


def test_private_logits_are_adjusted_in_place_with_the_same_result():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logit_bias={4: 9.0}, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.8, presence_penalty=1.0, dry_multiplier=1.0, logprobs=True),
              SamplingParams(temperature=0, frequency_penalty=0.5, logit_bias={7: -2.0})]
    contexts = [[4, 5], [1, 2, 1, 2, 1], [3, 3, 9]]

    def sample(batch, **kw):
        return Sampler()(batch, [_row(p, c, seed=i) for i, (p, c) in enumerate(zip(params, contexts))], **kw)

    plain = sample(logits)
    adjusted = apply_logit_adjustments(logits, [_row(p, c) for p, c in zip(params, contexts)])
    handed_over = logits.clone()
    assert sample(handed_over, private=True) == plain
    assert torch.equal(handed_over, adjusted)  # the bias and penalties went into the caller's tensor
    half = logits.to(torch.bfloat16)
    before = half.clone()
    assert [t.token_id for t in sample(half)] == [t.token_id for t in sample(half.float())]
    assert torch.equal(half, before)  # its float32 copy was the one adjusted


def test_logit_adjustments_in_place_equal_the_copy():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    rows = [_row(SamplingParams(temperature=0, logit_bias={2: 1.5}, presence_penalty=0.3), [2, 6, 6]),
            _row(SamplingParams(temperature=0, dry_multiplier=0.8), [5, 1, 5, 1, 5])]
    copy = apply_logit_adjustments(logits, rows)
    target = logits.clone()
    assert apply_logit_adjustments(target, rows, in_place=True) is target
    assert torch.equal(target, copy) and not torch.equal(copy, logits)


# --- penalties and bias -------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_exact():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5, -1.0]])
    context = [2, 3, 3, 5, 3, 2]  # counts: 2→2, 3→3, 5→1
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    counts = [0, 0, 2, 3, 0, 1]
    expected = torch.tensor([[v - c * 0.25 - (0.5 if c else 0.0) for v, c in zip(logits[0].tolist(), counts)]])
    adjusted = apply_logit_adjustments(logits, [_row(params, context)])
    assert torch.equal(adjusted, expected)
    # Through the sampler: greedy picks the argmax of the penalised logits, and the full top_logprobs
    # list is the log-softmax of the penalised logits.
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, top_logprobs=6)
    (token,) = Sampler()(logits, [_row(params, context)])
    assert token.token_id == int(expected.argmax()) == 3
    reference = torch.log_softmax(expected[0], dim=-1)
    for token_id, logprob in token.top_logprobs:
        assert logprob == pytest.approx(reference[token_id].item(), abs=1e-6)


def test_penalties_apply_per_row_only():
    logits = torch.zeros(2, 4)
    rows = [
        _row(SamplingParams(temperature=0, frequency_penalty=1.0), [1, 1]),
        _row(SamplingParams(temperature=0), [1, 1]),
    ]
    adjusted = apply_logit_adjustments(logits, rows)
    assert adjusted[0].tolist() == [0.0, -2.0, 0.0, 0.0]
    assert adjusted[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_logit_bias_forces_token_greedy_and_sampled():
    logits = torch.tensor([[5.0, 4.0, -3.0, 1.0]]).expand(4, -1)
    rows = [
        _row(SamplingParams(temperature=0, logit_bias={2: 100.0})),
        _row(SamplingParams(temperature=1.0, logit_bias={2: 100.0}), seed=3),
        _row(SamplingParams(temperature=0, logit_bias={0: -100.0, 1: -100.0})),
        _row(SamplingParams(temperature=0)),
    ]
    assert [t.token_id for t in Sampler()(logits, rows)] == [2, 2, 3, 0]


def test_logit_bias_out_of_vocab_is_rejected():
    with pytest.raises(ValueError, match="logit_bias token id 9"):
        Sampler()(torch.zeros(1, 4), [_row(SamplingParams(temperature=0, logit_bias={9: 1.0}))])


# --- DRY ------------------------------------------------------------------------------------------------


def test_dry_penalises_continuation_of_repeat():
    params = SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    # "5 6 7" occurred before, followed by 8: the repeat is 3 tokens long → 0.8 * 1.75 ** (3 - 2).
    assert dry_penalties([5, 6, 7, 8, 1, 5, 6, 7], params) == {8: pytest.approx(0.8 * 1.75)}
    # Two earlier occurrences: each continuation gets the length of its own repeat.
    context = [9, 7, 4, 5, 6, 7, 8, 2, 6, 7]  # "6 7"→8 (length 2), "7"→4 (length 1 < 2)
    assert dry_penalties(context, params) == {8: pytest.approx(0.8)}
    # The same continuation reached through repeats of different lengths takes the longest.
    context = [6, 7, 3, 5, 6, 7, 3, 1, 5, 6, 7]  # "7"→3 via "6 7" (2) and via "5 6 7" (3)
    assert dry_penalties(context, params) == {3: pytest.approx(0.8 * 1.75)}


def test_dry_breakers_stop_matching():
    context = [5, 6, 7, 8, 1, 5, 6, 7]
    breaks_inside = SamplingParams(dry_multiplier=0.8, dry_allowed_length=2, dry_sequence_breaker_ids=frozenset({6}))
    assert dry_penalties(context, breaks_inside) == {}  # the repeat stops at 6: length 1
    breaks_last = SamplingParams(dry_multiplier=0.8, dry_allowed_length=1, dry_sequence_breaker_ids=frozenset({7}))
    assert dry_penalties(context, breaks_last) == {}
    breaks_next = SamplingParams(dry_multiplier=0.8, dry_allowed_length=1, dry_sequence_breaker_ids=frozenset({8}))
    assert dry_penalties(context, breaks_next) == {}
    no_breakers = SamplingParams(dry_multiplier=0.8, dry_allowed_length=1)
    assert dry_penalties(context, no_breakers) == {8: pytest.approx(0.8 * 1.75**2)}


def test_dry_off_and_match_length_cap():
    assert dry_penalties([1, 2, 1, 2, 1, 2], SamplingParams()) == {}
    params = SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2)
    assert dry_penalties([1] * 100, params) == {1: 2.0 ** (50 - 2)}


def test_dry_changes_greedy_choice():
    logits = torch.zeros(1, 10)
    logits[0, 8] = 1.0
    logits[0, 3] = 0.5
    context = [5, 6, 7, 8, 1, 5, 6, 7]
    plain = Sampler()(logits, [_row(SamplingParams(temperature=0), context)])
    dry = Sampler()(logits, [_row(SamplingParams(temperature=0, dry_multiplier=0.8), context)])
    assert plain[0].token_id == 8
    assert dry[0].token_id == 3
    adjusted = apply_logit_adjustments(logits, [_row(SamplingParams(temperature=0, dry_multiplier=0.8), context)])
    assert adjusted[0, 8].item() == pytest.approx(1.0 - 0.8 * 1.75)


# --- truncation -------------------------------------------------------------------------------------------


def test_top_k_one_always_picks_argmax():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    rows = [_row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(64)]
    assert [t.token_id for t in Sampler()(logits, rows)] == logits.argmax(dim=-1).tolist()


def _reference_keep(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Plain-Python top-k → top-p → min-p on one row; returns the kept token ids."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k > 0 else order
    weights = [math.exp(logits[i]) for i in kept]
    total = sum(weights)
    if top_p < 1:
        cumulative, nucleus = 0.0, []
        for token_id, weight in zip(kept, weights):
            if cumulative >= top_p:
                break
            nucleus.append(token_id)
            cumulative += weight / total
        kept = nucleus
    best = max(math.exp(logits[i]) for i in kept)
    return {i for i in kept if math.exp(logits[i]) >= min_p * best}


def test_truncation_masks_match_reference():
    generator = torch.Generator().manual_seed(5)
    settings = [  # (top_k, top_p, min_p)
        (0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (7, 0.9, 0.0), (0, 1.0, 0.2), (10, 0.8, 0.1), (3, 0.3, 0.5)
    ]
    logits = torch.randn(len(settings), 40, generator=generator) * 2
    top_k = [k if k > 0 else 40 for k, _, _ in settings]
    top_p = [p for _, p, _ in settings]
    min_p = torch.tensor([m for _, _, m in settings])
    masked = min_p_mask(top_k_top_p_mask(logits, top_k, top_p), min_p)
    with_top_k = [i for i, (k, _, _) in enumerate(settings) if k > 0]  # the partial-sort path (top-10 only)
    partial = top_k_top_p_mask(logits[with_top_k], [top_k[i] for i in with_top_k], [top_p[i] for i in with_top_k])
    assert torch.equal(partial, top_k_top_p_mask(logits, top_k, top_p)[with_top_k])
    for row, (k, p, m) in enumerate(settings):
        kept = set(torch.nonzero(masked[row] > -math.inf).flatten().tolist())
        assert kept == _reference_keep(logits[row].tolist(), k, p, m), (k, p, m)
        assert torch.equal(masked[row][list(kept)], logits[row][list(kept)])


def test_top_k_rows_draw_as_the_full_vocabulary_computation():
    """A sampled row with a top-k draws among its candidates only: the same token as the plain full-vocabulary
    computation (`truncate` over the whole row, Gumbel noise on every kept token) given the same k uniforms of
    its generator, one per candidate in descending order of logit."""
    vocab_size = 3000
    settings = [  # (temperature, top_k, top_p, min_p)
        (0.7, 40, 0.9, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 200, 0.5, 0.0), (0.8, 50, 1.0, 0.05), (2.0, 2999, 0.95, 0.02),
        (1.0, 1, 1.0, 0.0),
    ]
    logits = torch.randn(len(settings), vocab_size, generator=torch.Generator().manual_seed(11)) * 3
    for step in range(20):
        rows = [_row(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m), seed=100 * step + i)
                for i, (t, k, p, m) in enumerate(settings)]
        chosen = [token.token_id for token in Sampler()(logits, rows)]
        scaled = logits / torch.tensor([t for t, _, _, _ in settings])[:, None]
        truncated = truncate(scaled, rows)
        for i, (_, k, _, _) in enumerate(settings):
            uniform = torch.rand(k, generator=torch.Generator().manual_seed(100 * step + i))
            noise = torch.zeros(vocab_size)
            noise[scaled[i].topk(k).indices] = -torch.log(-torch.log(uniform))
            assert chosen[i] == (truncated[i] + noise).argmax().item(), (step, settings[i])


def test_sampler_groups_rows_without_changing_any_row():
    """Greedy rows, top-k rows and rows over the whole vocab in one batch: each row's token is the one it gets
    alone (the groups are drawn apart), and a row over the whole vocab draws `[vocab]` uniforms for its noise."""
    vocab_size = 500
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=20, top_p=0.8),
              SamplingParams(temperature=1.0), SamplingParams(temperature=1.2, top_p=0.7, min_p=0.1),
              SamplingParams(temperature=0.6, top_k=vocab_size)]
    together = [t.token_id for t in Sampler()(logits, [_row(p, seed=i) for i, p in enumerate(params)])]
    alone = [Sampler()(logits[i:i + 1], [_row(p, seed=i)])[0].token_id for i, p in enumerate(params)]
    assert together == alone
    assert together[0] == logits[0].argmax().item()
    for i in (2, 3, 4):
        uniform = torch.rand(vocab_size, generator=torch.Generator().manual_seed(i))
        scaled = logits[i:i + 1] / params[i].temperature
        expected = (truncate(scaled, [_row(params[i])]) - torch.log(-torch.log(uniform))).argmax().item()
        assert together[i] == expected


def test_top_p_sampling_keeps_nucleus_with_renormalised_probs():
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    draws = _draw_many(_logits_of(probs), SamplingParams(top_p=0.8), 4000)
    frequencies = _frequencies(draws, 5)
    assert frequencies[3:].sum().item() == 0.0  # 0.4 + 0.3 + 0.15 reaches 0.8: tokens 3, 4 excluded
    expected = torch.tensor([0.4, 0.3, 0.15]) / 0.85
    assert torch.allclose(frequencies[:3], expected, atol=0.03)


@pytest.mark.parametrize("top_p,num_kept", [(0.25, 1), (0.3, 2), (0.5, 2), (0.75, 3), (0.9, 4)])
@pytest.mark.parametrize("top_k", [5, 6])  # the partial-sort path, and the full sort
def test_top_p_at_an_exact_probability_tie(top_p, top_k, num_kept):
    """Four equally likely tokens (exactly 0.25 each): the nucleus stops at the token whose cumulative probability
    reaches top_p, also when it reaches it exactly, and keeps only as many of the tied tokens as that needs."""
    logits = torch.tensor([[0.0, -math.inf, 0.0, 0.0, -math.inf, 0.0]])
    assert torch.equal(logits.softmax(-1), torch.tensor([[0.25, 0, 0.25, 0.25, 0, 0.25]]))  # exact in float
    kept = top_k_top_p_mask(logits, [top_k], [top_p]) > -math.inf
    assert int(kept.sum()) == num_kept and not kept[0, [1, 4]].any()
    draws = _draw_many(logits, SamplingParams(top_p=top_p, top_k=top_k), 64)
    assert len(set(draws.tolist())) == num_kept and set(draws.tolist()) <= {0, 2, 3, 5}


def test_top_p_always_keeps_top_token():
    draws = _draw_many(_logits_of([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_p=0.05), 200)
    assert set(draws.tolist()) == {0}


def test_min_p_sampling_applies_without_top_p():
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    draws = _draw_many(_logits_of(probs), SamplingParams(min_p=0.15, top_p=1.0), 4000)
    frequencies = _frequencies(draws, 5)
    assert frequencies[3:].sum().item() == 0.0  # threshold 0.15 * 0.5 = 0.075
    assert torch.allclose(frequencies[:3], torch.tensor([0.5, 0.3, 0.1]) / 0.9, atol=0.03)


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = _draw_many(logits[0:1], SamplingParams(temperature=0.5), 4000)
    expected = torch.softmax(logits[0] / 0.5, dim=-1)
    assert torch.allclose(_frequencies(draws, 4), expected, atol=0.03)


# --- reproducibility ----------------------------------------------------------------------------------


def _run_steps(position: int, others: list[SamplingParams], seed: int, num_steps: int = 15) -> list[int]:
    """Sample num_steps tokens for one seeded row placed at `position` among other rows."""
    logits_generator = torch.Generator().manual_seed(99)
    other_logits_generator = torch.Generator().manual_seed(position)
    generator = torch.Generator().manual_seed(seed)
    other_rows = [_row(p, seed=100 + i) for i, p in enumerate(others)]
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01, presence_penalty=0.3)
    history = [0]
    for _ in range(num_steps):
        row_logits = torch.randn(1, 64, generator=logits_generator)
        other_logits = torch.randn(len(others), 64, generator=other_logits_generator)
        logits = torch.cat([other_logits[:position], row_logits, other_logits[position:]])
        row = SamplingRow(params, list(history), 1, generator)
        rows = other_rows[:position] + [row] + other_rows[position:]
        history.append(Sampler()(logits, rows)[position].token_id)
    return history[1:]


def test_seeded_row_is_reproducible_and_independent_of_batch():
    alone = _run_steps(0, [], seed=7)
    assert alone == _run_steps(0, [], seed=7)
    crowded = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_p=0.5), SamplingParams(top_k=2)]
    assert alone == _run_steps(2, crowded, seed=7)
    assert alone == _run_steps(1, crowded[::-1], seed=7)
    assert alone != _run_steps(0, [], seed=8)


# --- logprobs -----------------------------------------------------------------------------------------------


def test_logprobs_are_natural_log_softmax_before_truncation():
    logits = torch.randn(3, 25, generator=torch.Generator().manual_seed(11))
    rows = [
        _row(SamplingParams(temperature=0, logprobs=True, top_logprobs=5)),
        _row(SamplingParams(temperature=0.7, top_k=3, logprobs=True, top_logprobs=2), seed=1),
        _row(SamplingParams(temperature=1.3, top_p=0.5, logprobs=True), seed=2),
    ]
    tokens = Sampler()(logits, rows)
    for token, row_logits, temperature in zip(tokens, logits, [1.0, 0.7, 1.3]):
        reference = torch.log_softmax(row_logits / temperature, dim=-1)
        assert token.logprob == pytest.approx(reference[token.token_id].item(), abs=1e-5)
        expected_top = reference.topk(len(token.top_logprobs))
        assert [i for i, _ in token.top_logprobs] == expected_top.indices.tolist()
        assert [v for _, v in token.top_logprobs] == pytest.approx(expected_top.values.tolist(), abs=1e-5)
    assert math.exp(tokens[0].logprob) == pytest.approx(torch.softmax(logits[0], -1).max().item(), rel=1e-5)


def test_logprob_only_for_rows_that_report_or_rank_it():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(13))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, rank_by_logprob=True),
              SamplingParams(temperature=0.9, top_k=20), SamplingParams(temperature=0.9, logprobs=True)]
    tokens = Sampler()(logits, [_row(p, seed=i) for i, p in enumerate(params)])
    assert [t.logprob is None for t in tokens] == [True, False, True, False]
    for token, row_logits, temperature in zip(tokens[1::2], logits[1::2], [1.0, 0.9]):
        reference = torch.log_softmax(row_logits / temperature, dim=-1)
        assert token.logprob == pytest.approx(reference[token.token_id].item(), abs=1e-5)
    # the same draws as when every row computes its logprob; a batch where no row needs one computes none
    everyone = [dataclasses.replace(p, rank_by_logprob=True) for p in params]
    again = Sampler()(logits, [_row(p, seed=i) for i, p in enumerate(everyone)])
    assert [t.token_id for t in again] == [t.token_id for t in tokens]
    alone = Sampler()(logits[::2], [_row(p, seed=i) for i, p in list(enumerate(params))[::2]])
    assert [(t.token_id, t.logprob) for t in alone] == [(t.token_id, None) for t in tokens[::2]]


def test_top_logprobs_sorted_and_of_asked_length():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(12))
    asked = [0, 1, 20, 7]
    rows = [_row(SamplingParams(temperature=0.8, logprobs=True, top_logprobs=n), seed=n) for n in asked]
    tokens = Sampler()(logits, rows)
    for token, n in zip(tokens, asked):
        assert isinstance(token, SampledToken)
        assert len(token.top_logprobs) == n
        values = [v for _, v in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(isinstance(i, int) for i, _ in token.top_logprobs)


# --- mixed batch ------------------------------------------------------------------------------------------------


def test_mixed_batch_greedy_rows_exact_and_sampled_rows_valid():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(13))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0, frequency_penalty=0.5),
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.5, min_p=0.9),
    ]
    context = [int(logits[2].argmax())] * 3
    rows = [_row(p, context, seed=i) for i, p in enumerate(params)]
    tokens = [t.token_id for t in Sampler()(logits, rows)]
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[4] == argmax[4]
    penalised = logits[2].clone()
    penalised[context[0]] -= 1.5
    assert tokens[2] == int(penalised.argmax())
    assert tokens[1] in logits[1].topk(2).indices.tolist()
    assert tokens[3] == argmax[3]
    probs = torch.softmax(logits[5] / 0.5, dim=-1)
    assert probs[tokens[5]] >= 0.9 * probs.max()


def test_empty_batch():
    assert Sampler()(torch.zeros(0, 5), []) == []


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": -1}, ValueError, "temperature must be >= 0, got -1"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
        ({"temperature": "0.5"}, TypeError, "temperature must be a number"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.0}, ValueError, r"min_p must be in \[0, 1\)"),
        ({"min_p": -0.1}, ValueError, r"min_p must be in \[0, 1\)"),
        ({"presence_penalty": float("inf")}, ValueError, "presence_penalty must be a finite number"),
        ({"frequency_penalty": None}, TypeError, "frequency_penalty must be a number"),
        ({"logit_bias": [1, 2]}, TypeError, "logit_bias must be a dict"),
        ({"logit_bias": {"5": 1.0}}, TypeError, "logit_bias token id must be an int"),
        ({"logit_bias": {-1: 1.0}}, ValueError, "logit_bias token ids must be >= 0"),
        ({"logit_bias": {3: float("nan")}}, ValueError, r"logit_bias\[3\] must be a finite number"),
        ({"dry_multiplier": -0.5}, ValueError, "dry_multiplier must be >= 0"),
        ({"dry_base": 0.0}, ValueError, "dry_base must be > 0"),
        ({"dry_allowed_length": -1}, ValueError, "dry_allowed_length must be >= 0"),
        ({"dry_sequence_breaker_ids": "\n"}, TypeError, "dry_sequence_breaker_ids must be a set"),
        ({"dry_sequence_breaker_ids": {1.5}}, TypeError, "dry_sequence_breaker_ids entry must be an int"),
        ({"logprobs": 1}, TypeError, "logprobs must be a bool"),
        ({"rank_by_logprob": None}, TypeError, "rank_by_logprob must be a bool"),
        ({"top_logprobs": 21}, ValueError, r"top_logprobs must be in 0\.\.20"),
        ({"seed": "1"}, TypeError, "seed must be an int"),
    ],
)
def test_params_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


def test_params_defaults_and_greedy_flag():
    params = SamplingParams(dry_sequence_breaker_ids=[1, 2])
    assert params.dry_sequence_breaker_ids == frozenset({1, 2})
    assert not params.is_greedy and not params.modifies_logits
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=9e-8).is_greedy
    assert not SamplingParams(temperature=1e-7).is_greedy
    assert SamplingParams(logit_bias={1: 0.5}).modifies_logits


def test_row_and_batch_validation():
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        SamplingRow(SamplingParams(temperature=0.5), [1], 1, None)
    with pytest.raises(ValueError, match="num_prompt_tokens must be in 0..1"):
        SamplingRow(SamplingParams(temperature=0), [1], 2, None)
    rows = [_row(SamplingParams(temperature=0))]
    with pytest.raises(ValueError, match="logits must have shape"):
        Sampler()(torch.zeros(2, 5), rows)
    with pytest.raises(TypeError, match="logits must be a floating point tensor"):
        Sampler()(torch.zeros(1, 5, dtype=torch.long), rows)
