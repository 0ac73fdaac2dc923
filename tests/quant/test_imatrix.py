"""Importance matrices (REFERENCE §3): .cimatrix and llama.cpp files, their mapping onto layers, their effect on
quantization, and collection from a calibration text (checked against `transformers` activations)."""

from __future__ import annotations

import glob
import json
import struct

import numpy as np
import pytest
import torch
import transformers

from mistralrs import ModelDType, Runner, Which
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.imatrix import (
    calibration_chunks,
    checkpoint_name_of,
    load_imatrix,
    read_cimatrix,
    read_llama_imatrix,
    write_cimatrix,
)
from mistralrs.quant.isq import IsqQuantConfig, isq_layer_names, isq_layer_states
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) on disk: (path, HF model, our dense model)."""
    path = tmp_path_factory.mktemp("imatrix-tiny")
    hf = make_tiny_model_dir(path, "llama")
    config = json.loads((path / "config.json").read_text())
    files = sorted(glob.glob(f"{path}/*.safetensors"))
    return path, hf, load_model(config, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu")


def _legacy_imatrix(path, entries: dict[str, tuple[int, np.ndarray]]) -> None:
    """llama.cpp's legacy binary layout, written here from its description (plus the trailing last-call and
    dataset name llama-imatrix appends)."""
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        encoded = name.encode()
        parts.append(struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
                     + values.astype("<f4").tobytes())
    parts.append(struct.pack("<i", 10) + struct.pack("<i", 8) + b"data.txt")
    path.write_bytes(b"".join(parts))


def test_cimatrix_round_trip_and_byte_layout(tmp_path):
    path = tmp_path / "x.cimatrix"
    write_cimatrix(str(path), {2: None, 0: torch.tensor([1.0, 2.5]), 5: torch.tensor([3.0])})
    data = path.read_bytes()
    assert data[:8] == struct.pack("<Q", 3)
    assert data[8:8 + 17 + 8] == struct.pack("<QBQ", 0, 1, 2) + struct.pack("<2f", 1.0, 2.5)
    assert data[33:42] == struct.pack("<QB", 2, 0)
    entries = read_cimatrix(str(path))
    assert entries[2] is None and entries[0].tolist() == [1.0, 2.5] and entries[5].tolist() == [3.0]
    with pytest.raises(ValueError, match="expected a .cimatrix file"):
        write_cimatrix(str(tmp_path / "x.bin"), {})
    (tmp_path / "bad.cimatrix").write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated or malformed"):
        read_cimatrix(str(tmp_path / "bad.cimatrix"))


def test_llama_cpp_legacy_file_is_averaged_and_mapped_to_checkpoint_names(tiny, tmp_path, caplog):
    _, _, model = tiny
    q = np.arange(64, dtype=np.float32)
    path = tmp_path / "model.imatrix"
    _legacy_imatrix(path, {"blk.0.attn_q.weight": (4, q), "blk.1.ffn_down.weight": (1, np.ones(128, np.float32)),
                           "blk.0.ffn_gate_exps.weight": (2, np.ones(8, np.float32))})
    raw = read_llama_imatrix(str(path))
    assert torch.equal(raw["blk.0.attn_q.weight"], torch.from_numpy(q) / 4)
    vectors = load_imatrix(str(path), model)
    assert set(vectors) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert checkpoint_name_of("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj"
    assert checkpoint_name_of("token_embd.weight") is None
    other = tmp_path / "model.dat"
    other.write_bytes(path.read_bytes())
    with caplog.at_level("WARNING"):
        assert set(load_imatrix(str(other), model)) == set(vectors)
    assert "neither .imatrix nor .cimatrix" in caplog.text
    _legacy_imatrix(path, {"blk.9.unknown.weight": (1, q)})
    with pytest.raises(ValueError, match="none of its entries"):
        load_imatrix(str(path), model)


def test_llama_cpp_gguf_container_file(tiny, tmp_path):
    import gguf

    _, _, model = tiny
    path = tmp_path / "new.imatrix"
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_tensor("blk.0.attn_k.weight.in_sum2", np.full(64, 6.0, np.float32))
    writer.add_tensor("blk.0.attn_k.weight.counts", np.array([3.0], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vectors = load_imatrix(str(path), model)
    assert list(vectors) == ["model.layers.0.self_attn.k_proj"]
    assert torch.allclose(vectors["model.layers.0.self_attn.k_proj"], torch.full((64,), 2.0))


def test_cimatrix_indices_follow_the_layer_order(tiny, tmp_path):
    _, _, model = tiny
    names = isq_layer_names(model)
    path = tmp_path / "x.cimatrix"
    write_cimatrix(str(path), {1: torch.ones(64), 7: None})
    assert list(load_imatrix(str(path), model)) == [names[1]]
    write_cimatrix(str(path), {len(names): torch.ones(64)})
    with pytest.raises(ValueError, match="out of range"):
        load_imatrix(str(path), model)


def test_imatrix_lowers_the_weighted_error_of_the_columns_it_favours(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    config_dict = json.loads((tmp_path / "config.json").read_text())
    files = sorted(glob.glob(f"{tmp_path}/*.safetensors"))
    importance = torch.full((256,), 0.01)
    importance[:16] = 100.0
    path = tmp_path / "x.cimatrix"
    write_cimatrix(str(path), {1: importance})  # layer 1: model.layers.0.self_attn.q_proj
    plain = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu",
                       quant_config=IsqQuantConfig(isq="Q4K"))
    guided = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu",
                        quant_config=IsqQuantConfig(isq="Q4K", imatrix_path=str(path)))
    weight = dict(iter_safetensors(files, torch.float32))["model.layers.0.self_attn.q_proj.weight"]

    def weighted_error(model) -> float:
        state = isq_layer_states(model)[1]
        return float(((state.ggml.dequantize() - weight) ** 2 * importance).sum())

    assert weighted_error(guided) < 0.9 * weighted_error(plain)  # about 0.8 for this seed
    unguided = [s.ggml.data for i, s in enumerate(isq_layer_states(guided)) if i != 1]
    assert all(torch.equal(a, s.ggml.data) for a, s in zip(unguided, [s for i, s in enumerate(
        isq_layer_states(plain)) if i != 1]))  # layers without a vector are quantized as without the file


def test_calibration_chunks_put_bos_in_front_of_each():
    assert calibration_chunks(list(range(5)), 99, chunk_tokens=2) == [[99, 0, 1], [99, 2, 3], [99, 4]]
    assert calibration_chunks([1, 2], None) == [[1, 2]]


def _hf_mean_squares(hf, token_ids: list[int], module: torch.nn.Module) -> torch.Tensor:
    captured = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        hf(torch.tensor([token_ids]))
    handle.remove()
    rows = torch.cat(captured).float()
    return rows.square().sum(0) / rows.shape[0]


def test_calibration_file_collects_saves_and_quantizes(tiny, tmp_path, monkeypatch):
    path, hf, model = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "cal.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    runner = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32, calibration_file="cal.txt"),
                    in_situ_quant="Q4_0", show_progress=False)
    names = isq_layer_names(model)
    saved = tmp_path / f"collected-{len(names)}.cimatrix"
    assert saved.exists()
    entries = read_cimatrix(str(saved))
    token_ids = [0] + runner.tokenize_text(text, add_special_tokens=False)  # BOS (config bos_token_id 0) in front
    layer = hf.model.layers[1]
    for name, module in (("model.layers.1.self_attn.q_proj", layer.self_attn.q_proj),
                         ("model.layers.1.mlp.down_proj", layer.mlp.down_proj), ("lm_head", hf.lm_head)):
        expected = _hf_mean_squares(hf, token_ids, module)
        torch.testing.assert_close(entries[names.index(name)], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(entries[names.index("model.layers.1.self_attn.k_proj")],
                       entries[names.index("model.layers.1.self_attn.q_proj")])  # fused shards share their input
    reloaded = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32, imatrix=str(saved)),
                      in_situ_quant="Q4_0", show_progress=False)
    for ours, again in zip(isq_layer_states(runner.llm_engine._loaded.model), isq_layer_states(reloaded.llm_engine._loaded.model)):
        assert torch.equal(ours.ggml.data, again.ggml.data)
    runner.close()
    reloaded.close()


def test_moe_experts_collect_the_inputs_of_their_routed_tokens(tmp_path):
    """Each expert's gate/up vector is the mean x² of the tokens the router sends to it (router and MoE input
    taken from `transformers`); MoQE collects the LM head and the experts only."""
    from mistralrs.quant.imatrix import _chunk_runner, collect_imatrix
    from tests.models import family_harness as harness

    config = transformers.MixtralConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2)
    hf, ours = harness.build_pair(config, transformers.MixtralForCausalLM, str(tmp_path))
    token_ids = harness.prompt(5, 40)
    vectors = collect_imatrix(ours, [token_ids], _chunk_runner(ours, torch.device("cpu"), torch.float32, 64),
                              moqe=True)
    assert list(vectors) == isq_layer_names(ours, moqe=True) and len(vectors) == 1 + 4 * 3
    block = hf.model.layers[0].mlp if hasattr(hf.model.layers[0], "mlp") else hf.model.layers[0].block_sparse_moe
    captured = []
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        hf(torch.tensor([token_ids]))
    handle.remove()
    x = captured[0]
    with torch.no_grad():
        chosen = torch.topk(torch.nn.functional.linear(x, block.gate.weight), 2, dim=-1).indices
    for expert in range(4):
        rows = x[(chosen == expert).any(dim=-1)]
        expected = rows.square().sum(0) / rows.shape[0] if rows.shape[0] else None
        for proj in ("w1", "w3"):
            got = vectors[f"model.layers.0.block_sparse_moe.experts.{expert}.{proj}"]
            if expected is None:
                assert got is None
            else:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
