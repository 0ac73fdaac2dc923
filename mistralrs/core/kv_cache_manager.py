"""Block tables of sequences on top of the BlockPool, with prefix caching.

When full blocks enter the prefix cache: at SCHEDULING time. As soon as a step is given the tokens that fill a
block, that block is put in the hash table, before its K/V is computed. A sequence scheduled LATER IN THE SAME
STEP (or in any later step) with the same prefix then shares it. This is safe because the model writes the new
K/V of all the tokens of a layer before attention reads any context, so the sharer reads K/V written in the
same forward pass. It lets a burst of requests with one system prompt (or the n choices of one request)
compute that prompt once. If the step never runs (the engine aborts its sequences instead), the pool drops the
never-written blocks from the cache when their last reference goes (``KVBlock.is_computed``).

Only FULL blocks are cached, keyed by a hash chained over the blocks before them, so a hit is always a whole
prefix. A hit never covers the whole sequence: at least its last token is computed, so the step yields logits.
Sliding-window models use the same accounting (every block is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mistralrs.core.block_pool import BlockPool, hash_block_tokens, root_block_hash
from mistralrs.core.sequence import Sequence


@dataclass
class _SeqCacheState:
    """What the manager remembers of one sequence between steps."""

    block_hashes: list[bytes] = field(default_factory=list)  # hashes of its first full blocks (tokens never change)
    num_registered_blocks: int = 0  # leading blocks of its table already offered to the prefix cache
    num_computed_blocks: int = 0  # leading blocks of its table already marked computed


class KVCacheManager:
    """Gives each sequence a block table with room for the tokens a step computes, sharing cached prefixes."""

    def __init__(self, block_size: int, num_blocks: int, enable_prefix_caching: bool):
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size  # tokens per block
        self.enable_prefix_caching = enable_prefix_caching  # look up and register full blocks
        self.pool = BlockPool(num_blocks)  # the blocks themselves
        self._states: dict[int, _SeqCacheState] = {}  # seq_id -> cache state, until forget()
        self._epoch = 0  # mixed into every first-block hash; reset_prefix_cache() bumps it

    def reset_prefix_cache(self) -> None:
        """Blocks cached so far never match again (the model's weights changed): sequences that start hashing
        from now on use a new epoch; cached blocks age out of the pool as usual."""
        self._epoch += 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens fits in the whole cache."""
        return self.num_blocks_for(num_tokens) <= self.pool.num_blocks

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached chain of full blocks starting at the sequence's first token.

        The chain stops at ``(num_tokens - 1) // block_size`` blocks so that at least one token remains to be
        computed. Takes no references; pass the result to ``allocate_slots``.
        """
        if not self.enable_prefix_caching:
            return []
        max_num_blocks = (seq.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in self._block_hashes(seq, max_num_blocks):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] | None = None,
                       num_lookahead_tokens: int = 0) -> bool:
        """Make the block table hold tokens up to ``num_computed_tokens + num_new_tokens`` (plus
        ``num_lookahead_tokens`` slots after them: speculative draft tokens, never registered in the prefix cache).

        ``cached_block_ids`` (from ``find_cached_prefix``, for a sequence with no blocks yet) is taken as its
        leading blocks, and the new tokens follow them. Returns False, changing nothing, when the free blocks
        are too few; otherwise registers the blocks these tokens fill in the prefix cache.
        """
        cached_block_ids = cached_block_ids or []
        if cached_block_ids and (seq.block_ids or seq.num_computed_tokens):
            raise ValueError("cached_block_ids: only a sequence without blocks can take a cached prefix")
        num_end_tokens = seq.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        num_missing = (self.num_blocks_for(num_end_tokens + num_lookahead_tokens) - len(seq.block_ids)
                       - len(cached_block_ids))
        num_hits_now_free = sum(1 for block_id in cached_block_ids if self.pool.blocks[block_id].ref_count == 0)
        if max(num_missing, 0) + num_hits_now_free > self.pool.num_free_blocks:
            return False
        self.pool.take(cached_block_ids)
        seq.block_ids.extend(cached_block_ids)
        if num_missing > 0:
            seq.block_ids.extend(self.pool.allocate(num_missing))
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, num_end_tokens // self.block_size)
        return True

    def num_fitting_tokens(self, seq: Sequence) -> int:
        """Most new tokens the sequence could get now: its own unused slots plus every free block."""
        num_slots = (len(seq.block_ids) + self.pool.num_free_blocks) * self.block_size
        return num_slots - seq.num_computed_tokens

    def mark_computed(self, seq: Sequence) -> None:
        """Record that the blocks filled by the sequence's ``num_computed_tokens`` tokens hold their K/V."""
        state = self._state(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if num_full > state.num_computed_blocks:
            self.pool.mark_computed(seq.block_ids[state.num_computed_blocks : num_full])
            state.num_computed_blocks = num_full

    def free_lookahead(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's computed tokens: the slots a speculative step's rejected
        draft tokens took (never registered in the prefix cache)."""
        num_kept = self.num_blocks_for(seq.num_computed_tokens)
        if len(seq.block_ids) > num_kept:
            self.pool.free(reversed(seq.block_ids[num_kept:]))
            del seq.block_ids[num_kept:]

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first, so its last blocks are evicted first) and empty its table."""
        self.pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        state = self._states.get(seq.seq_id)
        if state is not None:
            state.num_registered_blocks = 0
            state.num_computed_blocks = 0

    def forget(self, seq: Sequence) -> None:
        """Drop what the manager remembers of a sequence that will never be scheduled again."""
        self._states.pop(seq.seq_id, None)

    def _state(self, seq: Sequence) -> _SeqCacheState:
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _SeqCacheState()
        return state

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first ``num_blocks`` full blocks (computed once, then remembered)."""
        hashes = self._state(seq).block_hashes
        if len(hashes) < num_blocks:
            token_ids = seq.all_token_ids
            parent = hashes[-1] if hashes else root_block_hash(seq.cache_salt, self._epoch)
            for index in range(len(hashes), num_blocks):
                start = index * self.block_size
                parent = hash_block_tokens(parent, token_ids[start : start + self.block_size])
                hashes.append(parent)
        return hashes[:num_blocks]

    def _register_full_blocks(self, seq: Sequence, num_full_blocks: int) -> None:
        """Offer the sequence's first ``num_full_blocks`` blocks (all full) to the prefix cache."""
        state = self._state(seq)
        if num_full_blocks <= state.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, num_full_blocks)
        for index in range(state.num_registered_blocks, num_full_blocks):
            self.pool.cache_block(seq.block_ids[index], hashes[index])
        state.num_registered_blocks = num_full_blocks
