"""One generated sequence, as the scheduler and the KV cache manager see it.

A sequence is a list of token ids (the prompt, then the sampled output) and a count of how many of them
already have their K/V in the cache. Every step the scheduler moves ``num_computed_tokens`` towards
``num_tokens``; when they meet, the model runner samples a token and ``num_tokens`` grows by one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, being computed, or done (and why)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        """True for the three FINISHED_* states."""
        return self in _FINISHED_STATUSES


_FINISHED_STATUSES = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)


@dataclass(eq=False)
class Sequence:
    """One sequence (one choice of a request) chasing ``num_computed_tokens`` towards ``num_tokens``.

    Compared and hashed by identity: it is a mutable entity, not a value.
    """

    seq_id: int  # unique among the sequences a scheduler holds
    prompt_token_ids: list[int]  # the prompt, never changed after creation
    arrival_time: float = field(default_factory=time.monotonic)  # FCFS order; earliest is served first
    output_token_ids: list[int] = field(default_factory=list)  # sampled tokens, in order
    num_computed_tokens: int = 0  # leading tokens of all_token_ids whose K/V is in the cache
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at the first scheduling (for Usage); never updated later
    block_ids: list[int] = field(default_factory=list)  # block table: block i holds tokens [i*bs, (i+1)*bs)
    status: SequenceStatus = SequenceStatus.WAITING  # lifecycle state, set by the scheduler
    num_preemptions: int = 0  # times this sequence lost its blocks and went back to the waiting queue
    cache_salt: str | None = None  # extra prefix-cache key (adapter name, image digest); None: tokens only
    max_draft_tokens: int = 0  # speculative decoding: most draft tokens the target verifies per decoding step
    max_output_tokens: int | None = None  # most output tokens it may reach (caps the draft tokens near the end)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output, as one new list."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Number of prompt plus output tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Number of sampled tokens so far."""
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still waiting for their K/V (at least 1 while the sequence runs normally)."""
        return self.num_tokens - self.num_computed_tokens
