"""Corrupted copies of a GGUF model (issue 12 item 12): every one is a ValueError naming the file and the field
or tensor, raised when the file is opened (NaN and infinite weights: as its tensors are read); none loads
silently, divides by zero or allocates for what the file does not hold. The copies are byte-patched, as a
damaged download would be."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from mistralrs import ModelDType, Which
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.formats.gguf_metadata import read_gguf_header
from tests.loading import load_which
from tests.loader.gguf_fixtures import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval(), config


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    """A tiny llama GGUF (hidden 64, 4 heads, 2 KV heads, 2 layers, 320 tokens): Q8_0 matrices, F32 norms."""
    model, config = _tiny_llama()
    return Path(write_tiny_gguf(model, config, tmp_path_factory.mktemp("intact") / "tiny.gguf",
                                ggml_type="Q8_0")[0])


def _value_at(data: bytes, key: str) -> int:
    """Byte position of metadata `key`'s value (after its type tag)."""
    encoded = key.encode()
    return data.index(len(encoded).to_bytes(8, "little") + encoded) + 8 + len(encoded) + 4


def _corrupt_copy(intact: Path, tmp_path: Path, position: int, new: bytes) -> str:
    data = intact.read_bytes()
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(data[:position] + new + data[position + len(new):])
    return str(path)


_U32, _F32 = struct.Struct("<I").pack, struct.Struct("<f").pack
METADATA_CASES = [  # (key, its new value's bytes, the error after the file name)
    ("llama.block_count", _U32(1_000_000), r"llama\.block_count = 1000000, but the tensors hold 2 layers"),
    ("llama.block_count", _U32(1), r"llama\.block_count = 1, but the tensors hold 2 layers"),
    ("llama.embedding_length", _U32(0), r"llama\.embedding_length = 0 must be a positive integer"),
    ("llama.embedding_length", _U32(128), r"llama\.embedding_length = 128, but the token embedding is 64 wide"),
    ("llama.attention.head_count", _U32(0), r"llama\.attention\.head_count = 0 must be a positive integer"),
    ("llama.attention.head_count", _U32(1000), r"llama\.attention\.head_count = 1000 leaves no features per head"),
    ("llama.attention.head_count", _U32(8), r"llama\.attention\.head_count = 8 and llama\.attention\.head_count_kv "
                                            r"= 2 with 8 features per head give k_proj 16 rows, but its tensor has 32"),
    ("llama.attention.head_count_kv", _U32(4), r"llama\.attention\.head_count_kv = 4 with 16 features per head give "
                                               r"k_proj 64 rows, but its tensor has 32"),
    ("llama.rope.freq_base", _F32(0.0), r"llama\.rope\.freq_base = 0\.0 must be a positive finite number"),
    ("llama.rope.freq_base", _F32(math.nan), r"llama\.rope\.freq_base = nan must be a positive finite number"),
    ("llama.attention.layer_norm_rms_epsilon", _F32(-1.0), r"llama\.attention\.layer_norm_rms_epsilon = -1\.0 must "
                                                            r"be a positive finite number"),
    ("tokenizer.ggml.bos_token_id", _U32(100_000), r"tokenizer\.ggml\.bos_token_id = 100000 is not a token id of "
                                                   r"the model's vocabulary of 320 tokens"),
    ("tokenizer.ggml.eos_token_id", _U32(320), r"tokenizer\.ggml\.eos_token_id = 320 is not a token id of the "
                                               r"model's vocabulary of 320 tokens"),
]


@pytest.mark.parametrize(("key", "new", "error"), METADATA_CASES,
                         ids=[f"{key}-{index}" for index, (key, _, _) in enumerate(METADATA_CASES)])
def test_a_corrupt_metadata_value_names_the_file_and_the_key(intact, tmp_path, key, new, error):
    data = intact.read_bytes()
    path = _corrupt_copy(intact, tmp_path, _value_at(data, key), new)
    with pytest.raises(ValueError, match=rf"corrupt\.gguf.*{error}"):
        open_gguf(path)


def test_an_expert_count_the_tensors_do_not_hold_is_named(tmp_path):
    model, config = _tiny_llama()
    path = write_tiny_gguf(model, config, tmp_path / "corrupt.gguf", extra_metadata={"llama.expert_count": 4})[0]
    with pytest.raises(ValueError, match=r"corrupt\.gguf.*llama\.expert_count = 4, but the tensors hold 0 experts"):
        open_gguf(path)


def test_a_file_cut_to_twenty_bytes_is_truncated_not_a_bad_magic(intact, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(intact.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated GGUF file: 20 bytes, less than the 24-byte header"):
        open_gguf(str(path))


def test_an_array_count_beyond_the_file_is_refused_before_allocating(intact, tmp_path):
    data = intact.read_bytes()
    count_at = _value_at(data, "tokenizer.ggml.tokens") + 4  # after the element type
    path = _corrupt_copy(intact, tmp_path, count_at, (2**40).to_bytes(8, "little"))
    with pytest.raises(ValueError, match=r"corrupt\.gguf: truncated or corrupt GGUF metadata at key "
                                         r"'tokenizer\.ggml\.tokens' .*array of 1099511627776 elements"):
        open_gguf(path)


def _tensor(intact: Path, name: str):
    return next(info for info in read_gguf_header(str(intact)).tensors if info.name == name)


@pytest.mark.parametrize(("name", "offset", "new", "where"), [
    ("blk.0.attn_norm.weight", 4 * 5, _F32(math.nan), "F32 value 5"),  # an F32 value
    ("blk.1.ffn_down.weight", 34 * 7, struct.pack("<e", math.inf), "Q8_0 block 7, values 224 to 255"),  # a scale
], ids=["f32-value-nan", "q8_0-scale-inf"])
def test_nan_or_infinite_weights_are_found_on_load(intact, tmp_path, name, offset, new, where):
    info = _tensor(intact, name)
    path = _corrupt_copy(intact, tmp_path, info.offset + offset, new)
    model = open_gguf(path)
    error = rf"tensor '{name}' in '.*corrupt\.gguf' holds NaN or infinite values \(its {where}\)"
    with pytest.raises(ValueError, match=error):
        list(model.iter_weights(dtype=torch.float32, keep_quantized=True))
    with pytest.raises(ValueError, match=error):
        load_which(Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename="corrupt.gguf",
                              dtype=ModelDType.F32), show_progress=False)


def test_the_intact_copy_loads(intact, tmp_path):
    shutil.copy(intact, tmp_path / "copy.gguf")
    model = open_gguf(str(tmp_path / "copy.gguf"))
    assert [name for name, _ in model.iter_weights(dtype=torch.float32, keep_quantized=True)] == \
        list(model.tensor_types)
