"""Incremental detokenization: one sampled token in, the text it completes out.

Decoding token by token is wrong for both tokenizer families: a byte-level BPE token can hold part of a
UTF-8 character, and a SentencePiece decoder treats the first token of a decode specially (`▁` → space, and
some decoders strip that leading space). So each step decodes a short window twice, vLLM style:

    ids:  ... [prefix_offset ........ read_offset ........ end]
               └─ already emitted ───┘└─ not yet emitted ──┘

`prefix_text = decode(ids[prefix_offset:read_offset])` and `new_text = decode(ids[prefix_offset:])`; the delta
is `new_text[len(prefix_text):]`. Both decodes start at the same token, so whatever the decoder does to the
first token of a window cancels out. The window starts inside the prompt for the first generated tokens, so
the first word keeps the leading space it has after the prompt. A window whose text ends in U+FFFD (an
incomplete UTF-8 character) is held back until a later token completes it, and dropped if none does.
"""

from __future__ import annotations

from tokenizers import Tokenizer

# How many prompt tokens give the first generated tokens their left context (vLLM uses the same number).
NUM_PROMPT_CONTEXT_TOKENS = 5

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns the token ids of one generated sequence into text deltas as they are sampled.

    Invariant: the concatenation of every delta returned by `add_token` plus `pending_text` equals `text`,
    which is the decode of the generated ids continuing the prompt: `decode(ctx + output)[len(decode(ctx)):]`
    for the last few prompt tokens `ctx`. For byte-level BPE and for SentencePiece tokenizers whose decoder
    does not strip a leading space (Gemma) this is exactly `tokenizer.decode(output_ids)`; for a decoder that
    strips the first token's leading space (Llama 2) the first word keeps its space, as it continues the prompt.
    (One exception: when a model emits byte tokens that are not valid UTF-8 right after a complete byte-encoded
    character, tokenizers' ByteFallback turns that whole run into U+FFFDs in a full decode, while the stream has
    already emitted the complete character.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context           # prompt context followed by every generated id
        self._num_context = len(context)          # how many of `_ids` are prompt context
        self._prefix_offset = 0                   # start of the decode window
        self._read_offset = len(context)          # ids before this are emitted (or are context)
        self._emitted: list[str] = []             # every delta returned so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._emitted.append(delta)
        return delta

    @property
    def output_token_ids(self) -> list[int]:
        """The generated ids so far (without the prompt context)."""
        return self._ids[self._num_context:]

    @property
    def pending_text(self) -> str:
        """Text of the tokens not emitted yet: an incomplete character (ending in U+FFFD), or ""."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of generation: emit what is still held back, without the incomplete character at its end
        (the bytes of a character cut by `max_tokens` or EOS are dropped rather than shown as U+FFFD)."""
        pending = self.pending_text
        delta = pending.rstrip(REPLACEMENT_CHAR)
        if pending:
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All generated text so far, held-back bytes included until `flush` drops them (see the class
        invariant)."""
        return "".join(self._emitted) + self.pending_text
