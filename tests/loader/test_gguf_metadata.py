"""The fast GGUF header reader against `gguf.GGUFReader` (the reference parser) on written and real files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from mistralrs.loader.default_model import default_model_path
from mistralrs.loader.gguf_metadata import read_gguf_header, read_gguf_metadata

V = GGUFValueType
# key → (value, value type, array element type)
ALL_KINDS = {
    "test.u8": (200, V.UINT8, None), "test.i8": (-100, V.INT8, None),
    "test.u16": (60000, V.UINT16, None), "test.i16": (-30000, V.INT16, None),
    "test.u32": (4_000_000_000, V.UINT32, None), "test.i32": (-2_000_000_000, V.INT32, None),
    "test.u64": (2**63 + 5, V.UINT64, None), "test.i64": (-(2**62), V.INT64, None),
    "test.f32": (0.1, V.FLOAT32, None), "test.f64": (0.1, V.FLOAT64, None),
    "test.bool_true": (True, V.BOOL, None), "test.bool_false": (False, V.BOOL, None),
    "test.string": ("héllo ▁ 日本 🦀 \n", V.STRING, None),
    "test.empty_string": ("", V.STRING, None),
    "test.strings": (["a", "", "▁b", "<0x0A>", "🦀", "x y"], V.ARRAY, V.STRING),
    "test.floats": ([0.0, -1.5, 3.25, -1000.0], V.ARRAY, V.FLOAT32),
    "test.i32s": ([1, -2, 3, 6, 4], V.ARRAY, V.INT32),
    "test.u8s": ([0, 255, 7], V.ARRAY, V.UINT8),
    "test.bools": ([True, False, True], V.ARRAY, V.BOOL),
    "test.f64s": ([1e300, -2.5], V.ARRAY, V.FLOAT64),
    "test.nested": ([[1, 2], [3]], V.ARRAY, V.ARRAY),
}


def write_gguf(path, kinds=ALL_KINDS, endianess=GGUFEndian.LITTLE, arch="llama"):
    writer = GGUFWriter(str(path), arch, endianess=endianess)
    for key, (value, vtype, sub_type) in kinds.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    q8 = quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("b.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.bias", np.ones(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def reader_value(field):
    """A field's value as gguf.GGUFReader decodes it (nested arrays by hand: contents() does not nest)."""
    if field.types[:2] == [V.ARRAY, V.ARRAY]:
        return None
    return field.contents()


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_every_value_type_matches_gguf_reader(tmp_path, endianess):
    path = write_gguf(tmp_path / "all.gguf", endianess=endianess)
    header = read_gguf_header(path)
    reference = GGUFReader(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = reader_value(field)
        if expected is not None:
            assert header.metadata[key] == expected, key
    assert header.metadata["test.nested"] == [[1, 2], [3]]
    assert header.metadata["test.f32"] == pytest.approx(0.1, rel=1e-7)
    assert header.metadata["test.u64"] == 2**63 + 5
    assert isinstance(header.metadata["test.bools"][0], bool)
    assert isinstance(header.metadata["test.floats"][0], float)
    assert isinstance(header.metadata["test.i32s"][0], int)
    assert header.metadata["general.architecture"] == "llama"


def test_tensor_table_matches_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "t.gguf")
    header = read_gguf_header(path)
    reference = GGUFReader(path)
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    for ours, ref in zip(header.tensors, reference.tensors):
        assert ours.shape == tuple(int(d) for d in reversed(ref.shape))
        assert ours.ggml_type == int(ref.tensor_type)
        assert ours.offset == int(ref.data_offset)
        assert ours.nbytes == int(ref.n_bytes)
    assert header.tensors[0].shape == (3, 4)
    raw = np.fromfile(path, dtype=np.uint8)
    first = header.tensors[0]
    data = raw[first.offset:first.offset + first.nbytes].view(np.float32)
    np.testing.assert_array_equal(data, np.arange(12, dtype=np.float32))


def test_multi_file_metadata_first_file_wins(tmp_path):
    first = write_gguf(tmp_path / "a.gguf", {"x.shared": ("first", V.STRING, None), "x.only_a": (1, V.UINT32, None)})
    second = write_gguf(tmp_path / "b.gguf", {"x.shared": ("second", V.STRING, None), "x.only_b": (2, V.UINT32, None)},
                        arch="qwen2")
    merged = read_gguf_metadata([first, second])
    assert merged["x.shared"] == "first"
    assert merged["x.only_a"] == 1 and merged["x.only_b"] == 2
    assert merged["general.architecture"] == "llama"
    assert read_gguf_metadata(second)["x.shared"] == "second"


def test_bad_inputs_are_value_errors(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(str(not_gguf))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        read_gguf_metadata(str(empty))
    with pytest.raises(ValueError, match="paths is empty"):
        read_gguf_metadata([])
    path = write_gguf(tmp_path / "full.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tmp_path / "full.gguf").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(str(truncated))


def test_real_smollm2_tokenizer_fields_match_gguf_reader():
    path = str(default_model_path())
    metadata = read_gguf_metadata(path)
    reference = GGUFReader(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "llama.rope.freq_base"):
        assert metadata[key] == reference.fields[key].contents(), key
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
