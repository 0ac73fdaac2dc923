"""The scheduler's share of speculative decoding: draft tokens for decoding sequences, their slots, the roll-back.

A fake model writes, for every scheduled token and every draft token, a fingerprint of the whole prefix up to it
at its slot (as both KV caches would), accepts a random number of the draft tokens, and checks that every sequence
reads back the right fingerprint at every position of its context, so a draft token that stays counted as
computed after its rejection, a lookahead slot shared with another sequence, or a prefix-cache block holding a
draft token fails here.
"""

import random

import pytest

from mistralrs.core import Scheduler, SchedulerConfig, Sequence, SequenceStatus
from tests.core.test_scheduler import check_invariants, check_step, prefix_fingerprints


class FakeSpeculativeKV:
    """Slot contents written by the scheduled chunks and their draft tokens."""

    def __init__(self, block_size, rng):
        self.block_size = block_size
        self.rng = rng
        self.slots = {}

    def slot(self, seq, position):
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def run(self, output):
        """Write every chunk and its draft tokens, check the reads, and return (sampled, accepted)."""
        drafts = {}
        for item in output.scheduled:
            seq = item.seq
            drafts[seq.seq_id] = [2000 + self.rng.randrange(3) for _ in range(item.num_draft_tokens)]
            fingerprints = prefix_fingerprints(seq.all_token_ids + drafts[seq.seq_id])
            start = seq.num_computed_tokens
            for position in range(start, start + item.num_new_tokens + item.num_draft_tokens):
                self.slots[self.slot(seq, position)] = fingerprints[position]
        for item in output.scheduled:
            seq = item.seq
            fingerprints = prefix_fingerprints(seq.all_token_ids + drafts[seq.seq_id])
            for position in range(seq.num_computed_tokens + item.num_new_tokens + item.num_draft_tokens):
                assert self.slots.get(self.slot(seq, position)) == fingerprints[position], (
                    f"seq {seq.seq_id} reads wrong K/V at position {position}")
        sampled, accepted = {}, {}
        for item in output.scheduled:
            if item.sample:
                num_kept = self.rng.randint(0, item.num_draft_tokens)
                accepted[item.seq.seq_id] = drafts[item.seq.seq_id][:num_kept]
                sampled[item.seq.seq_id] = 3000 + self.rng.randrange(3)
        return sampled, accepted


def make_scheduler(**overrides):
    config = dict(max_num_seqs=4, max_num_batched_tokens=40, prompt_chunksize=16, block_size=4, num_blocks=40)
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


def spec_seq(seq_id, prompt, gamma=3, max_output_tokens=None):
    return Sequence(seq_id, list(prompt), max_draft_tokens=gamma, max_output_tokens=max_output_tokens)


def test_a_decoding_sequence_gets_its_draft_tokens_and_keeps_only_the_accepted_ones():
    scheduler = make_scheduler()
    seq = spec_seq(0, range(1, 7), gamma=3)
    scheduler.add_sequence(seq)
    prefill = scheduler.schedule()
    assert [(s.num_new_tokens, s.num_draft_tokens) for s in prefill.scheduled] == [(6, 3)]  # the prompt's end too
    scheduler.update_from_output(prefill, {0: 50})   # no draft accepted
    assert seq.num_computed_tokens == 6 and len(seq.block_ids) == 2
    decode = scheduler.schedule()
    assert [(s.num_new_tokens, s.num_draft_tokens) for s in decode.scheduled] == [(1, 3)]
    assert decode.num_scheduled_tokens == 4 and len(seq.block_ids) == 3   # 7 tokens + 3 drafts: 10 slots
    scheduler.update_from_output(decode, {0: 60}, {0: [51]})             # one draft accepted, then 60
    assert seq.output_token_ids == [50, 51, 60]
    assert seq.num_computed_tokens == 8 and seq.num_uncomputed_tokens == 1
    assert len(seq.block_ids) == 2                                          # the rejected drafts' slots go back
    full = scheduler.schedule()
    scheduler.update_from_output(full, {0: 70}, {0: [61, 62, 63]})          # all accepted: the last draft's K/V
    assert seq.num_computed_tokens == 8 + 1 + 2 and seq.num_uncomputed_tokens == 2   # is the target's only
    again = scheduler.schedule()
    assert [(s.num_new_tokens, s.num_draft_tokens) for s in again.scheduled] == [(2, 3)]  # still decoding


