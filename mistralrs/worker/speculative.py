"""Speculative decoding (Leviathan et al., 2023): a draft model proposes tokens, the target verifies them in one pass.

`SpeculativeRunner` runs every engine step on two `ModelRunner`s, the target and the draft, whose KV caches have
the same block layout: a sequence's block table addresses both (the draft's K/V in its own tensors), so a block in
the prefix cache carries both models' K/V, and preemption, prefix sharing and freeing need nothing more.

A step, for the scheduled chunks (`SchedulerOutput`):
1. the draft computes every chunk (prompt chunks too, so both caches always hold the same tokens) and, for each
   sequence scheduled with draft tokens (`ScheduledSequence.num_draft_tokens` = g), samples the first draft token
   from the end of its chunk, then runs g - 1 one-token passes for the others (the sequences with fewer drafts drop
   out as they are done);
2. the target computes every chunk, the speculative ones extended by their g draft tokens, and gives logits at the
   g + 1 last positions of each;
3. greedy sequences accept the draft tokens equal to the target's argmax and take the target's argmax after them;
   sampled ones accept draft token i with probability min(1, p_i / q_i), on the first rejection draw from
   norm(max(0, p - q)) at that position, and after g acceptances draw a bonus token from the target.

p and q are the distributions the request samples from (`sample/sampler.py`: bias, DRY, presence/frequency
penalties over the context including the draft tokens before the position, temperature, top-k, top-p, min-p), so
the tokens are distributed exactly as the target alone would sample them. Grammar-constrained sequences get no
draft tokens (the engine sets them `max_draft_tokens = 0`) and sample like any other.

The K/V of rejected tokens stays in both caches as stale slots past the sequence's computed tokens (the scheduler
rolls `num_computed_tokens` back by what was rejected; see `Scheduler.update_from_output`) and is overwritten later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from mistralrs.core import ScheduledSequence, SchedulerOutput
from mistralrs.sample import SampledToken, SamplingRow
from mistralrs.sample.sampler import collect_tokens, scaled_logits, truncate
from mistralrs.worker.forward_batch import SeqChunk
from mistralrs.worker.model_runner import ModelRunner, SeqSampling

logger = logging.getLogger(__name__)

LOG_EVERY_STEPS = 256  # a log line with the acceptance rate after every this many verified sequences


@dataclass
class SpeculationStats:
    """Draft tokens proposed and accepted since the runner started."""

    num_verified: int = 0  # sequence-steps that verified draft tokens
    num_proposed: int = 0  # draft tokens the target verified
    num_accepted: int = 0  # draft tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens per proposed one (0 before any)."""
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens a sequence gains per step in which it speculates (accepted drafts plus the target's token)."""
        return (self.num_accepted + self.num_verified) / self.num_verified if self.num_verified else 0.0


@dataclass
class _Proposal:
    """A sequence's draft tokens of one step and the draft's distributions they were drawn from."""

    tokens: list[int] = field(default_factory=list)  # d_1..d_g
    probs: list[torch.Tensor] = field(default_factory=list)  # q_1..q_g, each [vocab]; empty for greedy sequences


class SpeculativeRunner:
    """Runs each step on a target and a draft `ModelRunner` sharing one block layout (see the module docstring).

    Has the `ModelRunner` interface the engine uses (`execute`, `device`, `adapters`, `max_draft_tokens`); the
    target's adapters serve the requests, the draft runs its own model as loaded.
    """

    def __init__(self, target: ModelRunner, draft: ModelRunner, gamma: int) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"speculative_gamma must be an int >= 1, got {gamma!r}")
        if draft.block_size != target.block_size or _num_slots(draft) != _num_slots(target):
            raise ValueError("the draft's KV cache must have the target's block layout (block size and blocks)")
        self.target = target  # scores the draft tokens and serves the requests
        self.draft = draft  # proposes tokens; its cache is addressed by the same block tables
        self.max_draft_tokens = gamma  # speculative_gamma: most draft tokens per sequence and step
        self.stats = SpeculationStats()  # running totals (logged every LOG_EVERY_STEPS verifications)

    @property
    def device(self) -> torch.device:
        """The target's device (the sequences' generators live there)."""
        return self.target.device

    @property
    def adapters(self):
        """The target's adapter runtime (None without separately held adapters)."""
        return self.target.adapters

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, sampling: dict[int, SeqSampling]) -> dict[int, list[SampledToken]]:
        """Compute the step on both models; the tokens each sampled sequence gained, in order (the accepted draft
        tokens, then the target's own)."""
        with self.target.cpu_threads.step(output.num_scheduled_tokens):
            proposals = self._propose(output.scheduled, sampling)
            return self._verify(output.scheduled, sampling, proposals)

    # ---- draft -------------------------------------------------------------------------------
    def _propose(self, items: list[ScheduledSequence], sampling: dict[int, SeqSampling]) -> dict[int, _Proposal]:
        """Run the draft on every chunk, then draw each speculative sequence's draft tokens."""
        batch = self.draft.build_batch([_chunk(item, []) for item in items])
        hidden = self.draft.hidden_states(batch, items, [None] * len(items))
        speculative = [i for i, item in enumerate(items) if item.num_draft_tokens]
        proposals = {items[i].seq.seq_id: _Proposal() for i in speculative}
        if not speculative:
            return proposals
        rows = batch.last_token_indices[torch.tensor(speculative, device=batch.last_token_indices.device)]
        active = [items[i] for i in speculative]
        self._draw(self.draft.model.compute_logits(hidden[rows]), active, sampling, proposals)
        for step in range(1, max(item.num_draft_tokens for item in active)):
            active = [item for item in active if item.num_draft_tokens > step]
            chunks = [SeqChunk([proposals[item.seq.seq_id].tokens[-1]], item.seq.num_tokens - 1 + step,
                               item.seq.block_ids, item.seq.num_prompt_tokens) for item in active]
            batch = self.draft.build_batch(chunks)
            hidden = self.draft.hidden_states(batch, active, [None] * len(active))
            self._draw(self.draft.model.compute_logits(hidden), active, sampling, proposals)
        return proposals

    @staticmethod
    def _draw(logits: torch.Tensor, items: list[ScheduledSequence], sampling: dict[int, SeqSampling],
              proposals: dict[int, _Proposal]) -> None:
        """Draw the next draft token of each sequence from the draft's distribution of its request (argmax when
        greedy), with the sequence's own generator."""
        rows = [_row(item, sampling, proposals[item.seq.seq_id].tokens) for item in items]
        scaled = scaled_logits(logits, rows)
        probs = truncate(scaled, rows).softmax(dim=-1)
        chosen = []
        for i, row in enumerate(rows):
            if row.params.is_greedy:
                chosen.append(scaled[i].argmax())
            else:
                chosen.append(torch.multinomial(probs[i], 1, generator=row.generator)[0])
                proposals[items[i].seq.seq_id].probs.append(probs[i])
        for item, token in zip(items, torch.stack(chosen).tolist()):
            proposals[item.seq.seq_id].tokens.append(token)

    # ---- target ------------------------------------------------------------------------------
    def _verify(self, items: list[ScheduledSequence], sampling: dict[int, SeqSampling],
                proposals: dict[int, _Proposal]) -> dict[int, list[SampledToken]]:
        """Run the target on every chunk (with its draft tokens), then sample or accept for each sequence."""
        chunks = [_chunk(item, proposals.get(item.seq.seq_id, _Proposal()).tokens) for item in items]
        batch = self.target.build_batch(chunks)
        hidden = self.target.hidden_states(batch, items, [sampling[i.seq.seq_id].adapters for i in items])
        sampled = [(i, item) for i, item in enumerate(items) if item.sample]
        if not sampled:
            return {}
        row_index = [r for i, item in sampled
                     for r in range(batch.query_start_locs[i + 1] - 1 - item.num_draft_tokens,
                                    batch.query_start_locs[i + 1])]
        logits = self.target.model.compute_logits(hidden[torch.tensor(row_index, device=hidden.device)])
        return self._sample([item for _, item in sampled], logits, sampling, proposals)

    def _sample(self, sampled: list[ScheduledSequence], logits: torch.Tensor,
                sampling: dict[int, SeqSampling], proposals: dict[int, _Proposal]) -> dict[int, list[SampledToken]]:
        """The tokens of each sampled sequence from the target's logits (`[rows, vocab]`: one row per plain
        sequence, g + 1 per speculative one, in order); plain rows go through the sampler (grammars included)."""
        result: dict[int, list[SampledToken]] = {}
        plain_rows, plain_items, offset = [], [], 0
        kept_scaled, kept_tokens, kept_rows, owners = [], [], [], []
        for item in sampled:
            if not item.num_draft_tokens:
                plain_rows.append(offset)
                plain_items.append(item)
                offset += 1
                continue
            proposal = proposals[item.seq.seq_id]
            rows = [_row(item, sampling, proposal.tokens[:j]) for j in range(item.num_draft_tokens + 1)]
            scaled = scaled_logits(logits[offset:offset + len(rows)], rows)
            tokens = self._accept(scaled, rows, proposal)
            self._count(item.num_draft_tokens, len(tokens) - 1)
            kept_scaled.append(scaled[:len(tokens)])
            kept_tokens.extend(tokens)
            kept_rows.extend(rows[:len(tokens)])
            owners.extend([item.seq.seq_id] * len(tokens))
            offset += len(rows)
        if plain_items:
            plain_logits = logits[torch.tensor(plain_rows, device=logits.device)]
            # an index gather: a fresh copy, read no more, so the sampler may adjust it in place
            tokens = self.target.sampler(plain_logits, [_row(item, sampling, []) for item in plain_items],
                                         private=True)
            result.update((item.seq.seq_id, [token]) for item, token in zip(plain_items, tokens))
        if owners:
            scaled = torch.cat(kept_scaled)
            chosen = torch.tensor(kept_tokens, device=scaled.device)
            for seq_id, token in zip(owners, collect_tokens(scaled, chosen, kept_rows)):
                result.setdefault(seq_id, []).append(token)
        return result

    @staticmethod
    def _accept(scaled: torch.Tensor, rows: list[SamplingRow], proposal: _Proposal) -> list[int]:
        """The tokens one sequence keeps: the accepted draft tokens, then the target's token (from the residual
        distribution at the first rejection, else the bonus token). `scaled`: `[g + 1, vocab]` target logits."""
        num_draft = len(proposal.tokens)
        if rows[0].params.is_greedy:
            best = scaled.argmax(dim=-1).tolist()
            kept = next((j for j in range(num_draft) if proposal.tokens[j] != best[j]), num_draft)
            return proposal.tokens[:kept] + [best[kept]]
        generator = rows[0].generator
        p = truncate(scaled, rows).softmax(dim=-1)  # [g + 1, vocab]
        q = torch.stack(proposal.probs)  # [g, vocab]
        drafted = torch.tensor(proposal.tokens, device=p.device)
        positions = torch.arange(num_draft, device=p.device)
        uniforms = torch.rand(num_draft, generator=generator, device=generator.device).to(p.device)
        accepted = (uniforms * q[positions, drafted] < p[positions, drafted]).tolist()
        kept = accepted.index(False) if False in accepted else num_draft
        if kept < num_draft:
            residual = (p[kept] - q[kept]).clamp(min=0)
            target = residual if bool(residual.sum() > 0) else p[kept]  # p == q there: nothing is left over
        else:
            target = p[num_draft]
        last = int(torch.multinomial(target, 1, generator=generator)[0])
        return proposal.tokens[:kept] + [last]

    def _count(self, num_proposed: int, num_accepted: int) -> None:
        stats = self.stats
        stats.num_verified += 1
        stats.num_proposed += num_proposed
        stats.num_accepted += num_accepted
        if stats.num_verified % LOG_EVERY_STEPS == 0:
            logger.info("speculative decoding: %d of %d draft tokens accepted (%.1f%%), %.2f tokens per step",
                        stats.num_accepted, stats.num_proposed, 100 * stats.acceptance_rate,
                        stats.tokens_per_verification)


def _chunk(item: ScheduledSequence, draft_tokens: list[int]) -> SeqChunk:
    """The scheduled chunk of a sequence, followed by `draft_tokens`."""
    seq = item.seq
    start = seq.num_computed_tokens
    tokens = seq.all_token_ids[start:start + item.num_new_tokens] + draft_tokens
    return SeqChunk(tokens, start, seq.block_ids, seq.num_prompt_tokens)


def _row(item: ScheduledSequence, sampling: dict[int, SeqSampling], draft_tokens: list[int]) -> SamplingRow:
    """The sampler row of a sequence whose context is extended by `draft_tokens`."""
    seq, seq_sampling = item.seq, sampling[item.seq.seq_id]
    return SamplingRow(seq_sampling.params, seq.all_token_ids + draft_tokens, seq.num_prompt_tokens,
                       seq_sampling.generator)


def _num_slots(runner: ModelRunner) -> int:
    return runner.kv_caches[0][0].shape[0]
