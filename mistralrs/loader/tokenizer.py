"""Tokenizers: from `tokenizer.json`, or built from a GGUF file's `tokenizer.ggml.*` metadata (REFERENCE §7).

A GGUF vocabulary is rebuilt the way llama.cpp reads it, so ids match llama.cpp (and Hugging Face):

- `gpt2` (byte-level BPE): the vocabulary and merges as stored, a byte-level pre-tokenizer whose split regex
  is the one llama.cpp uses for `tokenizer.ggml.pre` (gpt2, smollm, llama-bpe, qwen2, ...), and a byte-level
  decoder.
- `llama` (SentencePiece): llama.cpp's SPM tokenizer, which repeatedly merges the adjacent pair whose
  concatenation is the best-scoring vocabulary entry, run as it is (`spm_tokenizer.SentencePieceTokenizer`, with
  the part of the `tokenizers.Tokenizer` interface the engine uses): byte fallback (`<0xNN>` tokens), `▁` for
  spaces, a `▁` prepended only when `tokenizer.ggml.add_space_prefix` says so (Gemma says no, and its whitespace
  runs are user-defined tokens matched whole, as llama.cpp does).

In both, CONTROL tokens become special added tokens and USER_DEFINED tokens plain added tokens, so they are
never split; BOS/EOS are added per `add_bos_token`/`add_eos_token` (a template post-processor for `gpt2`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mistralrs.loader.chat_template import read_chat_template_arg, read_jinja_file, select_named_templates
from mistralrs.loader.spm_tokenizer import SentencePieceTokenizer, byte_token_value

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SUPPORTED_GGUF_TOKENIZER_MODELS = ("gpt2", "llama", "replit")

# Tokens that end a turn in common chat formats; each one in the vocabulary joins the EOS set (REFERENCE §8.4).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")

# Pre-tokenizer split regexes, as llama.cpp applies them for each `tokenizer.ggml.pre` (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one family of byte-level BPE vocabularies."""

    splits: tuple[str, ...]        # regexes applied in turn; each splits the pieces of the previous one
    ignore_merges: bool = False    # a piece that is itself a vocabulary entry is kept whole
    add_bos: bool = False          # default for add_bos_token when the metadata does not say


_LLAMA3 = _PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizerSpec((_QWEN2_SPLIT,))
_GPT2 = _PreTokenizerSpec((_GPT2_SPLIT,))
_DIGITS_GPT2 = _PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT))
_DEFAULT = _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), _PreTokenizerSpec((_LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo", "f2llmv2"), _QWEN2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_GPT2),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4", "roberta-bpe"), _GPT2),
    "falcon": _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]")),
    "tekken": _PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), _PreTokenizerSpec((_GPT4O_SPLIT,))),
    "default": _DEFAULT,
    "": _DEFAULT,
}


def _required(metadata: dict, key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata has no {key!r}; it is needed to build the tokenizer "
                         f"(or pass tokenizer_json / tok_model_id)")
    return metadata[key]


def _token_at(tokens: list[str], metadata: dict, key: str) -> str | None:
    """The token string whose id the metadata stores under `key`, or None when absent or out of range."""
    token_id = metadata.get(key)
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        logger.warning("GGUF %s = %s is outside the vocabulary of %d tokens; ignored", key, token_id, len(tokens))
        return None
    return tokens[int(token_id)]


def _token_types(metadata: dict, tokens: list[str]) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:  # old files: byte tokens by their spelling, everything else normal
        return [TOKEN_TYPE_NORMAL if byte_token_value(t) is None else TOKEN_TYPE_BYTE for t in tokens]
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries but tokenizer.ggml.tokens has "
                         f"{len(tokens)}")
    return [int(t) for t in types]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            logger.warning("GGUF vocabulary lists %r twice (ids %d and %d); the first id is used",
                           token, vocab[token], index)
    return vocab


def _added_token_ids(tokens: list[str], types: list[int], metadata: dict) -> tuple[list[int], list[int]]:
    """(special, user-defined) ids: CONTROL tokens and bos/eos/unk are special, USER_DEFINED ones plain."""
    special_ids = {int(metadata[key]) for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                  "tokenizer.ggml.unknown_token_id")
                   if key in metadata and 0 <= int(metadata[key]) < len(tokens)}
    special = [i for i, kind in enumerate(types) if kind == TOKEN_TYPE_CONTROL or i in special_ids]
    user_defined = [i for i, kind in enumerate(types) if kind == TOKEN_TYPE_USER_DEFINED and i not in special_ids]
    return special, user_defined


def _add_gguf_added_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], metadata: dict) -> None:
    special, user_defined = _added_token_ids(tokens, types, metadata)
    if special:
        tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    if user_defined:
        tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])


def _ends(tokens: list[str], metadata: dict, add_bos: bool, add_eos: bool) -> dict[str, tuple[str, int]]:
    """The "bos"/"eos" tokens (text, id) an encoding with special tokens gets, each only when asked for."""
    ends = {}
    for name, wanted in (("bos", add_bos), ("eos", add_eos)):
        token = _token_at(tokens, metadata, f"tokenizer.ggml.{name}_token_id") if wanted else None
        if token is not None:
            ends[name] = (token, int(metadata[f"tokenizer.ggml.{name}_token_id"]))
    return ends


