"""Decode speed of a random-weight Mixtral-shaped model against its dense-equivalent compute.

Both models have the same attention, embedding and LM head; the dense twin (`LlamaForCausalLM`) has one MLP of
the active-parameter size (`num_experts_per_tok * intermediate_size`), so the gap between the two figures is the
routing, grouping and per-expert dispatch overhead of `layers/moe.py`. Prints one line per model and the ratio.

    .venv/bin/python bench/bench_moe.py [--hidden 1024] [--layers 8] [--experts 8] [--batch 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import LlamaForCausalLM
from mistralrs.models.mixtral import MixtralForCausalLM
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options

BLOCK_SIZE = 16


def build(cls: type, config: dict) -> torch.nn.Module:
    """`cls` with N(0, 0.02) random weights (norms at 1), set up as the model runner does (default options)."""
    model = cls(TextModelConfig.from_hf_dict(config), dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    apply_execution_options(model, ExecutionOptions())
    return model.eval()


def decode_tokens_per_s(model: torch.nn.Module, batch: int, prompt_len: int, num_steps: int) -> float:
    """Prefills `batch` random prompts, then times `num_steps` greedy decode steps of all of them together."""
    blocks_per_seq = (prompt_len + num_steps) // BLOCK_SIZE + 1
    kv = allocate_kv_caches(model.kv_cache_spec(), blocks_per_seq * batch, BLOCK_SIZE, torch.float32, "cpu")
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    rng = random.Random(0)
    tokens = [[rng.randrange(model.config.vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    chunks = [SeqChunk(token_ids=t, start_pos=0, block_ids=tables[i]) for i, t in enumerate(tokens)]
    elapsed = 0.0
    with torch.inference_mode():
        for step in range(num_steps + 1):
            fb = ForwardBatch.build(chunks, BLOCK_SIZE, kv, "cpu")
            start = time.perf_counter()
            hidden = model(fb.input_ids, fb.positions, fb)
            next_ids = model.compute_logits(hidden[fb.last_token_indices]).argmax(-1).tolist()
            if step > 0:  # step 0 is the prefill
                elapsed += time.perf_counter() - start
            chunks = [SeqChunk(token_ids=[t], start_pos=prompt_len + step, block_ids=tables[i])
                      for i, t in enumerate(next_ids)]
    return batch * num_steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=1792)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=16,
                  num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)
    moe = build(MixtralForCausalLM, dict(common, architectures=["MixtralForCausalLM"],
                                         intermediate_size=args.intermediate, num_local_experts=args.experts,
                                         num_experts_per_tok=args.top_k))
    dense = build(LlamaForCausalLM, dict(common, architectures=["LlamaForCausalLM"],
                                         intermediate_size=args.top_k * args.intermediate))
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts top-{args.top_k}, "
          f"{args.layers} layers, batch {args.batch}, {args.threads} threads, fp32")
    results = {}
    for name, model in (("dense-equivalent", dense), ("moe fused", moe)):
        results[name] = decode_tokens_per_s(model, args.batch, 32, args.steps)
        print(f"{name:>18}: {results[name]:8.1f} tokens/s")
    apply_execution_options(moe, ExecutionOptions(moe_backend="reference"))
    results["moe reference"] = decode_tokens_per_s(moe, args.batch, 32, max(args.steps // 4, 2))
    print(f"{'moe reference':>18}: {results['moe reference']:8.1f} tokens/s")
    print(f"fused MoE / dense-equivalent: {results['moe fused'] / results['dense-equivalent']:.2f}")


if __name__ == "__main__":
    main()
