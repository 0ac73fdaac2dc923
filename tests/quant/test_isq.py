"""In-situ quantization (REFERENCE §3) on tiny random models.

Each ISQ type is checked two ways:
- against an independent reference: our dense model loaded from the checkpoint with every quantized weight
  replaced by the `gguf` package's dequantization of our GGML blocks (HQQ: `hqq_dequantize`; FP8: the scale
  formula), fp32 logits within 1e-4 — the packing, shard order and bias handling are exact;
- against full precision: the relative L2 error of the logits below a per-type bound (`REL_TOLERANCE`,
  about 1.6x what the seed-0 model shows; ordered as the bits are).
Also: greedy generation runs; layer lists in the reference's order; topology; MoQE on a tiny Mixtral;
re-ISQ mid-run through the Runner; the fast/plain switch; block-size fallbacks; bad inputs.
"""

from __future__ import annotations

import glob
import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs.layers.linear import UnquantizedLinearMethod
from mistralrs.layers.moe import UnquantizedMoEMethod
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.isq import (
    IsqLinearMethod,
    IsqQuantConfig,
    isq_config_from_options,
    isq_layer_names,
    isq_layer_states,
    quantize_state,
)
from mistralrs.quant.isq_moe import IsqMoEMethod
from mistralrs.quant.isq_types import ISQ_TYPES, parse_isq_type
from mistralrs.quant.topology import Topology
from tests.models import family_harness as harness
from tests.tiny_models import make_tiny_model_dir

# Bound on |logits - full precision| / |full precision| (L2 over all positions), per type.
REL_TOLERANCE = {"Q4_0": 0.25, "Q4_1": 0.22, "Q5_0": 0.12, "Q5_1": 0.11, "Q8_0": 0.02, "Q8_1": 0.02,
                 "Q2K": 0.8, "Q3K": 0.4, "Q4K": 0.2, "Q5K": 0.1, "Q6K": 0.05, "Q8K": 0.02,
                 "HQQ4": 0.22, "HQQ8": 0.02, "FP8": 0.08}
