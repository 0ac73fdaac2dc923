"""Turns API-level prompts and options into engine requests: chat template, tokenization, limits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from mistralrs.engine.chat_prompt import ChatPromptEncoder
from mistralrs.engine.request import EngineRequest, StopConditions
from mistralrs.engine.stop_strings import check_stop_strings
from mistralrs.loader.chat_template import ChatTemplate
from mistralrs.loader.tokenizer import TokenizerBundle
from mistralrs.sample import SamplingParams
from mistralrs.sample.grammar import CompiledGrammar, GrammarCompiler

DEFAULT_DRY_BREAKERS = ("\n", ":", "\"", "*")


@dataclass
class GenerationOptions:
    """The generation controls shared by chat and completion requests (API names, None = default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    stop_seqs: list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    seed: int | None = None


class InputProcessor:
    """Validates and tokenizes prompts against one loaded model's tokenizer and limits."""

    def __init__(self, bundle: TokenizerBundle, max_model_len: int, *,
                 allow_special_tokens_in_messages: bool = False) -> None:
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer
        self.max_model_len = max_model_len       # context limit: model length capped by the KV capacity
        # True: special-token text typed in a message becomes a control token (the reference's behaviour)
        self.allow_special_tokens_in_messages = allow_special_tokens_in_messages
        self.chat_prompts = ChatPromptEncoder(bundle.tokenizer)   # keeps it text otherwise
        self.chat_template = self._compile(bundle.chat_template)
        self.tool_chat_template = self._compile(bundle.tool_chat_template) or self.chat_template
        self.grammars = GrammarCompiler(bundle.tokenizer, sorted(bundle.eos_token_ids))  # request grammars → matchers

    def _compile(self, source: str | None) -> ChatTemplate | None:
        if source is None:
            return None
        return ChatTemplate(source, bos_token=self.bundle.bos_token, eos_token=self.bundle.eos_token,
                            unk_token=self.bundle.unk_token)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Most characters of prompt text one token can stand for: the longest vocabulary entry (byte-level and
        SentencePiece entries spell at least as many characters as the text they cover)."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def _bounded(self, text: str, keep_tail: bool) -> str:
        """`text` if its length allows it to fit the context, checked before tokenizing (a cheap bound).

        More than `max_model_len * max_token_chars` characters cannot fit: a ValueError, or with `keep_tail` only
        the tail that may fit is kept (the caller then keeps the last tokens of its tokenization).
        """
        if len(text) <= self.max_model_len:   # no more characters than the context has tokens
            return text
        limit = self.max_model_len * self.max_token_chars
        if len(text) <= limit:
            return text
        if keep_tail:
            return text[len(text) - limit:]
        raise ValueError(f"Prompt sequence length is greater than {self.max_model_len - 1}, perhaps consider "
                         f"using `truncate_sequence`? (prompt has {len(text)} characters, and no token of this "
                         f"model covers more than {self.max_token_chars}: at most {limit} characters can fit)")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """A prompt's token ids. A `tokenizers.Tokenizer`'s `encode_batch` releases the GIL while it works (`encode`
        does not), and a SentencePieceTokenizer is Python, switched out at the interpreter's interval: either way a
        long prompt tokenized on a worker thread does not stall the server's event loop or the engine thread."""
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, *,
                        keep_tail: bool = False, keep_ids: frozenset[int] = frozenset(),
                        transform: Callable[[str], str] | None = None) -> list[int]:
        """Render the chat template and tokenize the prompt (see `_bounded` for `keep_tail`). `keep_ids`: special
        tokens the request's text may hold; `transform`: rewrites the rendered prompt before it is tokenized (both:
        a vision model's image placeholders, engine/image_prompt.py)."""
        if self.chat_template is None:
            raise ValueError("Received messages for a model which does not have a chat template. Either use a "
                             "different model or pass a chat template (chat_template= or jinja_explicit=), or "
                             "send a CompletionRequest.")
        if not messages:
            raise ValueError("Received an empty prompt.")
        template = self.tool_chat_template if tools else self.chat_template

        def render(messages: list[dict], tools: list[dict] | None) -> str:
            return self._bounded(template.render(messages, add_generation_prompt=True, tools=tools), keep_tail)

        if self.allow_special_tokens_in_messages:
            text = render(messages, tools)
            ids = self._encode(text if transform is None else transform(text), add_special_tokens=False)
        else:
            ids = self.chat_prompts.encode(render, messages, tools, keep_ids=keep_ids, transform=transform)
        # As llama.cpp: BOS in front when the tokenizer adds one and the template did not write it (the
        # reference adds special tokens again, which can double the BOS; transformers never adds it).
        bos_id = self.tokenizer.token_to_id(self.bundle.bos_token) if self.bundle.bos_token else None
        if self.bundle.add_bos_token and bos_id is not None and ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
        return ids

    def completion_prompt_ids(self, prompt: str, *, keep_tail: bool = False) -> list[int]:
        """Tokenize a completion prompt (see `_bounded` for `keep_tail`)."""
        if not prompt:
            raise ValueError("Received an empty prompt.")
        return self._encode(self._bounded(prompt, keep_tail), add_special_tokens=True)

    @functools.cached_property
    def _token_texts(self) -> list[str]:
        vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)

    @functools.lru_cache(maxsize=32)
    def breaker_token_ids(self, breakers: tuple[str, ...]) -> frozenset[int]:
        """Every token whose text contains a DRY sequence breaker."""
        return frozenset(i for i, text in enumerate(self._token_texts) if any(b in text for b in breakers))

    def _stop_conditions(self, opts: GenerationOptions, num_prompt_tokens: int) -> StopConditions:
        room = self.max_model_len - num_prompt_tokens
        max_tokens = room if opts.max_tokens is None else min(opts.max_tokens, room)
        check_stop_strings(opts.stop_seqs or ())   # before encoding each of them
        stop_strings = tuple(s for s in (opts.stop_seqs or []) if s)
        stop_token_ids = set()
        for text in stop_strings:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == 1:
                stop_token_ids.add(ids[0])
        return StopConditions(max_tokens=max_tokens, eos_token_ids=frozenset(self.bundle.eos_token_ids),
                              stop_token_ids=frozenset(stop_token_ids), stop_strings=stop_strings)

    def sampling_params(self, opts: GenerationOptions, rank_by_logprob: bool = False) -> SamplingParams:
        breakers = ()
        if opts.dry_multiplier:
            words = DEFAULT_DRY_BREAKERS if opts.dry_sequence_breakers is None else opts.dry_sequence_breakers
            breakers = self.breaker_token_ids(tuple(words))
        return SamplingParams(
            temperature=1.0 if opts.temperature is None else opts.temperature,
            top_k=opts.top_k or 0,
            top_p=1.0 if opts.top_p is None else opts.top_p,
            min_p=opts.min_p or 0.0,
            presence_penalty=opts.presence_penalty or 0.0,
            frequency_penalty=opts.frequency_penalty or 0.0,
            logit_bias=dict(opts.logit_bias) if opts.logit_bias else None,
            dry_multiplier=opts.dry_multiplier or 0.0,
            dry_base=1.75 if opts.dry_base is None else opts.dry_base,
            dry_allowed_length=2 if opts.dry_allowed_length is None else opts.dry_allowed_length,
            dry_sequence_breaker_ids=breakers,
            logprobs=opts.logprobs,
            top_logprobs=(opts.top_logprobs or 0) if opts.logprobs else 0,
            rank_by_logprob=rank_by_logprob,
            seed=opts.seed,
        )

    def build(self, request_id: str, prompt_ids: list[int], opts: GenerationOptions,
              num_seqs: int, grammar: CompiledGrammar | None = None, *,
              rank_by_logprob: bool = False) -> EngineRequest:
        """Check the prompt against the context and make the engine request. `rank_by_logprob`: the sequences are
        ranked by their summed logprobs (a completion's best_of), so the sampler computes them."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"Prompt sequence length is greater than {self.max_model_len - 1}, perhaps consider "
                             f"using `truncate_sequence`? (prompt has {len(prompt_ids)} tokens)")
        vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        for token_id in (opts.logit_bias or {}):
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias: token id {token_id} is outside the vocabulary [0, {vocab_size})")
        return EngineRequest(request_id, prompt_ids, self.sampling_params(opts, rank_by_logprob),
                             self._stop_conditions(opts, len(prompt_ids)), num_seqs=num_seqs, grammar=grammar)
