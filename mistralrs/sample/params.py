"""Per-request sampling settings and the small messages the sampler takes and returns.

`SamplingParams` is what a request asks for (validated once, when the request is built); `SamplingRow`
is one row of a sampler call (params plus that sequence's context and RNG); `SampledToken` is what the
sampler returns for the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_TEMPERATURE = 1e-7  # a temperature below this (0 included) means exact greedy argmax
MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask for per token (as in the OpenAI API)


def _check_number(name: str, value: object) -> float:
    """Return `value` as a finite float, or raise TypeError/ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _check_int(name: str, value: object) -> int:
    """Return `value` if it is an int (bools excluded), else raise TypeError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_bool(name: str, value: object) -> bool:
    """Return `value` if it is a bool, else raise TypeError naming the field."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


@dataclass
class SamplingParams:
    """How to choose the next token of one request, validated on construction.

    The pipeline the sampler runs (REFERENCE §8.1, with the reference's bugs fixed): logit bias, DRY and
    presence/frequency penalties change the logits; then a temperature below 1e-7 means exact greedy
    argmax, anything else divides the logits by the temperature, keeps the top-k tokens, then the
    top-p nucleus, then the tokens with p >= min_p * max_p, and draws from what is left.
    """

    temperature: float = 1.0  # < 1e-7 (0 included) → exact greedy argmax; top_k/top_p/min_p skipped
    top_k: int = 0  # keep only the k most likely tokens; 0 or less = off
    top_p: float = 1.0  # nucleus: smallest set whose cumulative probability reaches top_p; in (0, 1], 1 = off
    min_p: float = 0.0  # drop tokens with p < min_p * max_p; in [0, 1), 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token seen in the context (prompt + generated)
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token in the context (prompt + generated)
    logit_bias: dict[int, float] | None = None  # token id → value added to its logit before everything else
    dry_multiplier: float = 0.0  # DRY penalty strength; 0 = DRY off
    dry_base: float = 1.75  # DRY penalty grows as base ** (match length - allowed length); > 0
    dry_allowed_length: int = 2  # repeats shorter than this are not penalised by DRY; >= 0
    dry_sequence_breaker_ids: frozenset[int] = frozenset()  # token ids that stop DRY matching
    logprobs: bool = False  # the caller wants the chosen token's log probability reported
    rank_by_logprob: bool = False  # the engine ranks the request's sequences by their summed logprobs (best_of)
    top_logprobs: int = 0  # number of most likely alternatives to report per token; 0..20
    seed: int | None = None  # per-request seed (the engine seeds the sequence's generator from it)
    grammar: Any = None  # the sequence's GrammarState (sample/grammar.py); set on a per-sequence copy

    def __post_init__(self) -> None:
        self.temperature = _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_k = _check_int("top_k", self.top_k)
        self.top_p = _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _check_number("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        self.presence_penalty = _check_number("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _check_number("frequency_penalty", self.frequency_penalty)
        self.logit_bias = _check_logit_bias(self.logit_bias)
        self._check_dry()
        _check_bool("logprobs", self.logprobs)
        _check_bool("rank_by_logprob", self.rank_by_logprob)
        self.top_logprobs = _check_int("top_logprobs", self.top_logprobs)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.seed is not None:
            _check_int("seed", self.seed)

    def _check_dry(self) -> None:
        self.dry_multiplier = _check_number("dry_multiplier", self.dry_multiplier)
        if self.dry_multiplier < 0:
            raise ValueError(f"dry_multiplier must be >= 0, got {self.dry_multiplier}")
        self.dry_base = _check_number("dry_base", self.dry_base)
        if self.dry_base <= 0:
            raise ValueError(f"dry_base must be > 0, got {self.dry_base}")
        self.dry_allowed_length = _check_int("dry_allowed_length", self.dry_allowed_length)
        if self.dry_allowed_length < 0:
            raise ValueError(f"dry_allowed_length must be >= 0, got {self.dry_allowed_length}")
        breakers = self.dry_sequence_breaker_ids
        if isinstance(breakers, (str, bytes)) or not hasattr(breakers, "__iter__"):
            raise TypeError(f"dry_sequence_breaker_ids must be a set of int token ids, got {type(breakers).__name__}")
        for token_id in breakers:
            _check_int("dry_sequence_breaker_ids entry", token_id)
        self.dry_sequence_breaker_ids = frozenset(breakers)

    @property
    def is_greedy(self) -> bool:
        """True when the temperature selects exact argmax (below 1e-7, 0 included)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_logprob(self) -> bool:
        """True when the sampler must compute the chosen token's logprob: it is reported or ranked."""
        return self.logprobs or self.rank_by_logprob

    @property
    def modifies_logits(self) -> bool:
        """True when logit bias, DRY or a presence/frequency penalty changes the logits."""
        return bool(self.logit_bias) or self.dry_multiplier != 0 or self.has_count_penalties

    @property
    def has_count_penalties(self) -> bool:
        """True when a presence or frequency penalty is set."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _check_logit_bias(logit_bias: object) -> dict[int, float] | None:
    """Validate `logit_bias` ({token id >= 0: finite float}) and return it with float values."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise TypeError(f"logit_bias must be a dict of token id to float, got {type(logit_bias).__name__}")
    checked = {}
    for token_id, bias in logit_bias.items():
        _check_int("logit_bias token id", token_id)
        if token_id < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token_id}")
        checked[token_id] = _check_number(f"logit_bias[{token_id}]", bias)
    return checked


@dataclass
class SamplingRow:
    """One row of a sampler call: the request's settings, the sequence's context and its own RNG."""

    params: SamplingParams  # the request's sampling settings
    token_ids: list[int]  # the whole context so far (prompt + generated), for penalties and DRY
    num_prompt_tokens: int  # how many of token_ids are the prompt
    generator: torch.Generator | None = None  # the sequence's own RNG; None only for greedy rows

    def __post_init__(self) -> None:
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"num_prompt_tokens must be in 0..{len(self.token_ids)} (len(token_ids)), "
                f"got {self.num_prompt_tokens}"
            )
        if self.generator is None and not self.params.is_greedy:
            raise ValueError("generator must be a torch.Generator for a sampled row (temperature >= 1e-7)")


@dataclass
class SampledToken:
    """The sampler's answer for one row."""

    token_id: int  # the chosen token
    # natural log probability of token_id (after penalties and temperature, before truncation); None unless the
    # row's params.needs_logprob
    logprob: float | None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first