def test_draft_tokens_stop_short_of_max_tokens_and_fit_the_budget():
    scheduler = make_scheduler(max_num_batched_tokens=6)
    seq = spec_seq(0, [1, 2, 3], gamma=8, max_output_tokens=4)
    scheduler.add_sequence(seq)
    scheduler.update_from_output(scheduler.schedule(), {0: 9})
    decode = scheduler.schedule()
    assert decode.scheduled[0].num_draft_tokens == 2      # 1 output so far, 4 at most: 2 drafts + the target's
    scheduler.update_from_output(decode, {0: 9}, {0: []})
    wide = make_scheduler(max_num_batched_tokens=6)
    other = spec_seq(1, [1, 2, 3], gamma=8)
    wide.add_sequence(other)
    wide.update_from_output(wide.schedule(), {1: 9})
    assert wide.schedule().scheduled[0].num_draft_tokens == 5   # the step's budget: 1 + 5 tokens


def test_draft_slots_come_from_what_the_real_tokens_leave():
    scheduler = make_scheduler(num_blocks=5, max_num_seqs=2)
    first, second = spec_seq(0, range(1, 5), gamma=8), spec_seq(1, range(11, 15), gamma=8)
    for seq in (first, second):
        scheduler.add_sequence(seq)
    scheduler.update_from_output(scheduler.schedule(), {0: 5, 1: 15})
    output = scheduler.schedule()
    # each decode takes a new block for its token; the one free block left goes to the first one's drafts
    assert not output.preempted
    assert [(s.seq.seq_id, s.num_new_tokens, s.num_draft_tokens) for s in output.scheduled] == [(0, 1, 7), (1, 1, 3)]
    assert scheduler.kv_cache_manager.num_free_blocks == 0


@pytest.mark.parametrize("seed", range(4))
def test_random_speculative_workload_reads_only_its_own_kv(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=24, enable_prefix_caching=True)
    kv = FakeSpeculativeKV(scheduler.config.block_size, rng)
    shared = [rng.randrange(100) for _ in range(9)]
    pending = [spec_seq(i, shared + [rng.randrange(100) for _ in range(rng.randint(0, 6))], gamma=rng.randint(1, 5),
                        max_output_tokens=rng.randint(2, 20)) for i in range(8)]
    steps = 0
    while (pending or scheduler.has_unfinished()) and steps < 400:
        if pending and rng.random() < 0.5:
            scheduler.add_sequence(pending.pop())
        output = scheduler.schedule()
        check_step(scheduler, output)
        sampled, accepted = kv.run(output)
        for item in output.scheduled:
            assert item.num_draft_tokens == 0 or item.sample
            if item.num_draft_tokens:
                left = item.seq.max_output_tokens - item.seq.num_output_tokens
                assert item.num_draft_tokens <= left - 1
        scheduler.update_from_output(output, sampled, accepted)
        for item in output.scheduled:
            seq = item.seq
            if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= seq.max_output_tokens:
                scheduler.finish_sequence(seq.seq_id, SequenceStatus.FINISHED_LENGTH)
        check_invariants(scheduler)
        steps += 1
    assert not pending and not scheduler.has_unfinished()


def test_more_accepted_tokens_than_drafted_is_an_error():
    scheduler = make_scheduler()
    scheduler.add_sequence(spec_seq(0, [1, 2, 3], gamma=1))
    scheduler.update_from_output(scheduler.schedule(), {0: 4})
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="accepted"):
        scheduler.update_from_output(output, {0: 5}, {0: [6, 7]})
