"""The two prompt tokenizers of FLUX, padded and truncated to a fixed length as diffusers' pipeline asks for.

CLIP (`tokenizer/`): the original checkpoints ship `vocab.json` + `merges.txt` only, so the byte-level BPE is built
here the way transformers' `CLIPTokenizer` builds it (lower-cased, `</w>` word ends, `<|startoftext|>` ...
`<|endoftext|>` around the text); a `tokenizer.json` is used when present. T5 (`tokenizer_2/`): `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass
class PaddedTokenizer:
    """A tokenizer that turns one prompt into exactly `length` ids (special tokens added, truncated, padded)."""

    tokenizer: Tokenizer  # the `tokenizers` object, truncation and padding enabled
    length: int  # ids per prompt

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"PaddedTokenizer.length must be >= 1, got {self.length}")

    def __call__(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _special(folder: str, name: str, default: str) -> str:
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        value = _token_text(_read_json(os.path.join(folder, file)).get(name))
        if value:
            return value
    return default


def _clip_from_vocab(folder: str) -> Tokenizer:
    """transformers' CLIPTokenizer pipeline over `vocab.json` and `merges.txt`."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()
                  if line.strip() and not line.startswith("#version")]
    unk, bos, eos = (_special(folder, name, default) for name, default in
                     (("unk_token", "<|endoftext|>"), ("bos_token", "<|startoftext|>"),
                      ("eos_token", "<|endoftext|>")))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                            add_prefix_space=False)
    return tokenizer


def _padded(tokenizer: Tokenizer, folder: str, length: int, default_pad: str) -> PaddedTokenizer:
    pad = _special(folder, "pad_token", default_pad)
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"{folder}: the pad token {pad!r} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=pad)
    return PaddedTokenizer(tokenizer, length)


def load_clip_tokenizer(folder: str) -> PaddedTokenizer:
    """CLIP's tokenizer from `folder` (`tokenizer.json`, or `vocab.json` + `merges.txt`), padded to its
    `model_max_length` (77)."""
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        tokenizer = Tokenizer.from_file(tokenizer_json)
    elif os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        tokenizer = _clip_from_vocab(folder)
    else:
        raise ValueError(f"tokenizer: {folder} has neither tokenizer.json nor vocab.json + merges.txt")
    length = int(_read_json(os.path.join(folder, "tokenizer_config.json")).get("model_max_length", 77))
    return _padded(tokenizer, folder, min(length, 77), "<|endoftext|>")


def load_t5_tokenizer(folder: str, length: int) -> PaddedTokenizer:
    """T5's tokenizer from `folder/tokenizer.json`, padded to `length` ids (the pipeline's max_sequence_length)."""
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise ValueError(f"tokenizer_2: {folder} has no tokenizer.json")
    return _padded(Tokenizer.from_file(tokenizer_json), folder, length, "<pad>")