def _template_processor(ends: dict[str, tuple[str, int]]) -> processors.TemplateProcessing | None:
    """`<bos> $A <eos>` with the ends of `_ends`; None when there are none."""
    if not ends:
        return None

    def sequence(piece: str, type_id: int) -> str:
        bos = f"{ends['bos'][0]}:{type_id} " if "bos" in ends else ""
        eos = f" {ends['eos'][0]}:{type_id}" if "eos" in ends else ""
        return f"{bos}{piece}:{type_id}{eos}"

    return processors.TemplateProcessing(single=sequence("$A", 0), pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
                                         special_tokens=list(dict.fromkeys(ends.values())))


def _byte_level_bpe(metadata: dict, tokens: list[str]) -> tuple[Tokenizer, bool]:
    """`tokenizer.ggml.model == "gpt2"`; returns the tokenizer and the default for add_bos_token."""
    merges_raw = _required(metadata, "tokenizer.ggml.merges")
    merges = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not two tokens separated by a space")
        merges.append((left, right))
    pre_name = str(metadata.get("tokenizer.ggml.pre", "default"))
    spec = _PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        logger.warning("GGUF tokenizer.ggml.pre %r is not known; splitting text with the GPT-2 regex (known: %s)",
                       pre_name, ", ".join(sorted(k for k in _PRE_TOKENIZERS if k)))
        spec = _GPT2
    try:
        model = models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=spec.ignore_merges)
    except Exception as e:  # tokenizers raises its own exception type for a merge outside the vocabulary
        raise ValueError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from e
    tokenizer = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.splits]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spec.add_bos


def _sentencepiece(metadata: dict, tokens: list[str], types: list[int]) -> SentencePieceTokenizer:
    """`tokenizer.ggml.model == "llama"`: SentencePiece as llama.cpp runs it (add_bos_token defaults to true)."""
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:  # no scores: earlier tokens are better, as in a trained SentencePiece BPE
        scores = [-float(i) for i in range(len(tokens))]
    elif len(scores) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries but tokenizer.ggml.tokens has "
                         f"{len(tokens)}")
    unk = _token_at(tokens, metadata, "tokenizer.ggml.unknown_token_id")
    if unk is None and "<unk>" in tokens:
        unk = "<unk>"
    vocab = _vocab(tokens)
    special, user_defined = _added_token_ids(tokens, types, metadata)
    ends = _ends(tokens, metadata, bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
                 bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    byte_ids = [i for i, kind in enumerate(types)
                if kind == TOKEN_TYPE_BYTE and byte_token_value(tokens[i]) is not None]
    return SentencePieceTokenizer(
        tokens, scores, vocab=vocab, mergeable=bytes(kind == TOKEN_TYPE_NORMAL for kind in types), byte_ids=byte_ids,
        special_ids=special, user_defined_ids=user_defined,
        unk_id=None if unk is None else vocab[unk],
        add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
        bos_id=ends["bos"][1] if "bos" in ends else None, eos_id=ends["eos"][1] if "eos" in ends else None)


def tokenizer_from_gguf_metadata(metadata: dict) -> Tokenizer | SentencePieceTokenizer:
    """Build the tokenizer a GGUF file describes (`tokenizer.ggml.model` "gpt2", "llama" or "replit")."""
    kind = _required(metadata, "tokenizer.ggml.model")
    tokens = _required(metadata, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF tokenizer.ggml.tokens is empty")
    types = _token_types(metadata, tokens)
    if kind in ("llama", "replit"):
        return _sentencepiece(metadata, tokens, types)
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_GGUF_TOKENIZER_MODELS)})")
    tokenizer, add_bos_default = _byte_level_bpe(metadata, tokens)
    _add_gguf_added_tokens(tokenizer, tokens, types, metadata)
    ends = _ends(tokens, metadata, bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                 bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    template = _template_processor(ends)
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tokenizer.post_processor = byte_level if template is None else processors.Sequence([byte_level, template])
    return tokenizer


@dataclass
class TokenizerBundle:
    """A loaded tokenizer with the special tokens, stop tokens and chat template that go with it."""

    tokenizer: Tokenizer                   # the fast tokenizer (encode/decode)
    bos_token: str | None                  # beginning-of-sequence token string, if the model has one
    eos_token: str | None                  # end-of-sequence token string, if the model has one
    unk_token: str | None                  # unknown token string, if the model has one
    eos_token_ids: set[int]                # every id that ends generation (REFERENCE §8.4)
    chat_template: str | None              # the Jinja chat template (REFERENCE §8.8); None: completion only
    add_bos_token: bool                    # whether encoding with add_special_tokens=True puts BOS in front
    tool_chat_template: str | None = None  # the "tool_use" entry of a named-template list, for requests with tools


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _gguf_special_tokens(metadata: dict | None) -> dict[str, str | None]:
    if not metadata or "tokenizer.ggml.tokens" not in metadata:
        return {}
    tokens = metadata["tokenizer.ggml.tokens"]
    return {"bos_token": _token_at(tokens, metadata, "tokenizer.ggml.bos_token_id"),
            "eos_token": _token_at(tokens, metadata, "tokenizer.ggml.eos_token_id"),
            "unk_token": _token_at(tokens, metadata, "tokenizer.ggml.unknown_token_id")}


def _load_tokenizer(tokenizer_json: str | None, gguf_metadata: dict | None) -> Tokenizer:
    if tokenizer_json is not None:
        if not os.path.isfile(tokenizer_json):
            raise ValueError(f"tokenizer_json: file not found: {tokenizer_json!r}")
        return Tokenizer.from_file(tokenizer_json)
    if gguf_metadata and "tokenizer.ggml.model" in gguf_metadata:
        return tokenizer_from_gguf_metadata(gguf_metadata)
    raise ValueError("No tokenizer: tokenizer_json is not set and there is no GGUF metadata with tokenizer.ggml.* "
                     "keys; pass tokenizer_json, a tok_model_id whose repo has tokenizer.json, or a GGUF file "
                     "with an embedded tokenizer")


def _eos_token_ids(tokenizer: Tokenizer, eos_token: str | None, generation_config: dict | None,
                   gguf_metadata: dict | None) -> set[int]:
    """The EOS set: eos_token, end-of-turn tokens in the vocabulary, generation_config and GGUF eos/eot/eom ids."""
    ids: set[int] = set()
    for token in (eos_token, *END_OF_TURN_TOKENS):
        token_id = tokenizer.token_to_id(token) if token else None
        if token_id is not None:
            ids.add(token_id)
    configured = (generation_config or {}).get("eos_token_id")
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list) else [configured]))
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if gguf_metadata and gguf_metadata.get(key) is not None:
            ids.add(int(gguf_metadata[key]))
    return ids


