"""Whole models from GGUF with their Linear weights kept quantized: tiny random llama/qwen2 files written with
`write_tiny_gguf`, and the real SmolLM2-135M-Instruct (Q4_1 layers, Q8_0 tied embedding).

The reference is the same file loaded with every tensor dequantized to the model dtype (no quant config).
Logits tolerance, relative to the logits norm: 2**-6 in bfloat16 (the per-layer 2**-7 of
tests/quant/test_cpu_int4.py compounded over a few layers; observed up to 0.005); float32 with the switch off
is exact, and float32 with it on (blocks dequantized per tile) within 2**-18 (summation order only).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from mistralrs import ModelDType, Which
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.loader.safetensors_loader import load_model
from mistralrs.quant.cpu_int4 import Int4CpuPairWeight, Int4CpuWeight
from mistralrs.quant.gguf_linear import GGUFLinearMethod, GGUFQuantConfig
from mistralrs.quant.packed import BlockTiledWeight, DenseWeight
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.quant.qdot import QdotWeight
from mistralrs.worker.options import ExecutionOptions
from tests.loader.gguf_fixtures import write_tiny_gguf
from tests.loading import load_which
from tests.quant.test_cpu_int4 import relative_error
from tests.quant.test_qdot import extension  # noqa: F401  (the fixture)

LOGITS_TOLERANCE = 2.0**-6
FAST_TYPES = {"Q4_0": Int4CpuWeight, "Q4_1": Int4CpuWeight, "Q8_0": Int4CpuPairWeight, "Q5_0": Int4CpuPairWeight,
              "Q5_1": Int4CpuPairWeight}
# (arch, tied LM head, type): every architecture/tie with the three main types, and the 5-bit types once
TINY_CASES = [(arch, tie, ggml_type) for arch, tie in [("llama", False), ("llama", True), ("qwen2", False)]
              for ggml_type in ["Q4_0", "Q4_1", "Q8_0"]] + [("llama", True, "Q5_0"), ("qwen2", False, "Q5_1")]
VOCAB = 328  # not a multiple of 16: the packed LM head is padded


def tiny_gguf(tmp_path, arch: str, ggml_type: str, tie: bool) -> str:
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": tie}
    torch.manual_seed(0)
    config = (transformers.LlamaConfig(**common) if arch == "llama"
              else transformers.Qwen2Config(**common, use_sliding_window=False))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # visible biases (qwen2) and logits large enough to compare
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
        model.model.embed_tokens.weight.mul_(20.0)
    return write_tiny_gguf(model, config, tmp_path / "tiny.gguf", arch=arch, ggml_type=ggml_type)[0]


def load(path: str, dtype: torch.dtype, quant_config: GGUFQuantConfig | None):
    gguf = open_gguf(path)
    return load_model(gguf.config, gguf.iter_weights(dtype, keep_quantized=quant_config is not None), dtype=dtype,
                      device="cpu", quant_config=quant_config)


def forward_logits(model, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position of one sequence, as float32 `[len(token_ids), vocab]`."""
    kv = allocate_kv_caches(model.kv_cache_spec(), 8, 16, dtype, "cpu")
    batch = ForwardBatch.build([SeqChunk(token_ids, 0, list(range(8)))], 16, kv, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(batch.input_ids, batch.positions, batch))


@pytest.mark.parametrize("kernels", ["int4", True])
@pytest.mark.parametrize("arch, tie, ggml_type", TINY_CASES)
def test_tiny_model_fast_path_matches_dequantized_reference(tmp_path, arch, tie, ggml_type, kernels, request):
    """Both fast forms: torch's int4 kernel, and the int8 dot products (every type here has one)."""
    if kernels is True:
        request.getfixturevalue("extension")
    path = tiny_gguf(tmp_path, arch, ggml_type, tie)
    fast = load(path, torch.bfloat16, GGUFQuantConfig(use_fast_kernels=kernels))
    form = FAST_TYPES[ggml_type] if kernels == "int4" else QdotWeight
    reference = load(path, torch.bfloat16, None)
    linears = [m for m in fast.modules() if isinstance(getattr(m, "quant_method", None), GGUFLinearMethod)]
    assert len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    for layer in linears:
        assert [type(w) for w in layer.quant_method.weights] == [form], layer.prefix
    embedding = fast.model.embed_tokens
    if tie and form is QdotWeight:  # the table's rows are read from the head's packed blocks: held once
        head = fast.lm_head.quant_method.weights[0]
        assert embedding.quantized is None and embedding.row_lookup == head.embedding_rows
    else:
        assert embedding.quantized.ggml_type == ggml_type
    assert fast.model.embed_tokens.tied_heads == ([fast.lm_head] if tie else [])
    token_ids = list(range(3, 300, 11))
    got, want = forward_logits(fast, token_ids, torch.bfloat16), forward_logits(reference, token_ids, torch.bfloat16)
    assert relative_error(got, want) < LOGITS_TOLERANCE


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
def test_tiny_model_float32_plain_path_is_exact(tmp_path, ggml_type):
    path = tiny_gguf(tmp_path, "llama", ggml_type, tie=True)
    ours = load(path, torch.float32, GGUFQuantConfig(use_fast_kernels=False))
    assert isinstance(ours.lm_head.quant_method.weights[0], DenseWeight)
    assert ours.model.embed_tokens.weight is ours.lm_head.quant_method.dense_weight(ours.lm_head)  # one copy
    token_ids = list(range(3, 300, 7))
    want = forward_logits(load(path, torch.float32, None), token_ids, torch.float32)
    assert torch.equal(forward_logits(ours, token_ids, torch.float32), want)


