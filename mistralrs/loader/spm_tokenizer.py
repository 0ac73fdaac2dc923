"""The tokenizer of a GGUF `llama` (SentencePiece) vocabulary, run as llama.cpp runs it (llama-vocab.cpp's SPM
session), with the part of the `tokenizers.Tokenizer` interface the engine uses.

Encoding: added tokens (CONTROL ones and bos/eos/unk special, USER_DEFINED ones plain) are cut out of the text
first, leftmost and longest first; each stretch of text between them gets `▁` for its spaces (and one `▁` in front
when `tokenizer.ggml.add_space_prefix` says so), is split into characters, and the adjacent pair whose
concatenation is the best-scoring normal token is merged until none is left; ties go to the leftmost pair, as in
llama.cpp. A character that is no token becomes the `<0xNN>` tokens of its UTF-8 bytes (unk where the vocabulary
has none; runs of unk fused into one). Decoding joins the pieces with `▁` read as a space, runs of byte tokens as
UTF-8 (U+FFFD for each byte of an invalid run), and drops the leading space the prefix added.

Why not a `tokenizers` BPE with one merge per split of every token (what this replaces): for Gemma 3's 262,144
tokens that model holds two string maps and 513k merges, ~70 MB resident and +220 MB while it is built; this keeps
the token list, one dict over it and the scores (~40 MB), and it breaks ties by position as llama.cpp does (a merge
table can only rank equal scores by vocabulary order).
"""

from __future__ import annotations

import array
import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import AddedToken

SPACE = "\u2581"  # SentencePiece's visible space
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class SpmEncoding:
    """One encoded text: ids, their token strings, and each one's character span in the text."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


def _longest_match_pattern(strings: Iterable[str]) -> re.Pattern | None:
    """A regex that matches, at a position, the longest of `strings` that starts there (a trie as nested groups:
    each node tries to go on before it may stop, and its children begin with different characters)."""
    trie: dict = {}
    for text in strings:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = True

    def pattern(node: dict) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(pattern(trie)) if trie else None


def byte_token_value(token: str) -> int | None:
    """The byte a `<0xNN>` token stands for; None for any other token."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