def _adds_bos(tokenizer: Tokenizer, bos_token: str | None) -> bool:
    bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
    return bos_id is not None and tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def _resolve_templates(tokenizer_config: dict, arg_template: str | list | None, jinja_explicit: str | None,
                       repo_chat_template: str | None, gguf_metadata: dict | None) -> dict[str, str]:
    """Named templates from the first source that has one: jinja_explicit, the chat_template argument,
    tokenizer_config.json, the repo's chat_template file, the GGUF `tokenizer.chat_template`."""
    if jinja_explicit is not None:
        return {"default": read_jinja_file(jinja_explicit)}
    sources = [(arg_template, "chat_template"), (tokenizer_config.get("chat_template"), "tokenizer_config.json"),
               (repo_chat_template, "repo chat_template"),
               ((gguf_metadata or {}).get("tokenizer.chat_template"), "GGUF tokenizer.chat_template")]
    for value, field in sources:
        named = select_named_templates(value or None, field)
        if named:
            return named
    return {}


def load_tokenizer_bundle(*, tokenizer_json: str | None, tokenizer_config: dict | None,
                          generation_config: dict | None, gguf_metadata: dict | None,
                          chat_template_arg: str | None, jinja_explicit: str | None,
                          repo_chat_template: str | None) -> TokenizerBundle:
    """Load the tokenizer (tokenizer_json wins over GGUF metadata) and resolve its special tokens and template.

    `chat_template_arg` is a JSON file `{"chat_template": ..., "bos_token"?: ...}`, a `.jinja` file or a literal
    template; like the reference it takes the place of tokenizer_config.json as the template source, and its
    bos/eos/unk tokens win. `jinja_explicit` (a `.jinja` file) overrides every other template source.
    """
    tokenizer = _load_tokenizer(tokenizer_json, gguf_metadata)
    config = tokenizer_config or {}
    arg_template, arg_config = read_chat_template_arg(chat_template_arg) if chat_template_arg else (None, {})
    gguf_tokens = _gguf_special_tokens(gguf_metadata)
    special: dict[str, str | None] = {}
    for name in ("bos_token", "eos_token", "unk_token"):
        special[name] = (_token_string(arg_config.get(name)) or _token_string(config.get(name))
                         or gguf_tokens.get(name))
    named = _resolve_templates(config, arg_template, jinja_explicit, repo_chat_template, gguf_metadata)
    if named and "default" not in named:
        logger.warning("chat_template list has no \"default\" entry; using %r", next(iter(named)))
    chat_template = named.get("default", next(iter(named.values()), None))
    return TokenizerBundle(
        tokenizer=tokenizer, bos_token=special["bos_token"], eos_token=special["eos_token"],
        unk_token=special["unk_token"],
        eos_token_ids=_eos_token_ids(tokenizer, special["eos_token"], generation_config, gguf_metadata),
        chat_template=chat_template, add_bos_token=_adds_bos(tokenizer, special["bos_token"]),
        tool_chat_template=named.get("tool_use"))
