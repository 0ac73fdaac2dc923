"""The batched sampler: one call per engine step over `[batch, vocab]` logits (DESIGN rule 7).

Pipeline per row (REFERENCE §8.1 with the reference's bugs fixed):

1. logit bias is added, the DRY penalty and the presence/frequency penalties (over the whole context,
   prompt + generated) are subtracted; all three are additive, so their order does not matter; a row with
   a grammar then gets -inf on the tokens its grammar forbids (only those rows are computed);
2. greedy rows (temperature < 1e-7) take the exact argmax of these logits;
3. sampled rows divide by the temperature, keep the top-k tokens, then the top-p nucleus of what is left,
   then the tokens with p >= min_p * max_p, and draw from the renormalised rest with the row's own
   generator (Gumbel-max: argmax of logits + Gumbel noise, which is an exact draw from the softmax).
   A row with a top-k does all of step 3 on its k candidates (`draw_from_candidates`: k uniforms, no
   vocab-sized mask); a row without one over the whole vocab (`draw_from_vocab`, the plain computation).

All vocab-sized work is done as tensor ops over the whole batch with per-row parameter tensors; Python
loops only build small index lists (bias, penalties) and run DRY's match search over a row's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mistralrs.sample.grammar import apply_grammar_masks
from mistralrs.sample.params import SampledToken, SamplingParams, SamplingRow

DRY_MAX_MATCH_LENGTH = 50  # longest repeat DRY measures (keeps base ** length finite and the search short)
_MAX_EXACT_FLOAT32_INT = 2**24  # token ids travel to the host as float32, exact below this


def dry_penalties(token_ids: Sequence[int], params: SamplingParams) -> dict[int, float]:
    """Return {token id: penalty} that DRY subtracts from the logits for the next token.

    For every earlier occurrence of the last token, the repeat ending there is measured backwards
    against the end of the context (counting the last token itself, stopping at a breaker token or
    after 50 tokens). The token that followed that occurrence would extend the repeat, so it gets
    `dry_multiplier * dry_base ** (length - dry_allowed_length)` when length >= dry_allowed_length,
    using the longest repeat found for it. Nothing is penalised when the last token is a breaker, and a
    breaker is never penalised as a continuation.
    """
    if params.dry_multiplier == 0 or len(token_ids) < 2:
        return {}
    breakers = params.dry_sequence_breaker_ids
    end = len(token_ids) - 1  # index of the last token
    last_token = token_ids[end]
    if last_token in breakers:
        return {}
    longest: dict[int, int] = {}  # continuation token → longest repeat it would extend
    for start in [i for i in range(end) if token_ids[i] == last_token]:
        next_token = token_ids[start + 1]
        if next_token in breakers:
            continue
        length = 1  # token_ids[start] == last_token already matches
        while length < DRY_MAX_MATCH_LENGTH and length <= start:
            earlier = token_ids[start - length]
            if earlier != token_ids[end - length] or earlier in breakers:
                break
            length += 1
        longest[next_token] = max(length, longest.get(next_token, 0))
    return {
        token_id: _dry_penalty(params, length)
        for token_id, length in longest.items()
        if length >= params.dry_allowed_length
    }


def _dry_penalty(params: SamplingParams, length: int) -> float:
    """multiplier * base ** (length - allowed_length), or inf when that overflows a float."""
    try:
        return params.dry_multiplier * params.dry_base ** (length - params.dry_allowed_length)
    except OverflowError:
        return math.inf


def apply_logit_adjustments(logits: torch.Tensor, rows: Sequence[SamplingRow], *,
                            in_place: bool = False) -> torch.Tensor:
    """Return logits with logit bias added and DRY and presence/frequency penalties subtracted: a new tensor, or
    `logits` itself changed when `in_place`.

    logit[t] += bias[t] - dry[t] - count(t) * frequency_penalty - (count(t) > 0) * presence_penalty,
    where count(t) is the number of times t occurs in the row's whole context (prompt + generated).
    """
    if not in_place:
        logits = logits.clone()  # [batch, vocab]
    vocab_size = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    deltas: list[float] = []
    for row_index, row in enumerate(rows):
        for token_id, bias in (row.params.logit_bias or {}).items():
            if token_id >= vocab_size:
                raise ValueError(f"logit_bias token id {token_id} is out of range for vocab size {vocab_size}")
            row_ids.append(row_index)
            token_ids.append(token_id)
            deltas.append(bias)
        for token_id, penalty in dry_penalties(row.token_ids, row.params).items():
            row_ids.append(row_index)
            token_ids.append(token_id)
            deltas.append(-penalty)
    if row_ids:
        index = (_long_tensor(row_ids, logits.device), _long_tensor(token_ids, logits.device))
        values = torch.tensor(deltas, dtype=logits.dtype, device=logits.device)
        logits.index_put_(index, values, accumulate=True)
    penalised = [i for i, row in enumerate(rows) if row.params.has_count_penalties]
    if penalised:
        penalties = _count_penalties([rows[i] for i in penalised], vocab_size, logits.device)
        logits.index_put_((_long_tensor(penalised, logits.device),), -penalties, accumulate=True)
    return logits


def _count_penalties(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Return `[len(rows), vocab]` presence + frequency penalties from token counts over each context."""
    flat_ids = _long_tensor([token_id for row in rows for token_id in row.token_ids], device)  # [total_tokens]
    lengths = _long_tensor([len(row.token_ids) for row in rows], device)
    # output_size given, so building the row of each token needs no host sync on an accelerator.
    owners = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths, output_size=len(flat_ids))
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    counts.index_put_((owners, flat_ids), torch.ones_like(flat_ids, dtype=counts.dtype), accumulate=True)
    frequency = _float_column([row.params.frequency_penalty for row in rows], device)
    presence = _float_column([row.params.presence_penalty for row in rows], device)
    return counts * frequency + (counts > 0).to(counts.dtype) * presence


