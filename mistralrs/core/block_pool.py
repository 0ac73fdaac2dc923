"""The pool of fixed-size KV blocks: reference counts, free lists and the prefix-cache hash table.

A block holds the K/V of ``block_size`` consecutive tokens of one or more sequences (more than one when
sequences share a prompt prefix). A FULL block can be put in the prefix cache under a hash of its tokens and
of the hash of the block before it, so equal hashes mean equal whole prefixes.

Free blocks (reference count 0) live in one of two lists:
- uncached free blocks (no hash): handed out first;
- cached free blocks (hash kept, K/V still valid): handed out only when no uncached block is left, least
  recently freed first (LRU eviction); a prefix-cache hit takes such a block back out of the list.

Plain Python: no torch here (the model runner owns the KV tensors, this module owns only their indices).
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block: SHA-256 over the parent block's hash and the block's token ids.

    ``parent_hash`` is the previous block's hash (``root_block_hash(...)`` for the first block). SHA-256 makes
    a collision (two different prefixes sharing cached K/V) practically impossible.
    """
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def root_block_hash(cache_salt: str | None, epoch: int = 0) -> bytes:
    """The parent hash of a sequence's first block: empty, or a digest of the salt and the cache epoch (bumped
    when the model's weights change, so that blocks computed before never match again)."""
    if cache_salt is None and epoch == 0:
        return b""
    return hashlib.sha256(b"salt:" + (cache_salt or "").encode("utf-8") + b"|epoch:%d" % epoch).digest()


@dataclass
class KVBlock:
    """Bookkeeping of one KV block (the K/V data itself lives in the model runner's tensors)."""

    block_id: int  # index of the block in the KV cache tensors
    ref_count: int = 0  # number of sequences whose block table holds this block
    block_hash: bytes | None = None  # key in the prefix-cache table while the block is cached; None otherwise
    is_computed: bool = False  # all its tokens' K/V has been written (a cached block is reusable only then)


class BlockPool:
    """Allocates, shares and frees KV blocks, and keeps the prefix-cache table of full blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]  # indexed by block_id
        # LIFO: the last freed is the next taken, so the blocks in use stay among those used before (the KV cache's
        # memory is committed when first written: a FIFO would walk every block of the cache, and the resident set
        # would grow to the whole cache in a long-running server instead of the most ever used at once)
        self._free_uncached: collections.deque[int] = collections.deque(range(num_blocks))
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU: oldest first
        self._cached_block_ids: dict[bytes, int] = {}  # block hash -> block holding that prefix

    @property
    def num_blocks(self) -> int:
        """Total number of blocks."""
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, cached or not (all of them can be handed out)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix-cache table, referenced or not."""
        return len(self._cached_block_ids)

    def lookup(self, block_hash: bytes) -> int | None:
        """The block cached under ``block_hash``, or None.

        The block's K/V is either written already or being written in the current step by the sequence that
        holds it: ``free`` drops from the table any block released before its K/V was written.
        """
        return self._cached_block_ids.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks (uncached first, then LRU-evicted cached ones) with ref_count 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"num_blocks={num_blocks} exceeds the {self.num_free_blocks} free blocks")
        block_ids = []
        for _ in range(num_blocks):
            if self._free_uncached:
                block_id = self._free_uncached.popleft()
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                self._uncache(self.blocks[block_id])
            block = self.blocks[block_id]
            block.ref_count = 1
            block.is_computed = False
            block_ids.append(block_id)
        return block_ids

    def take(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each of ``block_ids`` (prefix-cache hits), pulling free ones off the LRU list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order; unreferenced blocks become free.

        A block that is cached and computed keeps its hash and joins the LRU list (the last freed is the last
        evicted, so free a sequence's blocks tail first). A cached block whose K/V was never written leaves
        the cache.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise ValueError(f"block_ids: block {block_id} is already free")
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None and block.is_computed:
                self._free_cached[block_id] = None
            else:
                self._uncache(block)
                self._free_uncached.appendleft(block_id)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Put a full, referenced block in the prefix-cache table under ``block_hash``.

        Nothing happens when the block is cached already (a hit) or another block holds the same prefix (the
        two were computed side by side; the first one stays the cached copy).
        """
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached_block_ids:
            return
        block.block_hash = block_hash
        self._cached_block_ids[block_hash] = block_id

    def mark_computed(self, block_ids: Iterable[int]) -> None:
        """Record that the K/V of every token of these blocks has been written."""
        for block_id in block_ids:
            self.blocks[block_id].is_computed = True

    def _uncache(self, block: KVBlock) -> None:
        """Remove a block from the prefix-cache table, if it is there."""
        if block.block_hash is not None:
            del self._cached_block_ids[block.block_hash]
            block.block_hash = None