EXACT_ATOL = 1e-4  # ours against the dense model carrying the independently dequantized weights (fp32)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _save(hf, path) -> tuple[dict, list[str]]:
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f), sorted(glob.glob(os.path.join(str(path), "*.safetensors")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer Llama whose widths (256) take every block size; (config dict, files, fp32 reference logits)."""
    config = transformers.LlamaConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=256, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)  # logits of a few units
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    config_dict, files = _save(hf, tmp_path_factory.mktemp("isq-llama"))
    return config_dict, files, harness.hf_logits(hf, harness.prompt(1, 20))


def _load(config_dict, files, quant_config=None, dtype=torch.float32, tensors=None):
    weights = tensors.items() if tensors is not None else iter_safetensors(files, dtype)
    return load_model(config_dict, weights, dtype=dtype, device="cpu", quant_config=quant_config)


def _logits(model, dtype=torch.float32, token_ids: list[int] | None = None) -> torch.Tensor:
    token_ids = harness.prompt(1, 20) if token_ids is None else token_ids
    (logits,) = harness.TinyRunner(model, dtype=dtype).step([(0, token_ids)])
    return logits


def _dequantize_8bit(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """Q8_1 (f16 d, f16 sum, 32 int8) and Q8_K (f32 d, 256 int8, 16 int16 sums), which `gguf` cannot read:
    value = d * q."""
    scale_dtype, block, head = (np.float16, 32, 4) if ggml_type == "Q8_1" else (np.float32, 256, 4)
    size = head + block + (0 if ggml_type == "Q8_1" else 32)
    blocks = data.reshape(-1, size)
    d = blocks[:, :head].copy().view(scale_dtype)[:, :1].astype(np.float32)
    return d * blocks[:, head:head + block].copy().view(np.int8).astype(np.float32)


def _independent_dense(state) -> torch.Tensor:
    """The weight a state encodes, dequantized without our GGML code."""
    if state.ggml is not None:
        data = state.ggml.data.numpy().view(np.uint8)
        if state.ggml.ggml_type in ("Q8_1", "Q8_K"):
            values = _dequantize_8bit(data, state.ggml.ggml_type)
        else:
            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[state.ggml.ggml_type])
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(state.ggml.shape).float()
    if state.hqq is not None:
        from mistralrs.quant.hqq import hqq_dequantize
        return hqq_dequantize(state.hqq)
    if state.fp8 is not None:
        return state.fp8.weight.float() * state.fp8.dequant_w_scale
    return state.dense.float()


def _dequantized_checkpoint(model, files, moqe=False) -> dict[str, torch.Tensor]:
    """The checkpoint with every ISQ layer's weight replaced by its independent dequantization."""
    tensors = dict(iter_safetensors(files, torch.float32))
    for name, state in zip(isq_layer_names(model, moqe), isq_layer_states(model, moqe)):
        if f"{name}.weight" in tensors:
            tensors[f"{name}.weight"] = _independent_dense(state)
    return tensors


def _rel_error(logits, reference) -> float:
    return float((logits - reference).norm() / reference.norm())


# ---- types ---------------------------------------------------------------------------------------------------

def test_type_names_are_the_reference_fifteen_case_insensitive():
    assert list(ISQ_TYPES) == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K",
                               "Q8K", "HQQ4", "HQQ8", "FP8"]
    assert parse_isq_type("q4k").ggml_type == "Q4_K" and parse_isq_type("Q4_K").name == "Q4K"
    assert parse_isq_type("hqq4").bits == 4 and parse_isq_type("fp8").kind == "fp8"
    with pytest.raises(ValueError, match=r"ISQ type Q7K unknown, choose one of Q4_0, Q4_1, .*FP8"):
        parse_isq_type("Q7K")


@pytest.mark.parametrize("isq", list(REL_TOLERANCE))
def test_each_type_matches_its_dequantized_weights_and_full_precision(llama, isq):
    config_dict, files, reference = llama
    ours = _load(config_dict, files, IsqQuantConfig(isq=isq))
    logits = _logits(ours)
    twin = _load(config_dict, files, tensors=_dequantized_checkpoint(ours, files))
    torch.testing.assert_close(logits, _logits(twin), atol=EXACT_ATOL, rtol=0)
    assert _rel_error(logits, reference) < REL_TOLERANCE[isq]
    kinds = {state.kind for state in isq_layer_states(ours)}
    assert kinds == {parse_isq_type(isq).kind}  # every layer quantized, none left dense
    assert isinstance(ours.model.embed_tokens.weight, torch.nn.Parameter)  # embeddings stay dense
    assert len(harness.greedy_ours(ours, [harness.prompt(3, 5)], 4)[0]) == 4


def test_layer_names_follow_the_reference_order(llama):
    config_dict, files, _ = llama
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q8_0"))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
    assert isq_layer_names(ours) == ["lm_head"] + [f"model.layers.{i}.{p}" for i in range(2) for p in per_layer]
    qkv = ours.model.layers[0].self_attn.qkv_proj.quant_method
    assert isinstance(qkv, IsqLinearMethod) and len(qkv.states) == 3  # one state per checkpoint shard
    assert all(s.bias is not None and s.bias.dtype == torch.float32 for s in qkv.states)
    assert len(qkv.weights) == 1  # shards of one type packed together


def test_fast_kernels_and_plain_twin_agree_in_bfloat16(llama):
    config_dict, files, _ = llama
    fast = _logits(_load(config_dict, files, IsqQuantConfig(isq="Q4_0"), torch.bfloat16), torch.bfloat16)
    plain = _logits(_load(config_dict, files, IsqQuantConfig(isq="Q4_0", use_fast_kernels=False), torch.bfloat16),
                    torch.bfloat16)
    assert _rel_error(fast, plain) < 2e-2  # bfloat16 rounding only


def test_topology_types_per_layer_uncovered_and_unindexed_layers(llama, tmp_path):
    config_dict, files, _ = llama
    path = tmp_path / "topology.yml"
    path.write_text("0: {isq: Q8_0}\n1: {device: cpu}\n")  # layer 1 covered without isq: left unquantized
    config = isq_config_from_options(parse_isq_type("Q4K"), topology=Topology.from_yaml(str(path)))
    ours = _load(config_dict, files, config)
    states = dict(zip(isq_layer_names(ours), isq_layer_states(ours)))
    assert states["lm_head"].ggml.ggml_type == "Q4_K"  # no index: the global type
    assert {states[n].ggml.ggml_type for n in states if n.startswith("model.layers.0.")} == {"Q8_0"}
    assert isinstance(ours.model.layers[1].mlp.down_proj.quant_method, UnquantizedLinearMethod)
    twin = _load(config_dict, files, tensors=_dequantized_checkpoint(ours, files))
    torch.testing.assert_close(_logits(ours), _logits(twin), atol=EXACT_ATOL, rtol=0)


def test_topology_with_only_layer_types_quantizes_only_those(llama, tmp_path):
    config_dict, files, _ = llama
    path = tmp_path / "topology.yml"
    path.write_text("1-2: {isq: HQQ8}\n")
    ours = _load(config_dict, files, isq_config_from_options(None, topology=Topology.from_yaml(str(path))))
    assert isinstance(ours.lm_head.quant_method, UnquantizedLinearMethod)
    assert isinstance(ours.model.layers[0].self_attn.o_proj.quant_method, UnquantizedLinearMethod)
    assert ours.model.layers[1].self_attn.o_proj.quant_method.states[0].kind == "hqq"


def test_block_size_fallbacks_and_unquantizable_widths(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")  # hidden 64, intermediate 128: no K-quant block fits
    config_dict, files = json.loads((tmp_path / "config.json").read_text()), sorted(glob.glob(f"{tmp_path}/*.safetensors"))
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q4K"))
    assert {s.ggml.ggml_type for s in isq_layer_states(ours)} == {"Q4_1"}  # the reference's Q4K fallback
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q6K"))
    assert {s.ggml.ggml_type for s in isq_layer_states(ours)} == {"Q5_1"}
    odd = quantize_state(torch.randn(4, 48), None, parse_isq_type("Q4_0"), torch.float32)
    assert odd.kind == "dense"  # 48 columns fit no 32-block: kept unquantized


def test_tied_lm_head_is_quantized_while_the_embedding_stays_exact(tmp_path):
    config = transformers.LlamaConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    config_dict, files = _save(hf, tmp_path)
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q8_0"))
    assert ours.lm_head.quant_method.states[0].ggml.ggml_type == "Q8_0"
    torch.testing.assert_close(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight, atol=0, rtol=0)
    assert _rel_error(_logits(ours), harness.hf_logits(hf, harness.prompt(1, 20))) < REL_TOLERANCE["Q8_0"]


# ---- MoE -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    config = transformers.MixtralConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("isq-mixtral"))
    hf, _ = harness.build_pair(config, transformers.MixtralForCausalLM, path)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    return config_dict, sorted(glob.glob(os.path.join(path, "*.safetensors"))), harness.hf_logits(
        hf, harness.prompt(1, 20))


def test_mixtral_default_quantizes_attention_router_and_experts(mixtral):
    config_dict, files, reference = mixtral
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q8_0"))
    names = isq_layer_names(ours)
    layer0 = [n for n in names if n.startswith("model.layers.0.")]
    assert layer0[:5] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.block_sparse_moe.gate"]
    assert layer0[5:8] == [f"model.layers.0.block_sparse_moe.experts.0.{w}" for w in ("w1", "w2", "w3")]
    assert len(names) == 1 + 2 * (5 + 3 * 4)
    assert isinstance(ours.model.layers[0].block_sparse_moe.experts.quant_method, IsqMoEMethod)
    twin = _load(config_dict, files, tensors=_dequantized_checkpoint(ours, files))
    torch.testing.assert_close(_logits(ours), _logits(twin), atol=EXACT_ATOL, rtol=0)
    assert _rel_error(_logits(ours), reference) < REL_TOLERANCE["Q8_0"]


def test_moqe_quantizes_only_the_experts_and_lm_head(mixtral):
    config_dict, files, reference = mixtral
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q4_0", moqe=True))
    assert isq_layer_names(ours, moqe=True) == ["lm_head"] + [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}" for i in range(2) for e in range(4)
        for w in ("w1", "w2", "w3")]
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.quant_method, UnquantizedLinearMethod)
    assert isinstance(layer.block_sparse_moe.gate.quant_method, UnquantizedLinearMethod)
    assert {s.ggml.ggml_type for s in layer.block_sparse_moe.experts.quant_method.states} == {"Q4_0"}
    twin = _load(config_dict, files, tensors=_dequantized_checkpoint(ours, files, moqe=True))
    torch.testing.assert_close(_logits(ours), _logits(twin), atol=EXACT_ATOL, rtol=0)
    assert _rel_error(_logits(ours), reference) < REL_TOLERANCE["Q4_0"]