def top_k_top_p_mask(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Return logits with -inf outside each row's top-k tokens and then outside its top-p nucleus.

    top_k: per row, the number of tokens to keep, 1..vocab (vocab = off). top_p: per row; the nucleus
    is the smallest set of most likely tokens (among the top-k, renormalised) whose cumulative
    probability reaches top_p, always at least the most likely token; top_p >= 1 keeps everything.
    Only the max(top_k) most likely tokens are sorted (a full sort only when some row has no top-k).
    """
    num_candidates = max(top_k)
    if num_candidates < logits.shape[1]:
        sorted_logits, sorted_ids = logits.topk(num_candidates, dim=-1)  # [batch, num_candidates]
    else:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [batch, vocab]
    keep = sorted_keep(sorted_logits, top_k, top_p)
    keep_by_token = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, sorted_ids, keep)
    return logits.masked_fill(~keep_by_token, -math.inf)


def sorted_keep(sorted_logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The `[batch, n]` bool mask of the tokens that top-k and then top-p keep, for each row's n most likely
    logits sorted in descending order (n >= the row's top_k; see `top_k_top_p_mask`)."""
    ranks = torch.arange(sorted_logits.shape[1], device=sorted_logits.device)
    keep = ranks[None, :] < _long_tensor(top_k, sorted_logits.device)[:, None]
    sorted_probs = sorted_logits.masked_fill(~keep, -math.inf).softmax(dim=-1)
    probability_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    nucleus_limit = _float_tensor([p if p < 1 else math.inf for p in top_p], sorted_logits.device)
    return keep & (probability_before < nucleus_limit[:, None])


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Return logits with -inf where a token's probability is below min_p * (the row's max probability).

    min_p: [batch] float, 0 = off. Tokens already at -inf stay there.
    """
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


class Sampler:
    """Chooses the next token of every row of a batch in one call, with one host sync.

    `sampler(logits, rows)` takes `[batch, vocab]` float logits (any device) and one `SamplingRow` per
    row, and returns one `SampledToken` per row. Greedy rows (temperature < 1e-7) get the exact argmax
    of the logits after bias/DRY/penalties. Sampled rows draw from their own `torch.Generator`, so a
    row's token depends only on its logits, its parameters and its generator, never on the other rows.

    Logprobs are natural logs: `log_softmax` of the logits after bias/DRY/penalties and after dividing
    by the temperature (1 for greedy rows), but before top-k/top-p/min-p truncation. The chosen token's
    logprob is filled only for rows whose `params.needs_logprob` (reported, or summed by the engine to rank
    best_of sequences): its batched log-sum-exp over the vocab costs as much as the rest of a greedy call;
    the `params.top_logprobs` most likely alternatives are listed only for rows that ask for them.

    The input logits are not modified unless the caller passes `private=True`: it hands them over and reads them
    no more, so bias/DRY/penalties are added to them in place rather than to a copy (at 8 rows of a 262k vocab,
    an 8 MB fresh mapping per step whose page faults cost twice the rest of a greedy call). Logits of another
    dtype than float32 are private either way: the float32 copy is the sampler's own.
    """

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow], *,
                 private: bool = False) -> list[SampledToken]:
        _check_batch(logits, rows)
        if not rows:
            return []
        float_logits = logits.float()
        private = private or float_logits is not logits  # `float()` made a copy
        logits = float_logits
        if any(row.params.modifies_logits for row in rows):
            logits = apply_logit_adjustments(logits, rows, in_place=private)
        if any(row.params.grammar is not None for row in rows):
            logits = apply_grammar_masks(logits, [row.params.grammar for row in rows])
        if all(row.params.is_greedy for row in rows):
            scaled = logits
            chosen_ids = _argmax(logits)
        else:
            temperatures = [1.0 if row.params.is_greedy else row.params.temperature for row in rows]
            scaled = logits / _float_column(temperatures, logits.device)
            chosen_ids = self._draw(scaled, rows)
        return collect_tokens(scaled, chosen_ids, rows)

    def _draw(self, scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Return `[batch]` token ids. Greedy rows take the plain argmax; sampled rows with a top-k draw among
        their top-k candidates (`draw_from_candidates`), the other sampled rows over the whole vocab
        (`draw_from_vocab`). Each group reads only its own rows."""
        vocab_size = scaled.shape[1]
        groups: dict = {_greedy: [], draw_from_candidates: [], draw_from_vocab: []}
        for i, row in enumerate(rows):
            if row.params.is_greedy:
                groups[_greedy].append(i)
            elif _top_k_or_all(row.params.top_k, vocab_size) < vocab_size:
                groups[draw_from_candidates].append(i)
            else:
                groups[draw_from_vocab].append(i)
        chosen = torch.empty(len(rows), dtype=torch.long, device=scaled.device)
        for draw, members in groups.items():
            if members:
                index = _long_tensor(members, scaled.device)
                part = scaled if len(members) == len(rows) else scaled[index]
                chosen.index_copy_(0, index, draw(part, [rows[i] for i in members]))
        return chosen


