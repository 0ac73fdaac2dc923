"""Turns sampled tokens into text deltas: incremental detokenization, stop conditions, logprobs."""

from __future__ import annotations

from tokenizers import Tokenizer

from mistralrs.engine.detokenizer import IncrementalDetokenizer
from mistralrs.engine.request import SeqDelta, SeqResult, StopConditions, TokenLogprob
from mistralrs.sample import SampledToken


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
        self.stop_state = 0                # the stop-string matcher's state after `text`

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
        if sampled.logprob is not None:   # present when the request reports or ranks logprobs
            self.cumulative_logprob += sampled.logprob
        new_logprobs: list[TokenLogprob] = []
        if token_id in self.stop.eos_token_ids or token_id in self.stop.stop_token_ids:
            self.finish_reason = "stop"
        else:
            if self.want_logprobs:
                new_logprobs.append(self._record_logprob(sampled))
            self._append_text(self.detokenizer.add_token(token_id))
        if self.finish_reason is None and len(self.token_ids) >= self.stop.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not self.cut_at_stop_string:
            self.text += self.detokenizer.flush()   # text held back until now, less an unfinished character
        visible_end = len(self.text)
        if self.finish_reason is None:
            visible_end -= self.stop.stop_matcher.held_back(self.stop_state)
        delta_text = self.text[self.num_emitted_chars:visible_end]
        self.num_emitted_chars = max(self.num_emitted_chars, visible_end)
        return SeqDelta(self.index, delta_text, [token_id], new_logprobs, self.finish_reason)

    def _append_text(self, delta: str) -> None:
        """Add new text; cut it where the earliest stop string completed by it starts."""
        offset = len(self.text)
        self.text += delta
        if not delta or not self.stop.stop_strings:
            return
        self.stop_state, start = self.stop.stop_matcher.feed(self.stop_state, delta)
        if start is not None:
            self.text = self.text[:offset + start]
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
