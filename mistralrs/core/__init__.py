"""Scheduler and paged KV block manager with prefix caching (plain Python, never imports torch)."""

from mistralrs.core.block_pool import BlockPool, KVBlock, hash_block_tokens, root_block_hash
from mistralrs.core.kv_cache_manager import KVCacheManager
from mistralrs.core.scheduler import ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from mistralrs.core.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockPool",
    "KVBlock",
    "KVCacheManager",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "hash_block_tokens",
    "root_block_hash",
]
