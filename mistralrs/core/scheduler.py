"""The scheduler: one token budget per step, shared by every sequence, with no prefill/decode phases.

Each step it walks the running sequences (oldest arrival first), giving each the tokens it still lacks (1 for a
decoding sequence, up to ``prompt_chunksize`` for one still in its prompt), then admits waiting sequences in
FCFS order while the budget, ``max_num_seqs`` and the free KV blocks allow. A waiting sequence starts after the
longest cached prefix of its tokens.

Decoding sequences come first in the budget: a token is kept for every running sequence that decodes (one token
to go) before any prompt chunk is granted, whatever their arrival order, and while any sequence decodes the prompt
tokens of the step (all chunks together) are at most ``max_prefill_tokens_while_decoding``. So a running stream
gets a token in every step its KV blocks allow, and waits between two tokens at most one step of its fellow
decodes plus that many prompt tokens, however long the prompts being prefilled beside it.

When a running sequence needs blocks that are not free, the latest-arrived running sequence not yet scheduled
in this step is preempted: it loses its blocks and returns to the front of the waiting queue, to be recomputed
(its output tokens included) later; no waiting sequence is admitted in that step. When nothing is left to
preempt, the sequence's chunk shrinks to the slots it can get (a decode that gets none waits a step). A
sequence that could never fit the whole cache is the engine's to reject (``can_ever_fit``).

Speculative decoding: a chunk that ends a sequence with ``max_draft_tokens`` also gets draft tokens
(``ScheduledSequence.num_draft_tokens``): the model runner's draft proposes them after the sequence's last token and
the target verifies them in the same pass. They are granted last, from the budget tokens and free blocks the step
leaves (never preempting anyone; their slots are not registered in the prefix cache and are given back after the
step), and capped so that a step never proposes tokens the sequence cannot keep (``max_output_tokens``). After a
full acceptance the sequence has two tokens to compute, and it still counts as decoding.

With ``no_kv_cache`` every scheduled sequence is computed whole in each step and gives its blocks back after
it (no chunking; the first sequence of a step is taken even when longer than the budget, so it can progress).
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from mistralrs.core.kv_cache_manager import KVCacheManager
from mistralrs.core.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    """Limits of one scheduling step and the size of the KV cache."""

    max_num_seqs: int = 16  # most sequences running (holding a slot) at once
    max_num_batched_tokens: int = 512  # token budget of one step, all sequences together
    prompt_chunksize: int = 512  # most tokens of one sequence in one step (chunked prefill)
    block_size: int = 32  # tokens per KV block (pa_blk_size)
    num_blocks: int = 128  # KV capacity in blocks (128 x 32 = the reference's 4096-token default)
    enable_prefix_caching: bool = True  # share full blocks of equal prefixes between sequences
    no_kv_cache: bool = False  # recompute every sequence whole each step; turns prefix caching off
    max_prefill_tokens_while_decoding: int | None = None  # prompt tokens of a step in which sequences decode
    # (all chunks together; None: the whole budget); bounds how long a running stream waits for its next token

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "prompt_chunksize", "block_size", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ValueError(f"max_prefill_tokens_while_decoding must be a positive int or None, got {cap!r}")
        for name in ("enable_prefix_caching", "no_kv_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class ScheduledSequence:
    """One sequence's share of a step."""

    seq: Sequence  # the sequence
    num_new_tokens: int  # computes tokens [seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens)
    sample: bool  # the chunk reaches seq.num_tokens, so the model runner samples the next token
    num_draft_tokens: int = 0  # speculative decoding: draft tokens verified after the chunk (sample is True then)


