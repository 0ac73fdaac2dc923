"""Chat prompts whose request text cannot forge control tokens.

A chat template writes special tokens (`<|im_start|>`, `<|im_end|>`) around the messages. Encoding the rendered
prompt with special-token parsing everywhere would also turn the same text typed into a message into control
tokens, so a user could close their turn and open a forged system turn. So, before rendering, every span of a
request string (message contents and parts, names, tool calls, tool schemas: every string, dict keys included)
that the tokenizer would read as a special token is replaced by a placeholder holding no special-token text
(private-use characters around a per-prompt nonce and a number; digits survive case filters). The rendered prompt
is encoded as usual, which finds exactly the special tokens the template wrote; the text between two of them that
holds a placeholder is encoded again, placeholders restored, with special-token parsing off (transformers'
`split_special_tokens`), so the typed text stays text. A prompt whose strings hold no special-token text is encoded
exactly as before, and every other stretch between two special tokens keeps its ids.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from tokenizers import Encoding, Tokenizer

from mistralrs.loader.spm_tokenizer import SentencePieceTokenizer

Render = Callable[[list[dict], list[dict] | None], str]   # (messages, tools) -> rendered prompt


def _never_prepend(config: Any) -> Any:
    """A tokenizer JSON config whose Metaspace pre-tokenizers prepend nothing (text in the middle of a prompt)."""
    if isinstance(config, dict):
        changed = {key: _never_prepend(value) for key, value in config.items()}
        if changed.get("type") == "Metaspace" and changed.get("prepend_scheme") == "first":
            changed["prepend_scheme"] = "never"
        return changed
    if isinstance(config, list):
        return [_never_prepend(value) for value in config]
    return config


class ChatPromptEncoder:
    """Encodes a chat prompt so that special-token text from the request stays text (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        specials = {token_id: token for token_id, token in tokenizer.get_added_tokens_decoder().items()
                    if token.special}
        self._special_ids = frozenset(specials)
        # A string none of whose characters starts a (not normalized) special token holds none of them.
        self._first_chars = (None if any(token.normalized for token in specials.values())
                             else frozenset(token.content[0] for token in specials.values() if token.content))

    @functools.cached_property
    def _as_text(self) -> tuple[Tokenizer, Tokenizer]:
        """Copies of the tokenizer that read special-token text as text: for the prompt's start, and for text
        after a special token (a Metaspace pre-tokenizer prepends its space only at the start of the input; a GGUF
        SentencePiece vocabulary's space prefix goes before every stretch of text, as in a whole-prompt encode)."""
        if isinstance(self.tokenizer, SentencePieceTokenizer):
            as_text = self.tokenizer.special_tokens_as_text()
            return as_text, as_text
        config = self.tokenizer.to_str()
        first, middle = Tokenizer.from_str(config), Tokenizer.from_str(json.dumps(_never_prepend(json.loads(config))))
        first.encode_special_tokens = middle.encode_special_tokens = True
        return first, middle

    def encode(self, render: Render, messages: list[dict], tools: list[dict] | None, *,
               keep_ids: frozenset[int] = frozenset(), transform: Callable[[str], str] | None = None) -> list[int]:
        """The ids of the prompt `render(messages, tools)` makes, special tokens only where the template put them
        and where the request typed one of `keep_ids` (a vision model's image placeholder); `transform` rewrites
        the rendered prompt before it is encoded (a vision model's placeholder expansion)."""
        nonce = secrets.randbelow(10**12)
        originals: list[str] = []   # placeholder number -> the request text it stands for
        protect = functools.partial(self._protect, nonce=nonce, originals=originals, keep_ids=keep_ids)
        text = render(protect(messages), protect(tools))
        if transform is not None:
            text = transform(text)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if not originals:
            return encoding.ids
        return self._encode_stretches(text, encoding, re.compile(f"\ue000{nonce}:(\\d+)\ue001"), originals)

    def _protect(self, value: Any, nonce: int, originals: list[str], keep_ids: frozenset[int]) -> Any:
        """`value` (strings, lists, dicts, anything else kept) with special-token spans of its strings replaced
        (those of `keep_ids` kept)."""
        if isinstance(value, str):
            return self._protect_text(value, nonce, originals, keep_ids)
        if isinstance(value, (list, tuple)):
            return [self._protect(item, nonce, originals, keep_ids) for item in value]
        if isinstance(value, dict):
            return {self._protect(key, nonce, originals, keep_ids): self._protect(item, nonce, originals, keep_ids)
                    for key, item in value.items()}
        return value

    def _protect_text(self, text: str, nonce: int, originals: list[str], keep_ids: frozenset[int]) -> str:
        if self._first_chars is not None and self._first_chars.isdisjoint(text):
            return text
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        spans = [offsets for token_id, offsets in zip(encoding.ids, encoding.offsets)
                 if token_id in self._special_ids and token_id not in keep_ids]
        if not spans:
            return text
        pieces, position = [], 0
        for start, end in spans:
            pieces.append(text[position:start])
            pieces.append(f"\ue000{nonce}:{len(originals)}\ue001")
            originals.append(text[start:end])
            position = end
        pieces.append(text[position:])
        return "".join(pieces)

    def _encode_stretches(self, text: str, encoding: Encoding, placeholder: re.Pattern, originals: list[str]
                          ) -> list[int]:
        """The template's special tokens as encoded; each stretch between them that holds a placeholder is encoded
        again as text, with the request's text put back."""
        ids: list[int] = []
        stretch: list[int] = []   # ids of the stretch since the last special token
        start = 0
        for token_id, (token_start, token_end) in [*zip(encoding.ids, encoding.offsets), (None, (len(text), 0))]:
            if token_id is not None and token_id not in self._special_ids:
                stretch.append(token_id)
                continue
            piece = text[start:token_start]
            if placeholder.search(piece):
                restored = placeholder.sub(lambda match: originals[int(match.group(1))], piece)
                stretch = self._as_text[0 if start == 0 else 1].encode(restored, add_special_tokens=False).ids
            ids.extend(stretch)
            if token_id is not None:
                ids.append(token_id)
            stretch, start = [], token_end
        return ids