def test_moqe_on_a_dense_model_falls_back_to_every_layer(llama):
    config_dict, files, _ = llama
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q8_0", moqe=True))
    assert isq_layer_names(ours, moqe=True) == isq_layer_names(ours)
    assert isinstance(ours.model.layers[0].mlp.down_proj.quant_method, IsqLinearMethod)


def test_requantizing_a_loaded_moe_model_in_place(mixtral):
    config_dict, files, _ = mixtral
    ours = _load(config_dict, files)
    assert isinstance(ours.model.layers[0].block_sparse_moe.experts.quant_method, UnquantizedMoEMethod)
    assert IsqQuantConfig(isq="Q8_0").quantize_loaded(ours) == 1 + 2 * 4  # lm_head, per layer 3 linears + experts
    fresh = _load(config_dict, files, IsqQuantConfig(isq="Q8_0"))
    torch.testing.assert_close(_logits(ours), _logits(fresh), atol=0, rtol=0)


# ---- through the Runner --------------------------------------------------------------------------------------

def _chat(runner: Runner) -> tuple[str, list[float]]:
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "quantize me"}], model="tiny", max_tokens=6, temperature=0.0,
        logprobs=True))
    choice = response.choices[0]
    return choice.message.content, [entry.logprob for entry in choice.logprobs.content]