@dataclass
class SchedulerOutput:
    """What to compute in one step, and which sequences lost their KV cache in it."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)  # in scheduling order
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the waiting queue this step

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed in this step (draft tokens included), all sequences together."""
        return sum(item.num_new_tokens + item.num_draft_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when nothing is to be computed."""
        return not self.scheduled


@dataclass
class _StepBudget:
    """What is left of one step's token budget while the scheduler fills it."""

    tokens: int  # tokens left, all sequences together
    prefill: int  # prompt tokens left (capped while sequences decode)

    def take(self, num_tokens: int, decoding: bool) -> None:
        self.tokens -= num_tokens
        if not decoding:
            self.prefill -= num_tokens


class Scheduler:
    """Decides every step which tokens of which sequences are computed, and owns their KV blocks.

    Each ``schedule()`` must be followed by ``update_from_output()`` for its output before the next one. If a
    step's computation fails, its chunks may be computed again (all, or a part that ``reads_only_written_kv``)
    and passed to ``update_from_output``; every other sequence of the step must be aborted or recomputed
    (``recompute_sequence``): blocks the step put in the prefix cache never got their K/V, and they leave the
    cache when their last holder frees them.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        use_prefix_cache = config.enable_prefix_caching and not config.no_kv_cache
        self.kv_cache_manager = KVCacheManager(config.block_size, config.num_blocks, use_prefix_cache)
        self.waiting: collections.deque[Sequence] = collections.deque()  # FCFS; preempted ones at the front
        self.running: list[Sequence] = []  # admitted sequences, sorted by arrival_time
        self._unfinished: dict[int, Sequence] = {}  # seq_id -> sequence, waiting or running

    # ------------------------------------------------------------------ queue

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of the waiting queue."""
        if seq.seq_id in self._unfinished:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled")
        if not seq.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if seq.status is not SequenceStatus.WAITING or seq.block_ids or seq.num_computed_tokens:
            raise ValueError("status: a new sequence must be WAITING, with no blocks and no computed tokens")
        self._unfinished[seq.seq_id] = seq
        self.waiting.append(seq)

    def finish_sequence(self, seq_id: int, status: SequenceStatus) -> None:
        """End a waiting or running sequence with a FINISHED_* status and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"status must be a FINISHED_* SequenceStatus, got {status!r}")
        seq = self._unfinished.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"seq_id {seq_id} is not waiting or running")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv_cache_manager.free(seq)
        self.kv_cache_manager.forget(seq)
        seq.status = status

    def abort_sequence(self, seq_id: int) -> None:
        """Cancel a sequence wherever it is and free its blocks; unknown or finished ids are ignored."""
        if seq_id in self._unfinished:
            self.finish_sequence(seq_id, SequenceStatus.FINISHED_ABORTED)

    def recompute_sequence(self, seq_id: int) -> None:
        """Send a running sequence back to the front of the waiting queue without its blocks, to be computed again
        from its first token (the engine does this when K/V its context reads was never written)."""
        seq = self._unfinished.get(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            raise ValueError(f"seq_id {seq_id} is not running")
        self.running.remove(seq)
        self._requeue(seq)

    def reads_only_written_kv(self, items: list[ScheduledSequence]) -> bool:
        """Whether these chunks of a step, computed without the rest of it, read only K/V already written or
        written by themselves (False when one shares prefix blocks that another sequence of the step was to fill,
        as the same-step prefix sharing of ``KVCacheManager`` allows)."""
        block_size, blocks = self.config.block_size, self.kv_cache_manager.pool.blocks
        written = set()
        for item in items:
            start, end = item.seq.num_computed_tokens, item.seq.num_computed_tokens + item.num_new_tokens
            written.update(item.seq.block_ids[start // block_size : -(-end // block_size)])
        return all(blocks[block_id].is_computed or block_id in written
                   for item in items for block_id in item.seq.block_ids[: item.seq.num_computed_tokens // block_size])

    def reset_prefix_cache(self) -> None:
        """No block cached so far is reused by a later sequence (called when the model's weights change)."""
        self.kv_cache_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self._unfinished)

    def num_waiting(self) -> int:
        """Sequences in the waiting queue."""
        return len(self.waiting)

    def num_running(self) -> int:
        """Sequences admitted to run (scheduled this step or not)."""
        return len(self.running)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """False when a sequence of ``num_tokens`` tokens needs more blocks than the whole KV cache has."""
        return self.kv_cache_manager.can_ever_fit(num_tokens)

    # ------------------------------------------------------------------ step

    def schedule(self) -> SchedulerOutput:
        """Choose this step's tokens: running sequences first (oldest first, a token kept for each decoding one),
        then waiting ones (FCFS), then draft tokens for the speculative sequences from what is left."""
        output = SchedulerOutput()
        budget = self._step_budget()
        self._schedule_running(output, budget)
        if not output.preempted:  # blocks are short: admitting now would only preempt again
            self._schedule_waiting(output, budget)
        if not self.config.no_kv_cache:
            self._grant_draft_tokens(output, budget)
        return output

    def _step_budget(self) -> _StepBudget:
        config = self.config
        prefill = config.max_num_batched_tokens
        if config.max_prefill_tokens_while_decoding is not None and self._num_decoding(0):
            prefill = config.max_prefill_tokens_while_decoding
        return _StepBudget(config.max_num_batched_tokens, prefill)

    def _num_decoding(self, start: int) -> int:
        """Running sequences from ``self.running[start]`` on that decode (none without a KV cache: every
        sequence is recomputed whole each step)."""
        if self.config.no_kv_cache:
            return 0
        return sum(1 for seq in self.running[start:] if _is_decoding(seq))

    def update_from_output(self, output: SchedulerOutput, sampled: dict[int, int],
                           accepted: dict[int, list[int]] | None = None) -> None:
        """Advance every scheduled sequence by its chunk and append its accepted draft tokens and its sampled
        token, if any.

        ``sampled`` maps seq_id to the token sampled for it; only sequences scheduled with ``sample`` may be in
        it. ``accepted`` maps seq_id to the draft tokens the target accepted (at most ``num_draft_tokens``, in
        order, before the sampled token); their K/V is in both caches except the last draft token's, which the
        draft never ran on, so after a full acceptance that token is computed again in the next step. A
        sequence finished or aborted since ``schedule`` is skipped.
        """
        accepted = accepted or {}
        samplable = {item.seq.seq_id for item in output.scheduled if item.sample}
        unexpected = sorted(set(sampled) - samplable)
        if unexpected:
            raise ValueError(f"sampled has tokens for seq_ids {unexpected}, which were not scheduled to sample")
        drafted = {item.seq.seq_id: item.num_draft_tokens for item in output.scheduled}
        too_many = sorted(sid for sid, tokens in accepted.items() if len(tokens) > drafted.get(sid, 0))
        if too_many:
            raise ValueError(f"accepted has more tokens than were drafted for seq_ids {too_many}")
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            drafts = accepted.get(seq.seq_id, [])
            seq.num_computed_tokens += item.num_new_tokens + min(len(drafts), max(item.num_draft_tokens - 1, 0))
            self.kv_cache_manager.mark_computed(seq)
            if item.num_draft_tokens:
                self.kv_cache_manager.free_lookahead(seq)
            seq.output_token_ids.extend(drafts)
            if seq.seq_id in sampled:
                seq.output_token_ids.append(sampled[seq.seq_id])
            if self.config.no_kv_cache:
                self.kv_cache_manager.free(seq)
                seq.num_computed_tokens = 0

    def _schedule_running(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        """Schedule running sequences in arrival order, taking their tokens from ``budget``."""
        index = 0
        while index < len(self.running) and budget.tokens > 0:
            seq = self.running[index]
            index += 1
            decoding = _is_decoding(seq) and not self.config.no_kv_cache
            room = budget.tokens if decoding else min(budget.prefill, budget.tokens - self._num_decoding(index))
            num_new = self._chunk_size(seq.num_uncomputed_tokens, room, is_first=output.is_empty)
            if num_new > 0:
                num_new = self._reserve_blocks(seq, num_new, index, output)
            if num_new > 0:
                self._add_scheduled(output, seq, num_new)
            budget.take(num_new, decoding)

    def _schedule_waiting(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        """Admit waiting sequences in FCFS order; stops at the first one that does not fit."""
        manager = self.kv_cache_manager
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached_block_ids = manager.find_cached_prefix(seq)
            num_cached_tokens = len(cached_block_ids) * self.config.block_size
            room = min(budget.tokens, budget.prefill)
            num_new = self._chunk_size(seq.num_tokens - num_cached_tokens, room, is_first=output.is_empty)
            if num_new == 0 or not manager.allocate_slots(seq, num_new, cached_block_ids):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached_tokens
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival_time)
            self._add_scheduled(output, seq, num_new)
            budget.take(num_new, decoding=False)

    def _chunk_size(self, num_uncomputed: int, room: int, is_first: bool) -> int:
        """Tokens a sequence with ``num_uncomputed`` tokens to go gets when ``room`` tokens are free for it (0:
        none this step)."""
        if self.config.no_kv_cache:
            return num_uncomputed if num_uncomputed <= room or is_first else 0
        return max(0, min(num_uncomputed, self.config.prompt_chunksize, room))

    def _grant_draft_tokens(self, output: SchedulerOutput, budget: _StepBudget) -> None:
        """Give each scheduled chunk that ends its speculative sequence draft tokens, from what the step left over
        (budget tokens and free blocks), in scheduling order; never more than it may still generate after one."""
        manager = self.kv_cache_manager
        for item in output.scheduled:
            seq = item.seq
            if not (item.sample and seq.max_draft_tokens) or budget.tokens <= 0:
                continue
            num_draft = min(seq.max_draft_tokens, budget.tokens, self.config.prompt_chunksize - item.num_new_tokens,
                            manager.num_fitting_tokens(seq) - item.num_new_tokens)
            if seq.max_output_tokens is not None:
                num_draft = min(num_draft, seq.max_output_tokens - seq.num_output_tokens - 1)
            if num_draft > 0 and manager.allocate_slots(seq, item.num_new_tokens, num_lookahead_tokens=num_draft):
                item.num_draft_tokens = num_draft
                budget.tokens -= num_draft

    def _reserve_blocks(self, seq: Sequence, num_new: int, num_protected: int, output: SchedulerOutput) -> int:
        """Give ``seq`` blocks for ``num_new`` tokens, preempting later running sequences if needed.

        ``self.running[:num_protected]`` (``seq`` and the ones scheduled before it) are never preempted. When
        nothing is left to preempt, the chunk shrinks to what the free blocks hold. Returns the tokens granted.
        """
        manager = self.kv_cache_manager
        while not manager.allocate_slots(seq, num_new):
            if self.config.no_kv_cache:
                return 0  # running sequences hold no blocks between steps: preempting frees nothing
            if len(self.running) > num_protected:
                self._preempt(self.running.pop(), output)
                continue
            num_new = min(num_new, manager.num_fitting_tokens(seq))
            if num_new <= 0:
                return 0
        return num_new

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        """Take a running sequence's blocks and put it back at the front of the waiting queue."""
        self._requeue(seq)
        output.preempted.append(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Free the blocks of a sequence taken off ``running`` and put it at the front of the waiting queue."""
        self.kv_cache_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    @staticmethod
    def _add_scheduled(output: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        output.scheduled.append(ScheduledSequence(seq=seq, num_new_tokens=num_new, sample=sample))


def _arrival_time(seq: Sequence) -> float:
    return seq.arrival_time


def _is_decoding(seq: Sequence) -> bool:
    """A running sequence with one token to go: its prompt is computed (or all but its last token); a speculative
    one (``max_draft_tokens``) also with two, as after a step whose draft tokens were all accepted."""
    return seq.num_uncomputed_tokens <= (2 if seq.max_draft_tokens else 1)
