"""Turns sampled tokens into text deltas: incremental detokenization, stop conditions, logprobs."""

from __future__ import annotations

from tokenizers import Tokenizer

from mistralrs.engine.detokenizer import IncrementalDetokenizer
from mistralrs.engine.request import SeqDelta, SeqResult, StopConditions, TokenLogprob
from mistralrs.sample import SampledToken


def _held_back_length(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    That much text must not be streamed yet: the next tokens may complete a stop string there.
    """
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class SeqOutputState:
    """Per-sequence output bookkeeping, owned by the engine thread."""

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: StopConditions,
                 *, want_logprobs: bool, skip_special_tokens: bool) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.stop = stop
        self.want_logprobs = want_logprobs
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.text = ""                     # visible text so far (stop strings cut once found)
        self.num_emitted_chars = 0         # prefix of `text` already sent to the caller
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.cut_at_stop_string = False    # the text ends where a stop string started

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _record_logprob(self, sampled: SampledToken) -> TokenLogprob:
        top = [(tid, self._token_text(tid), lp) for tid, lp in sampled.top_logprobs]
        entry = TokenLogprob(sampled.token_id, self._token_text(sampled.token_id), sampled.logprob, top)
        self.logprobs.append(entry)
        return entry

    def process(self, sampled: SampledToken) -> SeqDelta:
        """Account for one sampled token; return what the caller should see of it."""
        token_id = sampled.token_id
        self.token_ids.append(token_id)
        self.cumulative_logprob += sampled.logprob
        new_logprobs: list[TokenLogprob] = []
        if token_id in self.stop.eos_token_ids or token_id in self.stop.stop_token_ids:
            self.finish_reason = "stop"
        else:
            if self.want_logprobs:
                new_logprobs.append(self._record_logprob(sampled))
            self.text += self.detokenizer.add_token(token_id)
            self._cut_at_stop_string()
        if self.finish_reason is None and len(self.token_ids) >= self.stop.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not self.cut_at_stop_string:
            self.text += self.detokenizer.flush()   # bytes of an unfinished character, held back until now
        visible_end = len(self.text)
        if self.finish_reason is None:
            visible_end -= _held_back_length(self.text, self.stop.stop_strings)
        delta_text = self.text[self.num_emitted_chars:visible_end]
        self.num_emitted_chars = max(self.num_emitted_chars, visible_end)
        return SeqDelta(self.index, delta_text, [token_id], new_logprobs, self.finish_reason)

    def _cut_at_stop_string(self) -> None:
        if not self.stop.stop_strings:
            return
        longest = max(len(s) for s in self.stop.stop_strings)
        search_from = max(0, self.num_emitted_chars - longest)
        hits = [pos for s in self.stop.stop_strings if (pos := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            self.cut_at_stop_string = True

    def cancel(self) -> SeqDelta:
        """Finish as canceled; nothing more is streamed."""
        self.finish_reason = "canceled"
        return SeqDelta(self.index, "", [], [], self.finish_reason)

    def result(self) -> SeqResult:
        assert self.finish_reason is not None, "result() before the sequence finished"
        return SeqResult(self.index, self.text, list(self.token_ids), self.finish_reason,
                         self.cumulative_logprob, list(self.logprobs))