def test_re_isq_mid_run_equals_loading_with_that_type(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")
    which = Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32)
    runner = Runner(which, show_progress=False)
    before = _chat(runner)
    assert runner.send_re_isq("q4_0") is None
    after = _chat(runner)
    model = runner.llm_engine._loaded.model
    assert model.lm_head.quant_method.states[0].ggml.ggml_type == "Q4_0"
    runner.close()
    fresh = Runner(which, in_situ_quant="Q4_0", show_progress=False)
    assert after == _chat(fresh)
    assert after[1] != before[1]
    with pytest.raises(ValueError, match="ISQ type Q3 unknown"):
        fresh.send_re_isq("Q3")
    fresh.close()


def test_isq_with_a_gguf_model_is_refused_and_re_isq_ignored(tmp_path):
    from tests.loader.gguf_fixtures import write_tiny_gguf
    from tests.tiny_models import hf_config

    config = hf_config("llama", 320)
    torch.manual_seed(1)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    files = write_tiny_gguf(hf, config, tmp_path / "tiny.gguf", arch="llama", ggml_type="Q8_0")
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=os.path.basename(files[0]),
                       dtype=ModelDType.F32)
    with pytest.raises(ValueError, match="in_situ_quant.*Which.GGUF"):
        Runner(which, in_situ_quant="Q4K", show_progress=False)
    runner = Runner(which, show_progress=False)
    method = runner.llm_engine._loaded.model.lm_head.quant_method
    runner.send_re_isq("Q4K")
    assert runner.llm_engine._loaded.model.lm_head.quant_method is method
    with pytest.raises(ValueError, match=r"ISQ type \.\./\.\./x unknown"):   # checked although ignored
        runner.send_re_isq("../../x")
    runner.close()


