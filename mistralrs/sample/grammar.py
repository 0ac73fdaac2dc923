"""Constrained decoding through llguidance: grammars compiled per request, one matcher per sequence.

`GrammarCompiler` is built once per model from its `tokenizers.Tokenizer` (the llguidance tokenizer costs about
a second to build, so it is made on first use). `compile(grammar_type, text)` turns a request's grammar into a
`CompiledGrammar` or raises ValueError with llguidance's reason, or because no finite JSON value matches a JSON
schema (`schema_termination`: llguidance compiles such recursions, then stalls). The engine makes one `LLMatcher`
per sequence (`CompiledGrammar.new_matcher`), the sampler masks the logits of the constrained rows with it
(`apply_grammar_masks`) and the engine advances it with every sampled token. EOS is one of the llguidance
tokenizer's EOS tokens, so the mask allows it only where the grammar accepts. llguidance itself is imported
when the first grammar is compiled (mistralrs/dependencies.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from mistralrs.dependencies import import_dependency
from mistralrs.sample.schema_termination import check_terminates

if TYPE_CHECKING:
    import llguidance

GRAMMAR_TYPES = ("regex", "lark", "json_schema", "llguidance")  # accepted values of grammar_type
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no free whitespace for a model to ramble in


class _DecodedVocab:
    """llguidance's generic tokenizer interface over a tokenizer it cannot read from JSON: a `tokenizers.Tokenizer`
    with a decoder it does not know (each token's bytes are its own decoded text; right for character- and
    word-level vocabularies), or a GGUF SentencePiece vocabulary (loader/spm_tokenizer.py, which gives each
    token's bytes, `token_bytes`, and a copy that encodes text continuing other text, `without_space_prefix`).
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int, vocab_size: int) -> None:
        self.eos_token_id = eos_token_id  # llguidance's main EOS
        self.bos_token_id = None  # not needed for matching generated text
        if isinstance(tokenizer, Tokenizer):
            self._tokenizer = tokenizer  # encodes text llguidance forces, which continues the generated text
            texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
            self.tokens = [text.encode("utf-8") for text in texts]  # bytes of every token id
        else:
            self._tokenizer = tokenizer.without_space_prefix()
            self.tokens = tokenizer.token_bytes()
        specials = tokenizer.get_added_tokens_decoder()
        self.special_token_ids = [i for i, added in specials.items() if added.special]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def _llguidance() -> ModuleType:
    return import_dependency("llguidance")


def build_ll_tokenizer(tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a model (a `tokenizers.Tokenizer`, or a GGUF SentencePiece vocabulary's
    tokenizer): from its tokenizer.json, or from its tokens' bytes when there is none or llguidance cannot read it."""
    llguidance = _llguidance()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = list(eos_token_ids)
    if isinstance(tokenizer, Tokenizer):
        try:
            return llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos or None)
        except ValueError:   # a decoder llguidance does not know (for instance Fuse)
            pass
    wrapper = llguidance.TokenizerWrapper(_DecodedVocab(tokenizer, eos[0] if eos else 0, vocab_size))
    return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos or None)


def grammar_source(grammar_type: str, text: str) -> str:
    """The llguidance grammar (JSON) for a request's `grammar` of the given `grammar_type`."""
    llguidance = _llguidance()
    if grammar_type == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if grammar_type == "lark":
        return llguidance.LLMatcher.grammar_from_lark(text)
    if grammar_type == "json_schema":
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            check_terminates(json.loads(text))
        except ValueError as err:
            raise ValueError(f"grammar: invalid JSON schema: {err}") from None
        return source
    if grammar_type == "llguidance":
        _check_embedded_schemas(text)
        return text
    raise ValueError(f"grammar_type must be one of {', '.join(GRAMMAR_TYPES)}; got {grammar_type!r}")


