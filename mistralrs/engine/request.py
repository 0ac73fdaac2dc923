"""Messages between the API layer and the engine thread.

An API request becomes one `EngineRequest` (token ids, sampling and stop conditions, n sequences). The engine
answers on the request's own queue with `SeqDelta` batches, then a final `RequestFinished` (or an exception).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mistralrs.engine.stop_strings import StopStringMatcher, check_stop_strings
from mistralrs.sample import SamplingParams
from mistralrs.sample.grammar import CompiledGrammar

if TYPE_CHECKING:
    from mistralrs.vision.base import ImageInputs


@dataclass
class StopConditions:
    """When a generated sequence ends (checked by the output processor after every token)."""

    max_tokens: int                                     # most generated tokens (already clamped to the context)
    eos_token_ids: frozenset[int] = frozenset()         # model EOS set (REFERENCE §8.4); excluded from the text
    stop_token_ids: frozenset[int] = frozenset()        # single-token stop sequences; excluded from the text
    stop_strings: tuple[str, ...] = ()                  # cut the text where the first one starts (bounded)
    stop_matcher: StopStringMatcher = field(init=False, repr=False, compare=False)  # finds them, built here

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        check_stop_strings(self.stop_strings)
        if not all(self.stop_strings):
            raise ValueError("stop: stop sequences must not be empty")
        self.stop_matcher = StopStringMatcher(self.stop_strings)


@dataclass
class EngineRequest:
    """One API request as the engine sees it: a tokenized prompt and how to continue it."""

    request_id: str                                     # shown to the user as the response `id`
    prompt_token_ids: list[int]                         # rendered and tokenized prompt
    sampling: SamplingParams                            # shared by all sequences of the request
    stop: StopConditions
    num_seqs: int = 1                                   # sequences generated (n_choices, or best_of for completions)
    skip_special_tokens: bool = True                    # when detokenizing the output
    grammar: CompiledGrammar | None = None              # constrains every sequence (one matcher each)
    adapters: tuple[str, ...] | None = None             # LoRA adapters of this request (None: the active set)
    images: ImageInputs | None = None                   # a vision model's preprocessed images (None: text only)
    arrival_time: float = field(default_factory=time.monotonic)  # when it was queued (Usage timings start here)
    outputs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # engine → caller messages

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("Received an empty prompt.")
        if self.num_seqs < 1:
            raise ValueError("Number of choices must be greater than 0.")


@dataclass
class SeqDelta:
    """What one sequence produced in one engine step."""

    index: int                                          # choice number within the request
    text: str                                           # new text (may be empty while held back)
    token_ids: list[int]                                # new token ids (stop/EOS tokens included)
    logprobs: list[TokenLogprob]                        # one per new visible token when logprobs were asked
    finish_reason: str | None = None                    # "stop" | "length" | "canceled" once finished


@dataclass
class TokenLogprob:
    """Natural-log probability of a generated token and its top alternatives."""

    token_id: int
    text: str                                           # the token's own decoded text
    logprob: float
    top: list[tuple[int, str, float]]                   # (token id, decoded text, logprob), best first


@dataclass
class SeqResult:
    """A finished sequence, as kept for the final response."""

    index: int
    text: str                                           # full visible text (stop strings cut)
    token_ids: list[int]                                # all generated token ids
    finish_reason: str
    cumulative_logprob: float                           # sum of chosen-token logprobs (best_of ranking); 0 unless
                                                        # the request reported or ranked them
    logprobs: list[TokenLogprob]


@dataclass
class RequestFinished:
    """Final message of a request: every sequence's result and the timings for `Usage`."""

    results: list[SeqResult]
    num_prompt_tokens: int
    num_cached_prompt_tokens: int                       # prompt tokens served from the prefix cache
    num_completion_tokens: int
    prompt_time_sec: float                              # queued → first token
    completion_time_sec: float                          # first token → last token
    total_time_sec: float                               # queued → finished