@pytest.mark.parametrize("options, message", [
    (dict(in_situ_quant="Q9"), "ISQ type Q9 unknown"),
    (dict(in_situ_quant="HQQ4", imatrix="x.cimatrix"), "HQQ4 .*does not support imatrix"),
    (dict(in_situ_quant="FP8", calibration_file="cal.txt"), "FP8 .*does not support imatrix"),
    (dict(in_situ_quant="Q4K", imatrix="x.cimatrix", calibration_file="cal.txt"), "cannot be combined"),
    (dict(in_situ_quant=None, imatrix="x.cimatrix"), "need ISQ"),
])
def test_bad_options_raise(options, message):
    in_situ_quant = options.pop("in_situ_quant")
    with pytest.raises(ValueError, match=message):
        isq_config_from_options(parse_isq_type(in_situ_quant) if in_situ_quant else None, **options)


def test_hqq_quantizing_with_an_imatrix_raises():
    with pytest.raises(ValueError, match="HQQ8 .*does not support imatrix"):
        quantize_state(torch.randn(64, 64), None, parse_isq_type("HQQ8"), torch.float32, torch.ones(64))


def test_lora_adapters_are_merged_before_quantizing(tmp_path):
    from tests.loading import load_which
    from tests.adapters.test_lora import _make_dirs

    base, adapters = _make_dirs(tmp_path, "llama")
    ordering = tmp_path / "ordering.json"
    ordering.write_text(json.dumps({"base_model_id": str(base), "order": ["a1"]}))
    which = Which.Lora(adapters_model_id=str(adapters), order=str(ordering), model_id=str(base), dtype=ModelDType.F32)
    tokens = list(range(3, 60, 2))
    dense = load_which(which, show_progress=False).model  # adapters merged, full precision
    merged = _logits(dense, token_ids=tokens)
    quantized = load_which(which, show_progress=False, in_situ_quant="Q8_0").model
    assert quantized.lm_head.quant_method.states[0].ggml.ggml_type == "Q8_0"
    IsqQuantConfig(isq="Q8_0").quantize_loaded(dense)  # the merged weights quantized afterwards: the same model
    torch.testing.assert_close(_logits(quantized, token_ids=tokens), _logits(dense, token_ids=tokens), atol=0, rtol=0)
    plain = _logits(load_which(Which.Plain(model_id=str(base), dtype=ModelDType.F32), show_progress=False).model,
                    token_ids=tokens)
    error = _rel_error(_logits(quantized, token_ids=tokens), merged)  # 0.085: the x20 LoRA deltas make big weights
    assert error < 0.15 and _rel_error(_logits(quantized, token_ids=tokens), plain) > 3 * error


def test_checkpoint_fused_projection_is_one_layer(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused: one state each, as the reference's get_layers()."""
    config = transformers.Phi3Config(vocab_size=harness.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    config_dict, files = _save(transformers.Phi3ForCausalLM(config).eval(), tmp_path)
    ours = _load(config_dict, files, IsqQuantConfig(isq="Q8_0"))
    assert isq_layer_names(ours) == ["lm_head"] + [f"model.layers.0.{p}" for p in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert [s.ggml.shape for s in ours.model.layers[0].mlp.gate_up_proj.quant_method.states] == [(256, 64)]
    twin = _load(config_dict, files, tensors=_dequantized_checkpoint(ours, files))
    torch.testing.assert_close(_logits(ours), _logits(twin), atol=EXACT_ATOL, rtol=0)