def _check_embedded_schemas(text: str) -> None:
    """`check_terminates` on the JSON schemas of an llguidance grammar (`{"grammars": [{"json_schema": ...}]}`)."""
    try:
        document = json.loads(text)
    except ValueError:
        return   # llguidance reports it
    grammars = document.get("grammars") if isinstance(document, dict) else None
    for i, grammar in enumerate(grammars if isinstance(grammars, list) else []):
        if isinstance(grammar, dict) and "json_schema" in grammar:
            try:
                check_terminates(grammar["json_schema"])
            except ValueError as err:
                raise ValueError(f"grammar: invalid JSON schema in grammars[{i}]: {err}") from None


def json_schema_source(schema: dict) -> str:
    """The llguidance grammar for output matching a JSON schema given as a dict."""
    return grammar_source("json_schema", json.dumps(schema))


@dataclass
class CompiledGrammar:
    """A request's grammar, validated against the model's tokenizer; makes one matcher per sequence."""

    ll_tokenizer: llguidance.LLTokenizer  # the model's llguidance tokenizer
    source: str  # llguidance grammar (JSON)

    def new_state(self) -> GrammarState:
        """A fresh matcher at the start of the grammar, for one sequence."""
        matcher = _llguidance().LLMatcher(self.ll_tokenizer, self.source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        return GrammarState(matcher, self.ll_tokenizer.vocab_size)


@dataclass
class GrammarState:
    """One sequence's position in its grammar (owned by the engine thread)."""

    matcher: llguidance.LLMatcher  # advanced with every sampled token
    vocab_size: int  # tokens its masks cover

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed-token bits into a contiguous int32 CPU row of ceil(vocab / 32) words or more."""
        words = min(bitmask_row.shape[0], math.ceil(self.vocab_size / 32))
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), words * 4)
        bitmask_row[words:] = 0

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; False when the grammar rejects it (the matcher then stays in error)."""
        if self.matcher.is_stopped():
            return True
        return self.matcher.consume_token(token_id)


class GrammarCompiler:
    """Compiles request grammars for one model (the llguidance tokenizer is built once, on first use)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer  # the model's tokenizers.Tokenizer
        self.eos_token_ids = list(eos_token_ids)  # the model's EOS set, allowed only where the grammar accepts
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The model's llguidance tokenizer."""
        if self._ll_tokenizer is None:
            self._ll_tokenizer = build_ll_tokenizer(self.tokenizer, self.eos_token_ids)
        return self._ll_tokenizer

    def compile(self, grammar_type: str, text: str) -> CompiledGrammar:
        """Validate a request's grammar; ValueError with the reason when it cannot compile."""
        return self.compile_source(grammar_source(grammar_type, text))

    def compile_source(self, source: str) -> CompiledGrammar:
        """Validate an llguidance grammar (JSON); ValueError with the reason when it cannot compile."""
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
        if is_error:
            raise ValueError(f"grammar: cannot compile: {messages[0] if messages else 'unknown error'}")
        grammar = CompiledGrammar(self.ll_tokenizer, source)
        grammar.new_state()   # fail at request time, not in the engine thread
        return grammar


def apply_grammar_masks(logits: torch.Tensor, grammars: Sequence[GrammarState | None]) -> torch.Tensor:
    """Return logits with -inf on the tokens each constrained row's grammar forbids.

    Only rows with a grammar are computed ([constrained, ceil(vocab/32)] int32 bitmask filled on the host,
    one copy to the logits' device); other rows are untouched. Tokens beyond the grammar's vocabulary are
    forbidden in constrained rows.
    """
    constrained = [i for i, grammar in enumerate(grammars) if grammar is not None]
    if not constrained:
        return logits
    vocab_size = logits.shape[1]
    bitmask = torch.full((len(constrained), math.ceil(vocab_size / 32)), -1, dtype=torch.int32)
    for slot, row in enumerate(constrained):
        grammars[row].fill_mask(bitmask[slot])
    allowed = _unpack_bits(bitmask.to(logits.device), vocab_size)  # [constrained, vocab] bool
    index = torch.tensor(constrained, dtype=torch.long, device=logits.device)
    masked = logits[index].masked_fill(~allowed, -math.inf)
    return logits.index_copy(0, index, masked)


def _unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmask → [rows, vocab_size] bool (bit j of word w is token 32 * w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
