"""The fast GGUF header reader against `gguf.GGUFReader` (the reference parser) on written and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from mistralrs.loader.default_model import default_model_path
from mistralrs.formats.gguf_metadata import read_gguf_header, read_gguf_metadata

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
    write_gguf(tmp_path / "full.gguf")
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


# ---------------------------------------------------------------------------------------------------------
# Truncated and corrupted files: always a ValueError naming the file (and the tensor), never another exception.

def _tensor_type_position(data: bytes, name: str) -> int:
    """Byte position of tensor `name`'s ggml type id in the tensor table."""
    encoded = name.encode()
    start = data.index(len(encoded).to_bytes(8, "little") + encoded) + 8 + len(encoded)
    num_dims = int.from_bytes(data[start:start + 4], "little")
    return start + 4 + 8 * num_dims


def _patched(tmp_path, name: str, data: bytes, position: int, new: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data[:position] + new + data[position + len(new):])
    return str(path)


def test_truncated_tensor_data_names_the_file_and_the_tensor(tmp_path):
    data = Path(write_gguf(tmp_path / "full.gguf")).read_bytes()
    last = read_gguf_header(str(tmp_path / "full.gguf")).tensors[-1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:last.offset + last.nbytes - 1])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated GGUF file: tensor 'c\.bias' needs bytes up to"):
        read_gguf_header(str(cut))


def test_every_truncation_is_a_value_error(tmp_path):
    data = Path(write_gguf(tmp_path / "full.gguf")).read_bytes()
    last = read_gguf_header(str(tmp_path / "full.gguf")).tensors[-1]
    path = tmp_path / "cut.gguf"  # only the padding after the last tensor may go
    for size in list(range(0, 600, 5)) + list(range(600, last.offset + last.nbytes, 23)):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="cut.gguf"):
            read_gguf_header(str(path))


def test_corrupt_headers_are_value_errors_naming_the_file(tmp_path):
    data = Path(write_gguf(tmp_path / "full.gguf")).read_bytes()
    with pytest.raises(ValueError, match=r"magic\.gguf: not a GGUF file \(bad magic b'GGUX'"):
        read_gguf_header(_patched(tmp_path, "magic.gguf", data, 0, b"GGUX"))
    with pytest.raises(ValueError, match=r"version\.gguf: GGUF version 7 is not supported"):
        read_gguf_header(_patched(tmp_path, "version.gguf", data, 4, (7).to_bytes(4, "little")))
    with pytest.raises(ValueError, match=r"counts\.gguf: truncated or corrupt GGUF header: .* cannot fit"):
        read_gguf_header(_patched(tmp_path, "counts.gguf", data, 8, (2**40).to_bytes(8, "little")))
    type_at = _tensor_type_position(data, "b.weight")
    with pytest.raises(ValueError, match=r"type\.gguf: tensor 'b\.weight' has unknown ggml type id 99"):
        read_gguf_header(_patched(tmp_path, "type.gguf", data, type_at, (99).to_bytes(4, "little")))
    with pytest.raises(ValueError, match=r"f32\.gguf: .*'b\.weight'"):  # Q8_0 relabelled F32: 4x the bytes
        read_gguf_header(_patched(tmp_path, "f32.gguf", data, type_at, (0).to_bytes(4, "little")))
    with pytest.raises(ValueError, match=r"offset\.gguf: tensor 'b\.weight' starts at data offset 3"):
        read_gguf_header(_patched(tmp_path, "offset.gguf", data, type_at + 4, (3).to_bytes(8, "little")))
    with pytest.raises(ValueError, match=r"overlap\.gguf: tensors 'a\.weight' and 'b\.weight' overlap"):
        read_gguf_header(_patched(tmp_path, "overlap.gguf", data, type_at + 4, (0).to_bytes(8, "little")))
    dims_at = data.index(b"a.weight") + len("a.weight")
    with pytest.raises(ValueError, match=r"dims\.gguf: .*tensor 'a\.weight' \(9 dimensions"):
        read_gguf_header(_patched(tmp_path, "dims.gguf", data, dims_at, (9).to_bytes(4, "little")))


def test_bad_alignment_is_a_value_error(tmp_path):
    path = write_gguf(tmp_path / "align.gguf", {"general.alignment": (0, V.UINT32, None)})
    with pytest.raises(ValueError, match=r"align\.gguf: general\.alignment must be a positive power of two, got 0"):
        read_gguf_header(path)


def test_random_byte_corruption_never_escapes_as_another_exception(tmp_path):
    data = bytearray(Path(write_gguf(tmp_path / "full.gguf")).read_bytes())
    header_size = read_gguf_header(str(tmp_path / "full.gguf")).data_offset
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    for _ in range(300):
        corrupt = bytearray(data)
        for position in rng.integers(8, header_size, size=rng.integers(1, 4)):
            corrupt[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(corrupt))
        try:
            read_gguf_header(str(path))
        except ValueError as e:
            assert "fuzz.gguf" in str(e)


def test_loading_a_truncated_model_names_the_tensor(tmp_path):
    from mistralrs.loader.gguf_loader import open_gguf

    source = default_model_path()
    header = read_gguf_header(str(source))
    last = max(header.tensors, key=lambda t: t.offset)
    cut = tmp_path / "smollm2-cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(last.offset + last.nbytes // 2))
    with pytest.raises(ValueError, match=rf"smollm2-cut\.gguf.*tensor '{last.name}'"):
        open_gguf(str(cut))
