"""Legacy GGML (GGJT v3) files: a tiny llama written here by a writer that follows the format (not the loader),
loaded with `open_ggml` and through `Which.GGML`, gives the logits of its safetensors twin."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mistralrs.loader.ggml_loader import open_ggml, read_ggml_file
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.gguf_linear import GGUFQuantConfig
from tests.loader.ggml_fixtures import N_MULT, write_ggjt
from tests.models import family_harness as harness

TINY = dict(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False)
GQA = 2  # 4 heads / 2 KV heads
PROMPT = harness.prompt(4, 20)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory with the HF checkpoint, config.json dict, checkpoint tensors, twin logits)."""
    path = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    harness.sharpen(hf, seed=1)
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    checkpoint = dict(iter_safetensors(sorted(glob.glob(os.path.join(path, "*.safetensors"))), None))
    twin = load_model(config, checkpoint.items(), dtype=torch.float32, device="cpu")
    (logits,) = harness.TinyRunner(twin).step([(0, PROMPT)])
    return path, config, checkpoint, logits


def _q8_0_round_trip(checkpoint: dict) -> dict:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    out = {}
    for name, tensor in checkpoint.items():
        values = tensor.float().numpy()
        if values.ndim == 2:
            values = dequantize(quantize(values, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out


@pytest.mark.parametrize("type_name", ["F32", "Q8_0"])
def test_ggjt_matches_safetensors_twin(tiny, tmp_path, type_name):
    _, config, checkpoint, expected = tiny
    ggml = open_ggml(write_ggjt(tmp_path / "tiny.bin", checkpoint, config, type_name), gqa=GQA)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert ggml.config[key] == config[key], key
    assert (ggml.config["rope_theta"], ggml.config["rms_norm_eps"]) == (10000.0, 1e-5)
    assert ggml.tensor_types["model.layers.1.self_attn.k_proj.weight"] == type_name
    model = load_model(ggml.config, ggml.iter_weights(torch.float32, keep_quantized=True), dtype=torch.float32,
                       device="cpu", quant_config=GGUFQuantConfig(use_fast_kernels=False))
    if type_name == "Q8_0":
        rounded = load_model(config, _q8_0_round_trip(checkpoint).items(), dtype=torch.float32, device="cpu")
        (expected,) = harness.TinyRunner(rounded).step([(0, PROMPT)])
    (logits,) = harness.TinyRunner(model).step([(0, PROMPT)])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_header_and_vocabulary_are_read(tiny, tmp_path):
    _, config, checkpoint, _ = tiny
    ggml = read_ggml_file(write_ggjt(tmp_path / "tiny.bin", checkpoint, config, "F16"))
    assert (ggml.format, ggml.version) == ("ggjt", 3)
    assert (ggml.hparams.n_vocab, ggml.hparams.n_mult, ggml.hparams.n_rot) == (harness.VOCAB_SIZE, N_MULT, 16)
    assert ggml.tokens[5] == b"<t5>" and ggml.scores[5] == -5.0
    assert all(info.offset % 32 == 0 for info in ggml.tensors)
    embed = next(info for info in ggml.tensors if info.name == "tok_embeddings.weight")
    assert embed.shape == (harness.VOCAB_SIZE, 64) and embed.nbytes == harness.VOCAB_SIZE * 64 * 2


def test_which_ggml_loads_with_the_tokenizer_of_tok_model_id(tiny, tmp_path):
    from mistralrs import ModelDType, Which
    from tests.loading import load_which
    from tests.tiny_models import char_tokenizer

    _, config, checkpoint, expected = tiny
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    char_tokenizer().save(str(tok_dir / "tokenizer.json"))
    write_ggjt(tmp_path / "tiny.bin", checkpoint, config)
    loaded = load_which(Which.GGML(quantized_model_id=str(tmp_path), quantized_filename="tiny.bin",
                                      tok_model_id=str(tok_dir), gqa=GQA, dtype=ModelDType.F32),
                           show_progress=False, device=torch.device("cpu"))
    assert loaded.max_model_len == 4096 and loaded.tokenizer is not None
    (logits,) = harness.TinyRunner(loaded.model).step([(0, PROMPT)])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_without_a_tokenizer_source_the_runner_raises_a_value_error(tiny, tmp_path):
    """As the seed, `Which.GGML(quantized_model_id, quantized_filename)` constructs; the load names what is missing."""
    from mistralrs import Runner, Which

    _, config, checkpoint, _ = tiny
    write_ggjt(tmp_path / "tiny.bin", checkpoint, config)
    with pytest.raises(ValueError, match="Which.GGML: tok_model_id or tokenizer_json is required"):
        Runner(Which.GGML(str(tmp_path), "tiny.bin"), show_progress=False)


def test_a_tokenizer_json_alone_is_a_tokenizer_source(tiny, tmp_path):
    from mistralrs import ModelDType, Which
    from tests.loading import load_which
    from tests.tiny_models import char_tokenizer

    _, config, checkpoint, _ = tiny
    write_ggjt(tmp_path / "tiny.bin", checkpoint, config)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loaded = load_which(Which.GGML(str(tmp_path), "tiny.bin", tokenizer_json=str(tmp_path / "tokenizer.json"),
                                   gqa=GQA, dtype=ModelDType.F32), show_progress=False)
    assert loaded.tokenizer.tokenizer.encode("ab", add_special_tokens=False).ids == \
        char_tokenizer().encode("ab", add_special_tokens=False).ids


def test_wrong_gqa_is_a_value_error(tiny, tmp_path):
    _, config, checkpoint, _ = tiny
    path = write_ggjt(tmp_path / "tiny.bin", checkpoint, config)
    with pytest.raises(ValueError, match=r"n_head / gqa = 4 "):
        open_ggml(path, gqa=None)  # None (Which's default) means 1: 4 KV heads, where the file has 2
    with pytest.raises(ValueError, match="gqa"):
        open_ggml(path, gqa=3)
    with pytest.raises(ValueError, match=r"tiny\.bin.*n_head / gqa = 4 .* k_proj 64 rows, but its tensor has 32"):
        open_ggml(path, gqa=1)  # gqa=1 gives 4 KV heads, the file has 2: found before a model is built


def test_bad_magic_and_truncated_files_name_the_file(tiny, tmp_path):
    _, config, checkpoint, _ = tiny
    bad = write_ggjt(tmp_path / "bad.bin", checkpoint, config, magic=0x46554747)  # "GGUF"
    with pytest.raises(ValueError, match=r"bad\.bin.*not a GGML file"):
        open_ggml(bad)
    good = write_ggjt(tmp_path / "good.bin", checkpoint, config)
    with open(good, "rb") as f:
        data = f.read()
    for keep in (6, 100, len(data) - 10):  # in the version, the vocabulary, the last tensor's data
        cut = tmp_path / f"cut{keep}.bin"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"cut{keep}\.bin.*truncated"):
            open_ggml(str(cut))
    with pytest.raises(ValueError, match="does not exist"):
        open_ggml(str(tmp_path / "missing.bin"))


@pytest.mark.parametrize(("field", "index", "value", "error"), [
    ("n_head", 3, 0, r"n_head = 0 \(corrupt header: it must be positive\)"),
    ("n_mult", 2, 0, r"n_mult = 0 \(corrupt header: it must be positive\)"),
    ("n_layer", 4, 1_000_000, r"n_layer = 1000000, but the tensors hold 2 layers"),
    ("n_embd", 1, 128, r"n_embd = 128, but the token embedding is 64 wide"),
])
def test_corrupt_hyperparameters_name_the_file_and_the_field(tiny, tmp_path, field, index, value, error):
    _, config, checkpoint, _ = tiny
    data = bytearray(Path(write_ggjt(tmp_path / "tiny.bin", checkpoint, config)).read_bytes())
    data[8 + 4 * index:12 + 4 * index] = value.to_bytes(4, "little")  # after the magic and the version
    (tmp_path / "corrupt.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"corrupt\.bin.*{error}"):
        open_ggml(str(tmp_path / "corrupt.bin"), gqa=GQA)


def test_old_versions_accept_only_unquantized_tensors(tiny, tmp_path):
    """ggjt v1/v2 blocks predate today's GGML layouts: F32 files load, quantized ones are refused."""
    _, config, checkpoint, _ = tiny
    assert open_ggml(write_ggjt(tmp_path / "v1.bin", checkpoint, config, version=1), gqa=GQA).tensor_types
    with pytest.raises(ValueError, match=r"Q8_0.*supported types: F32, F16"):
        open_ggml(write_ggjt(tmp_path / "v2.bin", checkpoint, config, "Q8_0", version=2), gqa=GQA)
    with pytest.raises(ValueError, match="version 4"):
        open_ggml(write_ggjt(tmp_path / "v4.bin", checkpoint, config, version=4))