def draw_from_vocab(scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`[batch]` token ids of sampled rows: `truncate`, then the argmax of the truncated logits plus Gumbel noise
    from `[vocab]` uniforms of each row's generator (the plain full-vocabulary computation)."""
    vocab_size = scaled.shape[1]
    noise = torch.stack([_uniform(row.generator, vocab_size, scaled.device) for row in rows])
    return _argmax(_gumbel_(noise).add_(truncate(scaled, rows)))


def draw_from_candidates(scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`[batch]` token ids of sampled rows with a top-k below the vocab: the same draw as `draw_from_vocab` over
    the top-k candidates only. Top-p and min-p are applied to the candidates (outside them every logit is -inf
    after top-k, so they select the same tokens); each row takes k uniforms from its generator, one per
    candidate in descending order of logit, for the Gumbel noise."""
    vocab_size = scaled.shape[1]
    top_k = [_top_k_or_all(row.params.top_k, vocab_size) for row in rows]
    candidate_logits, candidate_ids = scaled.topk(max(top_k), dim=-1)  # [batch, max top_k], descending
    keep = sorted_keep(candidate_logits, top_k, [row.params.top_p for row in rows])
    candidate_logits = candidate_logits.masked_fill(~keep, -math.inf)
    min_p = [row.params.min_p for row in rows]
    if any(p > 0 for p in min_p):
        candidate_logits = min_p_mask(candidate_logits, _float_tensor(min_p, scaled.device))
    noise = torch.zeros_like(candidate_logits)
    for i, (row, k) in enumerate(zip(rows, top_k)):
        noise[i, :k] = _gumbel_(_uniform(row.generator, k, scaled.device))
    return candidate_ids.gather(1, noise.add_(candidate_logits).argmax(dim=-1, keepdim=True))[:, 0]


def scaled_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The logits a row samples from before truncation: bias, DRY and penalties applied, then divided by the
    temperature (1 for greedy rows). Grammars are not applied (the callers handle rows without one)."""
    logits = logits.float()
    if any(row.params.modifies_logits for row in rows):
        logits = apply_logit_adjustments(logits, rows)
    temperatures = [1.0 if row.params.is_greedy else row.params.temperature for row in rows]
    return logits / _float_column(temperatures, logits.device)


def truncate(scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`scaled` with -inf outside each sampled row's top-k, then top-p nucleus, then min-p set (greedy rows are
    left as they are): the distribution a sampled row draws from is the softmax of the result."""
    vocab_size = scaled.shape[1]
    sampled = [not row.params.is_greedy for row in rows]
    params = [row.params for row in rows]
    top_k = [_top_k_or_all(p.top_k, vocab_size) if s else vocab_size for p, s in zip(params, sampled)]
    top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
    truncated = scaled
    to_truncate = [i for i in range(len(rows)) if top_k[i] < vocab_size or top_p[i] < 1]
    if to_truncate:  # rows without top-k/top-p are left out, so they do not force a full sort
        index = _long_tensor(to_truncate, scaled.device)
        masked = top_k_top_p_mask(scaled[index], [top_k[i] for i in to_truncate], [top_p[i] for i in to_truncate])
        truncated = scaled.index_copy(0, index, masked)
    if any(p > 0 for p in min_p):
        truncated = min_p_mask(truncated, _float_tensor(min_p, scaled.device))
    return truncated


def collect_tokens(scaled: torch.Tensor, chosen_ids: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Compute the logprobs of `chosen_ids` (`[batch]`) under `scaled` (see `Sampler`), copy everything to the host
    in one transfer and build the SampledTokens. The vocab-sized log-sum-exp runs only when some row needs a
    logprob (`params.needs_logprob`, or top logprobs); a row's logprob is None unless it needs it."""
    # One host sync: ids and logprobs travel together as float32 columns (ids < 2**24 are exact).
    columns = [chosen_ids[:, None].to(torch.float32)]
    num_top = min(max(row.params.top_logprobs for row in rows), scaled.shape[1])
    if num_top or any(row.params.needs_logprob for row in rows):
        log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [batch, 1]
        columns.append(scaled.gather(1, chosen_ids[:, None]) - log_normaliser)
    if num_top:
        top_values, top_ids = scaled.topk(num_top, dim=-1)  # sorted, most likely first
        columns += [top_ids.to(torch.float32), top_values - log_normaliser]
    host = torch.cat(columns, dim=1).tolist()
    results = []
    for row, values in zip(rows, host):
        wanted = min(row.params.top_logprobs, num_top)
        top_logprobs = [(int(values[2 + j]), values[2 + num_top + j]) for j in range(wanted)]
        logprob = values[1] if row.params.needs_logprob else None
        results.append(SampledToken(token_id=int(values[0]), logprob=logprob, top_logprobs=top_logprobs))
    return results


def _check_batch(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Raise on logits that are not `[len(rows), vocab]` floating point, or a vocab too large."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must have shape [len(rows)={len(rows)}, vocab], got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got {logits.dtype}")
    if logits.shape[1] == 0 or logits.shape[1] > _MAX_EXACT_FLOAT32_INT:
        raise ValueError(f"logits vocab size must be in 1..{_MAX_EXACT_FLOAT32_INT}, got {logits.shape[1]}")


def _top_k_or_all(top_k: int, vocab_size: int) -> int:
    """top_k clamped to the vocab; 0 or less (off) means the whole vocab."""
    return min(top_k, vocab_size) if top_k > 0 else vocab_size


def _greedy(scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """`[batch]` token ids of greedy rows: the exact argmax."""
    return _argmax(scaled)


def _argmax(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(dim=-1)`, the same indices (the first of equal maxima, a NaN's when there is one), computed
    by `max`, whose CPU kernel is vectorised: 3x faster over a 262,144-token vocab."""
    return values.max(dim=-1).indices


def _uniform(generator: torch.Generator, size: int, device: torch.device) -> torch.Tensor:
    """Draw `[size]` uniforms in [0, 1) from the row's own generator, moved to `device`."""
    return torch.rand(size, generator=generator, device=generator.device).to(device)


def _gumbel_(uniform: torch.Tensor) -> torch.Tensor:
    """Turns `uniform` in place into standard Gumbel noise -log(-log(u)) and returns it; u is clamped away from 0
    so the result stays finite."""
    tiny = torch.finfo(uniform.dtype).tiny
    return uniform.clamp_(min=tiny).log_().neg_().log_().neg_()


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _float_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _float_column(values: list[float], device: torch.device) -> torch.Tensor:
    """`values` as a `[len(values), 1]` float32 tensor, to broadcast one value per row."""
    return _float_tensor(values, device)[:, None]
