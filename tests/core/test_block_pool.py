"""BlockPool and KVCacheManager: reference counts, free lists, LRU eviction, block hashing, prefix lookup."""

import ast
import pathlib

import pytest

from mistralrs.core import BlockPool, KVCacheManager, Sequence, hash_block_tokens, root_block_hash

CORE_DIR = pathlib.Path(__file__).resolve().parents[2] / "mistralrs" / "core"


def test_core_never_imports_torch():
    imported = set()
    for path in CORE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert imported, "no imports found: wrong directory"
    assert not {name for name in imported if name.split(".")[0] in {"torch", "numpy"}}
    outside_core = {name for name in imported if name.startswith("mistralrs") and not name.startswith("mistralrs.core")}
    assert not outside_core


def test_hash_depends_on_parent_tokens_and_salt():
    root = root_block_hash(None)
    first = hash_block_tokens(root, [1, 2, 3, 4])
    assert first == hash_block_tokens(root, [1, 2, 3, 4])
    assert first != hash_block_tokens(root, [1, 2, 3, 5])
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(root, [5, 6, 7, 8])
    assert root_block_hash("adapter-a") != root_block_hash("adapter-b") != root
    assert hash_block_tokens(root_block_hash("adapter-a"), [1, 2, 3, 4]) != first


def test_allocate_and_free_keep_reference_counts():
    pool = BlockPool(4)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.num_free_blocks == 1
    assert all(pool.blocks[block_id].ref_count == 1 for block_id in first)
    pool.take(first[:1])
    assert pool.blocks[first[0]].ref_count == 2
    pool.free(first)
    assert pool.blocks[first[0]].ref_count == 1 and pool.num_free_blocks == 3
    pool.free(first[:1])
    assert pool.num_free_blocks == 4
    assert all(block.ref_count == 0 for block in pool.blocks)
    with pytest.raises(ValueError, match="block_ids"):
        pool.free(first[:1])
    with pytest.raises(ValueError, match="num_blocks"):
        pool.allocate(5)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_freed_uncached_blocks_are_taken_again_before_blocks_never_used():
    """The last freed uncached block is the next taken: the blocks in use stay among those written before, so the
    KV cache's committed memory is the most ever used at once, not the whole cache over time."""
    pool = BlockPool(100)
    used = set()
    for step in range(50):  # requests of 1..4 blocks, one after another
        block_ids = pool.allocate(step % 4 + 1)
        used.update(block_ids)
        pool.free(block_ids)
    assert used == set(range(4))
    first = pool.allocate(2)
    pool.free(first[:1])
    assert pool.allocate(1) == first[:1]


def test_cached_free_blocks_are_evicted_last_and_least_recently_freed_first():
    pool = BlockPool(4)
    block_ids = pool.allocate(4)
    hashes = [bytes([index]) * 32 for index in range(3)]
    for block_id, block_hash in zip(block_ids, hashes):
        pool.cache_block(block_id, block_hash)
    pool.mark_computed(block_ids)
    pool.free([block_ids[2], block_ids[0], block_ids[1], block_ids[3]])  # block 3 is uncached
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 3
    assert [pool.lookup(block_hash) for block_hash in hashes] == block_ids[:3]
    assert pool.allocate(1) == [block_ids[3]]  # uncached first: the cache survives
    assert pool.num_cached_blocks == 3
    assert pool.allocate(1) == [block_ids[2]]  # then the least recently freed cached block
    assert pool.lookup(hashes[2]) is None and pool.blocks[block_ids[2]].block_hash is None
    pool.take([block_ids[1]])  # a prefix hit pulls a block off the LRU list
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [block_ids[0]]
    assert pool.lookup(hashes[0]) is None and pool.lookup(hashes[1]) == block_ids[1]


def test_block_freed_before_its_kv_was_written_leaves_the_cache():
    pool = BlockPool(2)
    (block_id,) = pool.allocate(1)
    pool.cache_block(block_id, b"h" * 32)
    assert pool.lookup(b"h" * 32) == block_id  # shareable within its step
    pool.free([block_id])
    assert pool.lookup(b"h" * 32) is None and pool.num_cached_blocks == 0


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.cache_block(first, b"x" * 32)
    pool.cache_block(second, b"x" * 32)
    assert pool.lookup(b"x" * 32) == first and pool.blocks[second].block_hash is None


def _computed_sequence(manager, seq_id, token_ids):
    seq = Sequence(seq_id, list(token_ids))
    assert manager.allocate_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.mark_computed(seq)
    return seq


def test_manager_prefix_lookup_is_capped_and_whole_blocks_only():
    manager = KVCacheManager(block_size=4, num_blocks=16, enable_prefix_caching=True)
    first = _computed_sequence(manager, 1, range(14))  # 3 full blocks + 2 tokens
    assert len(first.block_ids) == 4 and manager.pool.num_cached_blocks == 3
    assert manager.find_cached_prefix(Sequence(2, list(range(12)))) == first.block_ids[:2]  # never the whole prompt
    assert manager.find_cached_prefix(Sequence(3, list(range(13)))) == first.block_ids[:3]
    assert manager.find_cached_prefix(Sequence(4, list(range(20)))) == first.block_ids[:3]
    assert manager.find_cached_prefix(Sequence(5, [0, 1, 2, 9] + list(range(4, 14)))) == []
    assert manager.find_cached_prefix(Sequence(6, list(range(13)), cache_salt="lora")) == []
    off = KVCacheManager(block_size=4, num_blocks=16, enable_prefix_caching=False)
    _computed_sequence(off, 1, range(14))
    assert off.find_cached_prefix(Sequence(2, list(range(14)))) == [] and off.pool.num_cached_blocks == 0


def test_manager_allocate_fails_without_side_effects_and_counts_free_hits():
    manager = KVCacheManager(block_size=4, num_blocks=4, enable_prefix_caching=True)
    first = _computed_sequence(manager, 1, range(8))
    first_block_ids = list(first.block_ids)
    manager.free(first)  # both blocks cached and free
    assert first.block_ids == []
    assert manager.num_free_blocks == 4
    second = Sequence(2, list(range(8)) + [50] * 12)  # hits 2 blocks, needs 3 more: 5 > 4
    hits = manager.find_cached_prefix(second)
    assert hits == first_block_ids
    assert not manager.allocate_slots(second, 12, hits)
    assert second.block_ids == [] and manager.num_free_blocks == 4
    assert all(block.ref_count == 0 for block in manager.pool.blocks)
    assert manager.allocate_slots(second, 8, hits)  # 2 hits + 2 new blocks fit exactly
    assert second.block_ids[:2] == hits and manager.num_free_blocks == 0
    second.num_computed_tokens = 16  # what the scheduler reaches after the step
    assert manager.num_fitting_tokens(second) == 0
    with pytest.raises(ValueError, match="cached_block_ids"):
        manager.allocate_slots(second, 1, hits)