class SentencePieceTokenizer:
    """A GGUF SentencePiece vocabulary (see the module docstring); `encode_special_tokens = True` reads special
    token text as text (user-defined tokens still stay whole), as `tokenizers` does."""

    def __init__(self, tokens: list[str], scores: Sequence[float], *, vocab: dict[str, int], mergeable: bytes,
                 byte_ids: Iterable[int], special_ids: Iterable[int], user_defined_ids: Iterable[int],
                 unk_id: int | None, add_space_prefix: bool, bos_id: int | None, eos_id: int | None) -> None:
        """`vocab`: text -> id (the first id of a text listed twice); `mergeable[i]`: whether token i may be what
        a merge makes (the normal tokens); `byte_ids`: the `<0xNN>` tokens; `bos_id`/`eos_id`: what
        add_special_tokens=True puts around an encoding (None: nothing)."""
        self._tokens = tokens
        self._ids = vocab
        self._scores = array.array("f", scores)
        self._mergeable = mergeable
        self._unk_id = unk_id
        self._add_space_prefix = add_space_prefix
        self._bos_id, self._eos_id = bos_id, eos_id
        self._special_ids = frozenset(special_ids)
        self._added = {tokens[i]: i for i in (*self._special_ids, *user_defined_ids) if tokens[i]}
        self._split_all = _longest_match_pattern(self._added)
        self._split_plain = _longest_match_pattern(t for t, i in self._added.items() if i not in self._special_ids)
        self._byte_values = {i: byte_token_value(tokens[i]) for i in byte_ids}
        by_value = {value: i for i, value in self._byte_values.items()}
        self._byte_ids = [by_value[v] for v in range(256)] if len(by_value) == 256 else None
        self.encode_special_tokens = False

    def special_tokens_as_text(self) -> SentencePieceTokenizer:
        """A copy (sharing every table) that reads special-token text as text."""
        return self._copy(encode_special_tokens=True)

    def without_space_prefix(self) -> SentencePieceTokenizer:
        """A copy (sharing every table) that prepends no `▁`: for text that continues other text."""
        return self._copy(_add_space_prefix=False)

    def _copy(self, **changes) -> SentencePieceTokenizer:
        copy = object.__new__(SentencePieceTokenizer)
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    # ---- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> SpmEncoding:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        if add_special_tokens and self._bos_id is not None:
            ids.append(self._bos_id)
            offsets.append((0, 0))
        split = self._split_plain if self.encode_special_tokens else self._split_all
        position = 0
        for match in split.finditer(text) if split is not None else ():
            if match.start() > position:
                self._encode_piece(text, position, match.start(), ids, offsets)
            ids.append(self._added[match.group()])
            offsets.append(match.span())
            position = match.end()
        if position < len(text):
            self._encode_piece(text, position, len(text), ids, offsets)
        if add_special_tokens and self._eos_id is not None:
            ids.append(self._eos_id)
            offsets.append((0, 0))
        return SpmEncoding(ids, [self._tokens[i] for i in ids], offsets)

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[SpmEncoding]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def _encode_piece(self, text: str, start: int, stop: int, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        """The tokens of `text[start:stop]` (no added token in it), with their spans in `text`."""
        prefix = int(self._add_space_prefix)
        chars = (SPACE if prefix else "") + text[start:stop].replace(" ", SPACE)
        lengths = self._merge(chars)
        vocab, unk = self._ids, self._unk_id
        fused_unk = False  # the last id appended here is an unk that a following one joins
        begin = 0
        while begin < len(chars):
            end = begin + lengths[begin]
            span = (start + max(begin - prefix, 0), start + end - prefix)
            piece = chars[begin:end]
            token_id = vocab.get(piece)
            if token_id is None and self._byte_ids is not None:  # byte fallback: a token per UTF-8 byte
                for value in piece.encode("utf-8"):
                    ids.append(self._byte_ids[value])
                    offsets.append(span)
            elif token_id is None and fused_unk:
                offsets[-1] = (offsets[-1][0], span[1])
            elif token_id is not None or unk is not None:
                ids.append(unk if token_id is None else token_id)
                offsets.append(span)
            fused_unk = token_id is None and unk is not None and self._byte_ids is None
            begin = end

    def _merge(self, chars: str) -> list[int]:
        """llama.cpp's SPM merge loop: symbol `i` (a run of characters starting at character i) has length
        `lengths[i]` (0 once merged into its left neighbour); returns the lengths when no pair is left. (The pair
        lookup is written out three times: a helper function called per pair made encoding 3x slower.)"""
        count = len(chars)
        lengths = [1] * count
        before = list(range(-1, count - 1))
        vocab, scores, mergeable = self._ids, self._scores, self._mergeable
        queue = []   # (-score, left, right, merged length): the best score first, then the leftmost
        for i in range(count - 1):
            token_id = vocab.get(chars[i:i + 2])
            if token_id is not None and mergeable[token_id]:
                queue.append((-scores[token_id], i, i + 1, 2))
        heapq.heapify(queue)
        pop, push = heapq.heappop, heapq.heappush
        while queue:
            _, left, right, size = pop(queue)
            left_size, right_size = lengths[left], lengths[right]
            if not left_size or not right_size or left_size + right_size != size:
                continue  # a side merged since this pair was queued
            lengths[left], lengths[right] = size, 0
            following = right + right_size
            if following < count:
                before[following] = left
                joined = size + lengths[following]
                token_id = vocab.get(chars[left:left + joined])
                if token_id is not None and mergeable[token_id]:
                    push(queue, (-scores[token_id], left, following, joined))
            previous = before[left]
            if previous >= 0:
                joined = lengths[previous] + size
                token_id = vocab.get(chars[previous:previous + joined])
                if token_id is not None and mergeable[token_id]:
                    push(queue, (-scores[token_id], previous, left, joined))
        return lengths

    # ---- decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        pending = bytearray()  # a run of byte tokens
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < len(self._tokens) or (skip_special_tokens and token_id in self._special_ids):
                continue
            value = self._byte_values.get(token_id)
            if value is not None:
                pending.append(value)
                continue
            if pending:
                parts.append(_utf8_or_replacement(pending))
                pending.clear()
            parts.append(self._tokens[token_id].replace(SPACE, " "))
        if pending:
            parts.append(_utf8_or_replacement(pending))
        text = "".join(parts)
        return text[1:] if self._add_space_prefix and text.startswith(" ") else text

    def decode_batch(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    # ---- the vocabulary

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokens[token_id] if 0 <= token_id < len(self._tokens) else None

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self._ids)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._tokens)

    def token_bytes(self) -> list[bytes]:
        """The bytes each token stands for in generated text (a byte token its byte, `▁` a space; no prefix
        stripped), by id."""
        return [bytes([self._byte_values[i]]) if i in self._byte_values else token.replace(SPACE, " ").encode()
                for i, token in enumerate(self._tokens)]

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return {i: AddedToken(token, special=i in self._special_ids, normalized=False)
                for token, i in sorted(self._added.items(), key=lambda item: item[1])}


def _utf8_or_replacement(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return REPLACEMENT_CHAR * len(data)
