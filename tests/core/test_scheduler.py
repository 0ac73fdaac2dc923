"""Scheduler tests with fake sequences and a fake KV cache that checks what attention would read.

``FakeKV`` plays the model runner: for every scheduled token it writes, at the token's slot
(``block_ids[pos // block_size] * block_size + pos % block_size``), a fingerprint of the whole prefix up to that
token (a real K/V depends on every earlier token). After all the step's writes (as a layer writes all new K/V
before attention reads) it checks that each scheduled sequence reads back the right fingerprint for every
position of its context. A prefix-cache hit on a wrong, stale, evicted or not-yet-written block fails here.
"""

import random

import pytest

from mistralrs.core import Scheduler, SchedulerConfig, SchedulerOutput, Sequence, SequenceStatus


def prefix_fingerprints(token_ids):
    fingerprints, running = [], 0
    for token_id in token_ids:
        running = hash((running, token_id))
        fingerprints.append(running)
    return fingerprints


class FakeKV:
    """Slot contents of a KV cache, written and read the way the model runner does."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.slots = {}

    def slot(self, seq, position):
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def run(self, output):
        for item in output.scheduled:
            fingerprints = prefix_fingerprints(item.seq.all_token_ids)
            start = item.seq.num_computed_tokens
            for position in range(start, start + item.num_new_tokens):
                self.slots[self.slot(item.seq, position)] = fingerprints[position]
        for item in output.scheduled:
            context_len = item.seq.num_computed_tokens + item.num_new_tokens
            fingerprints = prefix_fingerprints(item.seq.all_token_ids)
            for position in range(context_len):
                assert self.slots.get(self.slot(item.seq, position)) == fingerprints[position], (
                    f"seq {item.seq.seq_id} reads wrong K/V at position {position}"
                )


def next_token(seq):
    return 1000 + (seq.seq_id * 7 + seq.num_tokens) % 50


def check_step(scheduler, output):
    config = scheduler.config
    assert output.num_scheduled_tokens <= config.max_num_batched_tokens or (
        config.no_kv_cache and len(output.scheduled) == 1
    )
    assert len({item.seq.seq_id for item in output.scheduled}) == len(output.scheduled)
    for item in output.scheduled:
        assert item.num_new_tokens >= 1
        assert item.seq.num_computed_tokens + item.num_new_tokens <= item.seq.num_tokens
        assert item.sample == (item.seq.num_computed_tokens + item.num_new_tokens == item.seq.num_tokens)
        if config.no_kv_cache:
            assert item.seq.num_computed_tokens == 0 and item.sample
        else:
            assert item.num_new_tokens <= config.prompt_chunksize
        assert item.seq.status is SequenceStatus.RUNNING
    for seq in output.preempted:
        assert seq.status is SequenceStatus.WAITING and not seq.block_ids and seq.num_computed_tokens == 0


def check_invariants(scheduler):
    """Block accounting between steps: references match block tables, nothing leaks."""
    config, pool = scheduler.config, scheduler.kv_cache_manager.pool
    assert scheduler.num_running() <= config.max_num_seqs
    ref_counts = [0] * config.num_blocks
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_ids and seq.num_computed_tokens == 0
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        if config.no_kv_cache:
            assert not seq.block_ids and seq.num_computed_tokens == 0
        else:
            assert len(seq.block_ids) == -(-seq.num_computed_tokens // config.block_size)
        for block_id in seq.block_ids:
            ref_counts[block_id] += 1
    assert [block.ref_count for block in pool.blocks] == ref_counts
    assert pool.num_free_blocks == ref_counts.count(0)
    hashed = [block for block in pool.blocks if block.block_hash is not None]
    assert pool.num_cached_blocks == len(hashed)
    assert all(pool.lookup(block.block_hash) == block.block_id for block in hashed)
    assert all(block.is_computed for block in hashed)  # between steps every cached block holds its K/V
    if not scheduler.kv_cache_manager.enable_prefix_caching:
        assert not hashed


def step(scheduler, fake_kv, finish_at=None):
    """One engine step: schedule, run the fake model, sample, update, finish sequences at ``finish_at`` outputs."""
    output = scheduler.schedule()
    check_step(scheduler, output)
    fake_kv.run(output)
    sampled = {item.seq.seq_id: next_token(item.seq) for item in output.scheduled if item.sample}
    scheduler.update_from_output(output, sampled)
    for item in output.scheduled:
        if finish_at is not None and item.seq.num_output_tokens >= finish_at.get(item.seq.seq_id, 1 << 30):
            scheduler.finish_sequence(item.seq.seq_id, SequenceStatus.FINISHED_LENGTH)
    check_invariants(scheduler)
    return output


def make(block_size=4, num_blocks=64, **kwargs):
    scheduler = Scheduler(SchedulerConfig(block_size=block_size, num_blocks=num_blocks, **kwargs))
    return scheduler, FakeKV(block_size)


def run_to_completion(scheduler, fake_kv, finish_at, max_steps=200):
    """Step until every sequence finished (a bounded loop: a stuck scheduler fails instead of hanging)."""
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        step(scheduler, fake_kv, finish_at)
    assert_all_blocks_free(scheduler)


def assert_all_blocks_free(scheduler):
    assert not scheduler.has_unfinished()
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.config.num_blocks
    check_invariants(scheduler)


def test_config_validation_names_the_field():
    for field_name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "prompt_chunksize"):
        with pytest.raises(ValueError, match=field_name):
            SchedulerConfig(**{field_name: 0})
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(num_blocks=-3)
    with pytest.raises(ValueError, match="no_kv_cache"):
        SchedulerConfig(no_kv_cache="yes")


def test_bad_calls_raise_value_error():
    scheduler, _ = make()
    scheduler.add_sequence(Sequence(1, [1, 2, 3]))
    with pytest.raises(ValueError, match="seq_id"):
        scheduler.add_sequence(Sequence(1, [4]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        scheduler.add_sequence(Sequence(2, []))
    with pytest.raises(ValueError, match="status"):
        scheduler.finish_sequence(1, SequenceStatus.RUNNING)
    with pytest.raises(ValueError, match="seq_id"):
        scheduler.finish_sequence(99, SequenceStatus.FINISHED_STOPPED)
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled"):
        scheduler.update_from_output(output, {1: 5, 7: 5})
    scheduler.abort_sequence(99)  # unknown: no-op
    assert SequenceStatus.FINISHED_ABORTED.is_finished and not SequenceStatus.RUNNING.is_finished


def test_single_sequence_prefill_then_decode_and_finish():
    scheduler, fake_kv = make(block_size=4, num_blocks=8)
    seq = Sequence(1, list(range(10)))
    scheduler.add_sequence(seq)
    output = step(scheduler, fake_kv, finish_at={1: 4})
    assert [(item.num_new_tokens, item.sample) for item in output.scheduled] == [(10, True)]
    assert seq.num_computed_tokens == 10 and seq.output_token_ids == [next_token(Sequence(1, list(range(10))))]
    for _ in range(3):
        output = step(scheduler, fake_kv, finish_at={1: 4})
        assert [item.num_new_tokens for item in output.scheduled] == [1]
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_tokens == 14 and seq.block_ids == []
    assert scheduler.schedule().is_empty
    assert_all_blocks_free(scheduler)


def test_chunked_prefill_of_1300_tokens_takes_three_steps():
    scheduler, fake_kv = make(block_size=32, num_blocks=64, max_num_batched_tokens=2048, prompt_chunksize=512)
    seq = Sequence(1, [7] * 1300)
    scheduler.add_sequence(seq)
    chunks = [step(scheduler, fake_kv).scheduled for _ in range(3)]
    assert [(c[0].num_new_tokens, c[0].sample) for c in chunks] == [(512, False), (512, False), (276, True)]
    assert seq.num_computed_tokens == 1300 and seq.num_output_tokens == 1 and len(seq.block_ids) == 41


def test_prefix_hit_is_whole_blocks_and_never_the_whole_prompt():
    scheduler, fake_kv = make(block_size=4, num_blocks=32)
    prefix = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34]  # 3 full blocks
    first = Sequence(1, list(prefix))
    scheduler.add_sequence(first)
    step(scheduler, fake_kv)
    first_blocks = list(first.block_ids)
    scheduler.finish_sequence(1, SequenceStatus.FINISHED_STOPPED)  # its blocks stay cached, evictable
    assert scheduler.kv_cache_manager.num_free_blocks == 32
    same = Sequence(2, list(prefix))  # whole prompt cached: the hit stops one block short
    longer = Sequence(3, prefix + [41, 42])
    other = Sequence(4, [99] + prefix[1:] + [41])
    for seq in (same, longer, other):
        scheduler.add_sequence(seq)
    output = step(scheduler, fake_kv)
    assert [item.num_new_tokens for item in output.scheduled] == [4, 2, 13]
    assert (same.num_cached_prompt_tokens, longer.num_cached_prompt_tokens, other.num_cached_prompt_tokens) == (
        8,
        12,
        0,
    )
    assert same.block_ids[:2] == first_blocks[:2] and longer.block_ids[:3] == first_blocks
    assert not set(other.block_ids) & set(first_blocks)
    assert scheduler.kv_cache_manager.pool.blocks[first_blocks[0]].ref_count == 2


def test_same_step_sequences_share_a_prompt_prefix():
    scheduler, fake_kv = make(block_size=4, num_blocks=32)
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    first, second = Sequence(1, list(prompt)), Sequence(2, prompt[:12] + [7, 8])
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)
    output = step(scheduler, fake_kv)  # FakeKV checks that second reads first's K/V written in this step
    assert [item.num_new_tokens for item in output.scheduled] == [13, 2]
    assert second.num_cached_prompt_tokens == 12 and second.block_ids[:3] == first.block_ids[:3]
    assert scheduler.kv_cache_manager.num_free_blocks == 32 - 5


def test_mixed_prefill_and_decode_in_one_step():
    scheduler, fake_kv = make(block_size=4, num_blocks=32, max_num_batched_tokens=16, prompt_chunksize=8)
    decoding = Sequence(1, [1, 2, 3])
    scheduler.add_sequence(decoding)
    step(scheduler, fake_kv)
    prefilling = Sequence(2, list(range(20)))
    scheduler.add_sequence(prefilling)
    output = step(scheduler, fake_kv)
    assert [(item.seq.seq_id, item.num_new_tokens, item.sample) for item in output.scheduled] == [
        (1, 1, True),
        (2, 8, False),
    ]
    output = step(scheduler, fake_kv)
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 1), (2, 8)]
    assert decoding.num_output_tokens == 3 and prefilling.num_computed_tokens == 16


def test_decoding_sequences_get_their_token_before_earlier_prompts():
    scheduler, fake_kv = make(block_size=4, num_blocks=64, max_num_batched_tokens=10, prompt_chunksize=8)
    stream = Sequence(3, [1, 2, 3], arrival_time=3.0)
    scheduler.add_sequence(stream)
    step(scheduler, fake_kv)
    for seq_id, arrival in ((1, 1.0), (2, 2.0)):   # prompts that arrived earlier (e.g. queued while tokenizing)
        scheduler.add_sequence(Sequence(seq_id, [seq_id] * 40, arrival_time=arrival))
    output = step(scheduler, fake_kv)   # admitted behind the stream
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(3, 1), (1, 8), (2, 1)]
    for _ in range(4):   # running in arrival order: the prompts first, a token kept for the stream
        output = step(scheduler, fake_kv)
        assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 8), (2, 1), (3, 1)]
    assert stream.num_output_tokens == 6


def test_prompt_tokens_are_capped_while_sequences_decode():
    scheduler, fake_kv = make(block_size=4, num_blocks=64, max_num_batched_tokens=30, prompt_chunksize=16,
                              max_prefill_tokens_while_decoding=4)
    long_prompt = Sequence(1, [5] * 60)
    scheduler.add_sequence(long_prompt)
    assert [item.num_new_tokens for item in step(scheduler, fake_kv).scheduled] == [16]   # nothing decodes yet
    scheduler.add_sequence(Sequence(2, [1, 2]))
    assert [item.num_new_tokens for item in step(scheduler, fake_kv).scheduled] == [16, 2]
    scheduler.add_sequence(Sequence(3, [6] * 10))
    for _ in range(2):   # sequence 2 decodes: the prompts share 4 tokens a step (3 is not admitted)
        output = step(scheduler, fake_kv)
        assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 4), (2, 1)]
    scheduler.abort_sequence(2)
    output = step(scheduler, fake_kv)   # nothing decodes: the whole budget
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 16), (3, 10)]
    output = step(scheduler, fake_kv)   # sequence 3 decodes
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 4), (3, 1)]
    assert long_prompt.num_computed_tokens == 60 and long_prompt.num_output_tokens == 1
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding"):
        SchedulerConfig(max_prefill_tokens_while_decoding=0)


def test_budget_is_shared_by_all_sequences():
    scheduler, fake_kv = make(block_size=4, num_blocks=64, max_num_batched_tokens=10, prompt_chunksize=6)
    for seq_id in range(4):
        scheduler.add_sequence(Sequence(seq_id, [seq_id] * 9))
    output = step(scheduler, fake_kv)
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(0, 6), (1, 4)]
    output = step(scheduler, fake_kv)
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(0, 3), (1, 5), (2, 2)]
    for _ in range(20):
        assert step(scheduler, fake_kv).num_scheduled_tokens <= 10


def test_max_num_seqs_limits_running_sequences():
    scheduler, fake_kv = make(max_num_seqs=2)
    for seq_id in range(5):
        scheduler.add_sequence(Sequence(seq_id, [seq_id, 1, 2]))
    finish_at = {seq_id: 2 for seq_id in range(5)}
    output = step(scheduler, fake_kv, finish_at)
    assert [item.seq.seq_id for item in output.scheduled] == [0, 1]
    assert scheduler.num_running() == 2 and scheduler.num_waiting() == 3
    step(scheduler, fake_kv, finish_at)  # 0 and 1 finish
    output = step(scheduler, fake_kv, finish_at)
    assert [item.seq.seq_id for item in output.scheduled] == [2, 3]
    for _ in range(4):
        step(scheduler, fake_kv, finish_at)
    assert_all_blocks_free(scheduler)


def test_preemption_recomputes_the_latest_sequence_which_later_completes():
    scheduler, fake_kv = make(block_size=4, num_blocks=4, max_num_batched_tokens=32)
    older, newer = Sequence(1, [1] * 6, arrival_time=1.0), Sequence(2, [2] * 6, arrival_time=2.0)
    scheduler.add_sequence(older)
    scheduler.add_sequence(newer)
    finish_at = {1: 5, 2: 4}
    step(scheduler, fake_kv, finish_at)  # 2 blocks each: the cache is full
    for _ in range(2):  # positions 6 and 7 still fit in block 1
        assert not step(scheduler, fake_kv, finish_at).preempted
    output = step(scheduler, fake_kv, finish_at)  # older needs a 3rd block at position 8
    assert output.preempted == [newer] and [item.seq for item in output.scheduled] == [older]
    assert newer.output_token_ids == [next_token(Sequence(2, [2] * length)) for length in (6, 7, 8)]
    assert list(scheduler.waiting) == [newer] and newer.num_preemptions == 1
    while scheduler.has_unfinished():
        output = step(scheduler, fake_kv, finish_at)
        assert not output.is_empty
    assert older.num_output_tokens == 5 and newer.num_output_tokens == 4
    assert newer.status is SequenceStatus.FINISHED_LENGTH and newer.num_cached_prompt_tokens == 0
    assert_all_blocks_free(scheduler)


def test_preemption_takes_the_most_recently_started_of_three():
    """Three decoding sequences fill the cache; the oldest needs a block: the newest goes, the middle one stays."""
    scheduler, fake_kv = make(block_size=4, num_blocks=6, max_num_batched_tokens=32)
    seqs = [Sequence(i, [i] * 6, arrival_time=float(i)) for i in (1, 2, 3)]
    for seq in seqs:
        scheduler.add_sequence(seq)
    for _ in range(3):  # 2 blocks each; positions 6 and 7 still fit
        assert not step(scheduler, fake_kv).preempted
    output = step(scheduler, fake_kv)  # all need a 3rd block at position 8: the newest one frees two
    assert [seq.seq_id for seq in output.preempted] == [3]
    assert [item.seq.seq_id for item in output.scheduled] == [1, 2]
    assert [seq.seq_id for seq in scheduler.waiting] == [3]
    run_to_completion(scheduler, fake_kv, {1: 6, 2: 6, 3: 6})
    assert [seq.num_output_tokens for seq in seqs] == [6, 6, 6] and seqs[2].num_preemptions == 1


def test_preemptions_go_from_the_newest_back_and_requeue_in_arrival_order():
    """The oldest one's prefill chunk needs three blocks and one is free: the newest sequence is preempted first,
    then the middle one, and both wait in arrival order."""
    scheduler, fake_kv = make(block_size=4, num_blocks=8, max_num_batched_tokens=64, prompt_chunksize=16)
    oldest, middle, newest = (Sequence(1, [1] * 28, arrival_time=1.0), Sequence(2, [2] * 8, arrival_time=2.0),
                              Sequence(3, [3] * 4, arrival_time=3.0))
    for seq in (oldest, middle, newest):
        scheduler.add_sequence(seq)
    output = step(scheduler, fake_kv)  # 16 + 8 + 4 tokens: 4 + 2 + 1 blocks
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 16), (2, 8), (3, 4)]
    output = step(scheduler, fake_kv)
    assert output.preempted == [newest, middle]
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 12)]
    assert list(scheduler.waiting) == [middle, newest]
    run_to_completion(scheduler, fake_kv, {1: 2, 2: 2, 3: 2})
    assert (middle.num_preemptions, newest.num_preemptions) == (1, 1)


def test_last_running_sequence_shrinks_its_chunk_rather_than_preempting_itself():
    scheduler, fake_kv = make(block_size=4, num_blocks=4, max_num_batched_tokens=16, prompt_chunksize=6)
    decoding, prefilling = Sequence(1, [1] * 5, arrival_time=1.0), Sequence(2, [2] * 14, arrival_time=2.0)
    scheduler.add_sequence(decoding)
    scheduler.add_sequence(prefilling)
    step(scheduler, fake_kv)  # 5 + 6 tokens, 2 + 2 blocks
    output = step(scheduler, fake_kv)  # prefilling has 2 free slots left and no block to get
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(1, 1), (2, 2)]
    assert not output.preempted
    for _ in range(2):  # prefilling is stuck while decoding fills positions 6 and 7
        output = step(scheduler, fake_kv)
        assert [item.seq.seq_id for item in output.scheduled] == [1] and not output.preempted
    output = step(scheduler, fake_kv)  # decoding reaches position 8 and needs a block
    assert output.preempted == [prefilling]
    scheduler.finish_sequence(1, SequenceStatus.FINISHED_STOPPED)
    while prefilling.num_output_tokens < 2:
        step(scheduler, fake_kv)
    scheduler.finish_sequence(2, SequenceStatus.FINISHED_STOPPED)
    assert_all_blocks_free(scheduler)


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    scheduler, fake_kv = make(block_size=4, num_blocks=8, max_num_seqs=1)
    running, waiting = Sequence(1, list(range(9))), Sequence(2, list(range(5)))
    scheduler.add_sequence(running)
    scheduler.add_sequence(waiting)
    step(scheduler, fake_kv)
    assert scheduler.kv_cache_manager.num_free_blocks == 5
    scheduler.abort_sequence(1)
    scheduler.abort_sequence(2)
    scheduler.abort_sequence(1)
    assert running.status is waiting.status is SequenceStatus.FINISHED_ABORTED
    assert scheduler.schedule().is_empty
    assert_all_blocks_free(scheduler)


def test_abort_between_schedule_and_update_uncaches_unwritten_blocks():
    scheduler, _ = make(block_size=4, num_blocks=8)
    scheduler.add_sequence(Sequence(1, list(range(9))))
    output = scheduler.schedule()  # 2 full blocks entered the prefix cache, K/V not yet written
    assert scheduler.kv_cache_manager.pool.num_cached_blocks == 2
    scheduler.abort_sequence(1)
    scheduler.update_from_output(output, {1: 5})
    assert scheduler.kv_cache_manager.pool.num_cached_blocks == 0
    scheduler.add_sequence(Sequence(2, list(range(9))))
    scheduler.schedule()
    assert scheduler.running[0].num_computed_tokens == 0
    assert scheduler.running[0].num_cached_prompt_tokens == 0


def test_no_kv_cache_recomputes_everything_each_step():
    scheduler, fake_kv = make(block_size=4, num_blocks=16, no_kv_cache=True, max_num_batched_tokens=8)
    first, second = Sequence(1, list(range(10))), Sequence(2, list(range(10)))
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)
    output = step(scheduler, fake_kv)  # longer than the budget, but first in the step: taken whole
    assert [(item.seq.seq_id, item.num_new_tokens, item.sample) for item in output.scheduled] == [(1, 10, True)]
    assert first.num_computed_tokens == 0 and first.block_ids == [] and first.num_output_tokens == 1
    scheduler2, fake_kv2 = make(block_size=4, num_blocks=16, no_kv_cache=True, max_num_batched_tokens=64)
    for seq in (Sequence(1, list(range(10))), Sequence(2, list(range(10)))):
        scheduler2.add_sequence(seq)
    for expected in (10, 11, 12):
        output = step(scheduler2, fake_kv2)
        assert [item.num_new_tokens for item in output.scheduled] == [expected, expected]
        assert all(item.seq.num_cached_prompt_tokens == 0 for item in output.scheduled)
        assert scheduler2.kv_cache_manager.num_free_blocks == 16
    assert scheduler2.kv_cache_manager.pool.num_cached_blocks == 0


def test_cached_blocks_are_evicted_under_pressure():
    scheduler, fake_kv = make(block_size=4, num_blocks=6)
    cached = Sequence(1, list(range(12)))
    scheduler.add_sequence(cached)
    step(scheduler, fake_kv)
    scheduler.finish_sequence(1, SequenceStatus.FINISHED_STOPPED)
    assert scheduler.kv_cache_manager.pool.num_cached_blocks == 3
    filler = Sequence(2, [500 + index for index in range(21)])  # needs all 6 blocks: evicts the cached ones
    scheduler.add_sequence(filler)
    step(scheduler, fake_kv)
    scheduler.finish_sequence(2, SequenceStatus.FINISHED_STOPPED)
    again = Sequence(3, list(range(13)))
    scheduler.add_sequence(again)
    step(scheduler, fake_kv)
    assert again.num_cached_prompt_tokens == 0
    scheduler.finish_sequence(3, SequenceStatus.FINISHED_STOPPED)
    assert_all_blocks_free(scheduler)


def test_can_ever_fit():
    scheduler, _ = make(block_size=4, num_blocks=3)
    assert scheduler.can_ever_fit(12) and not scheduler.can_ever_fit(13)


def test_scheduler_output_helpers():
    assert SchedulerOutput().is_empty and SchedulerOutput().num_scheduled_tokens == 0


def _random_config(rng):
    no_kv_cache = rng.random() < 0.2
    return SchedulerConfig(
        max_num_seqs=rng.choice([1, 2, 4, 8]),
        max_num_batched_tokens=rng.choice([8, 16, 48]),
        prompt_chunksize=rng.choice([4, 8, 32]),
        block_size=rng.choice([2, 4, 8]),
        num_blocks=rng.choice([12, 20, 40]),
        enable_prefix_caching=rng.random() < 0.8,
        no_kv_cache=no_kv_cache,
        max_prefill_tokens_while_decoding=rng.choice([None, 1, 5]),
    )


def check_decodes_move(scheduler, output, decoding_ids):
    """Sequences that decoded at the start of a step are all in it (unless KV blocks ran out), and the prompt
    tokens beside them respect the cap."""
    if scheduler.config.no_kv_cache or not decoding_ids:
        return
    scheduled = {item.seq.seq_id for item in output.scheduled}
    assert decoding_ids <= scheduled or output.preempted or scheduler.kv_cache_manager.num_free_blocks == 0
    cap = scheduler.config.max_prefill_tokens_while_decoding
    prompt_tokens = sum(item.num_new_tokens for item in output.scheduled if item.seq.seq_id not in decoding_ids)
    assert cap is None or prompt_tokens <= cap


def _simulate(seed):
    rng = random.Random(seed)
    config = _random_config(rng)
    scheduler, fake_kv = Scheduler(config), FakeKV(config.block_size)
    shared_prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 20))] for _ in range(3)]
    capacity = config.num_blocks * config.block_size
    max_tokens, live, finished, num_added = {}, set(), set(), 0
    for step_index in range(4000):
        if num_added < 40 and rng.random() < 0.4:
            prompt = rng.choice(shared_prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
            limit = rng.randrange(1, 16)
            if scheduler.can_ever_fit(len(prompt) + limit) and len(prompt) + limit <= capacity:
                scheduler.add_sequence(Sequence(num_added, prompt, arrival_time=float(step_index)))
                max_tokens[num_added] = limit
                live.add(num_added)
            num_added += 1
        if not scheduler.has_unfinished():
            if num_added >= 40:
                break
            continue
        if rng.random() < 0.05:
            aborted = rng.choice(sorted(live))
            scheduler.abort_sequence(aborted)
            live.discard(aborted)
        decoding_ids = {seq.seq_id for seq in scheduler.running if seq.num_uncomputed_tokens == 1}
        output = scheduler.schedule()
        assert not output.is_empty or not scheduler.has_unfinished(), "no progress while sequences wait"
        check_step(scheduler, output)
        check_decodes_move(scheduler, output, decoding_ids)
        fake_kv.run(output)
        sampled = {item.seq.seq_id: rng.randrange(50) for item in output.scheduled if item.sample}
        scheduler.update_from_output(output, sampled)
        for seq_id in sampled:
            seq = next(item.seq for item in output.scheduled if item.seq.seq_id == seq_id)
            if seq.num_output_tokens >= max_tokens[seq_id] or rng.random() < 0.05:
                scheduler.finish_sequence(seq_id, SequenceStatus.FINISHED_STOPPED)
                finished.add(seq_id)
                live.discard(seq_id)
        check_invariants(scheduler)
    assert not scheduler.has_unfinished() and num_added >= 40
    assert_all_blocks_free(scheduler)
    return finished


@pytest.mark.parametrize("seed", range(24))
def test_randomized_simulation_keeps_invariants(seed):
    finished = _simulate(seed)
    assert finished  # the simulation did run sequences to completion


def test_reset_prefix_cache_stops_reuse_of_blocks_cached_before():
    scheduler, fake_kv = make(block_size=4, num_blocks=32)
    prefix = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34]
    scheduler.add_sequence(Sequence(1, list(prefix)))
    step(scheduler, fake_kv)
    scheduler.finish_sequence(1, SequenceStatus.FINISHED_STOPPED)
    scheduler.reset_prefix_cache()   # e.g. the weights were re-quantized
    stale = Sequence(2, prefix + [41])
    scheduler.add_sequence(stale)
    step(scheduler, fake_kv)
    assert stale.num_cached_prompt_tokens == 0
    scheduler.finish_sequence(2, SequenceStatus.FINISHED_STOPPED)
    fresh = Sequence(3, prefix + [42])   # blocks cached after the reset are shared again
    scheduler.add_sequence(fresh)
    step(scheduler, fake_kv)
    assert fresh.num_cached_prompt_tokens == 12


def test_a_failed_step_can_run_in_parts_unless_a_part_reads_blocks_of_another():
    scheduler, fake_kv = make(block_size=4, num_blocks=32)
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    first, second, other = Sequence(1, list(prompt)), Sequence(2, prompt[:12] + [7, 8]), Sequence(3, [5, 6, 7])
    for seq in (first, second, other):
        scheduler.add_sequence(seq)
    failed = scheduler.schedule()   # the model raised: nothing was written, nothing advanced
    by_id = {item.seq.seq_id: item for item in failed.scheduled}
    assert [by_id[2].num_new_tokens, second.num_computed_tokens] == [2, 12]   # reads first's blocks of this step
    assert scheduler.reads_only_written_kv([by_id[1], by_id[2]]) and scheduler.reads_only_written_kv([by_id[3]])
    assert not scheduler.reads_only_written_kv([by_id[2]])
    alone = SchedulerOutput(scheduled=[by_id[3]])   # runs alone and goes on
    fake_kv.run(alone)
    scheduler.update_from_output(alone, {3: 9})
    scheduler.abort_sequence(1)   # failed alone
    scheduler.recompute_sequence(2)   # its prefix was never written: computed again from its first token
    assert second.status is SequenceStatus.WAITING and not second.block_ids and second.num_computed_tokens == 0
    check_invariants(scheduler)
    output = step(scheduler, fake_kv)   # FakeKV checks that nothing reads the never-written blocks
    assert [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled] == [(3, 1), (2, 14)]
    with pytest.raises(ValueError, match="seq_id 1 is not running"):
        scheduler.recompute_sequence(1)