@pytest.mark.parametrize("fast_kernels, form", [(True, QdotWeight), ("int4", Int4CpuWeight), (False, DenseWeight)])
def test_the_load_specs_execution_options_choose_the_weight_form(tmp_path, fast_kernels, form, extension):
    """`ExecutionOptions.fast_kernels` reaches the GGUF quant config through the load spec."""
    path = tiny_gguf(tmp_path, "llama", "Q4_1", tie=False)
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=os.path.basename(path),
                       dtype=ModelDType.BF16)
    loaded = load_which(which, show_progress=False, execution=ExecutionOptions(fast_kernels=fast_kernels))
    assert [type(w) for w in loaded.model.lm_head.quant_method.weights] == [form]


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q5_0"])
def test_tiny_model_float32_keeps_blocks_and_matches_reference(tmp_path, ggml_type):
    path = tiny_gguf(tmp_path, "llama", ggml_type, tie=True)
    ours = load(path, torch.float32, GGUFQuantConfig())
    linears = [m for m in ours.modules() if isinstance(getattr(m, "quant_method", None), GGUFLinearMethod)]
    assert all([type(w) for w in m.quant_method.weights] == [BlockTiledWeight] for m in linears)
    assert ours.model.embed_tokens.weight is None and ours.model.embed_tokens.quantized.ggml_type == ggml_type
    token_ids = list(range(3, 300, 7))
    want = forward_logits(load(path, torch.float32, None), token_ids, torch.float32)
    assert relative_error(forward_logits(ours, token_ids, torch.float32), want) < 2.0**-18



def test_blocks_given_to_a_model_without_quant_config_are_dequantized(tmp_path):
    path = tiny_gguf(tmp_path, "qwen2", "Q4_0", tie=True)
    gguf = open_gguf(path)
    ours = load_model(gguf.config, gguf.iter_weights(torch.float32, keep_quantized=True), dtype=torch.float32,
                      device="cpu")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the model's own dense tie, untouched
    token_ids = list(range(3, 300, 7))
    want = forward_logits(load(path, torch.float32, None), token_ids, torch.float32)
    assert torch.equal(forward_logits(ours, token_ids, torch.float32), want)

# ---------------------------------------------------------------------------------------------------------
# The real default model.

CHAT = [{"role": "user", "content": "Count from one to ten in words."}]  # greedy margins >= 0.5 for 16 tokens


def greedy(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], float]:
    """Greedy continuation (prefill, then one token per step through the KV cache) and its smallest top-1/top-2
    logit margin."""
    block_size = 16
    block_ids = list(range(-(-(len(prompt_ids) + num_tokens) // block_size)))
    kv = allocate_kv_caches(model.kv_cache_spec(), len(block_ids), block_size, model.dtype, "cpu")
    chunk, position, generated, margin = list(prompt_ids), 0, [], float("inf")
    with torch.inference_mode():
        for _ in range(num_tokens):
            batch = ForwardBatch.build([SeqChunk(chunk, position, block_ids)], block_size, kv, "cpu")
            logits = model.compute_logits(model(batch.input_ids, batch.positions, batch)[-1:])[0]
            top = logits.topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            position += len(chunk)
            chunk = [int(logits.argmax())]
            generated.append(chunk[0])
    return generated, margin


def test_smollm2_linear_weights_stay_quantized_and_greedy_matches_plain_path(extension):
    from mistralrs import ModelDType, Which
    from mistralrs.loader.chat_template import ChatTemplate
    from mistralrs.loader.default_model import default_model_path
    from tests.loading import load_which

    path = default_model_path()
    loaded = load_which(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                                      dtype=ModelDType.BF16), show_progress=False)
    fast = loaded.model
    for layer in fast.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(linear.quant_method, GGUFLinearMethod), linear.prefix
            assert [type(w) for w in linear.quant_method.weights] == [QdotWeight], linear.prefix  # Q4_1
    assert [type(w) for w in fast.lm_head.quant_method.weights] == [QdotWeight]  # the tied Q8_0 table
    embedding = fast.model.embed_tokens
    assert embedding.quantized is None and embedding.weight is None
    assert embedding.tied_heads == [fast.lm_head]
    assert embedding.row_lookup == fast.lm_head.quant_method.weights[0].embedding_rows  # one copy of the table
    gguf = open_gguf(str(path))
    plain = load_model(gguf.config, gguf.iter_weights(torch.bfloat16, keep_quantized=True), dtype=torch.bfloat16,
                       device="cpu", quant_config=GGUFQuantConfig(use_fast_kernels=False))
    assert isinstance(plain.lm_head.quant_method.weights[0], DenseWeight)
    bundle = loaded.tokenizer
    template = ChatTemplate(bundle.chat_template, bos_token=bundle.bos_token, eos_token=bundle.eos_token,
                            unk_token=bundle.unk_token)
    prompt_ids = bundle.tokenizer.encode(template.render(CHAT), add_special_tokens=False).ids
    expected, margin = greedy(plain, prompt_ids, 16)
    assert margin > 0.25, "pick a prompt whose greedy choices are not near-ties"
    assert greedy(fast, prompt_ids, 16)[0] == expected
