"""The sampler alone: ms per call over `[rows, vocab]` logits, this tree's sampler against another version's.

    .venv/bin/python bench/bench_sampler.py [--threads 1] [--baseline OLD_SAMPLER.py] [--calls 15]

The cases are the sampling settings a request commonly has: greedy (temperature 0), greedy with a logit bias (the
benchmarks' EOS ban), temperature 1 with no truncation (a Runner request's default), and temperature 0.7 with
top-k 40 and top-p 0.9; each over SmolLM2's 49,152-token and Gemma 3's 262,144-token vocabulary, for 1 row
(single stream) and 8 rows (8 streams), on random logits. Each sampled row has its own seeded generator, as in the
engine. `--baseline` loads another version of mistralrs/sample/sampler.py (e.g. `git show REV:mistralrs/sample/
sampler.py > /tmp/old_sampler.py`) and times it call for call alternately with this tree's, fastest of `--calls`
for each: the ratio is measured in the same run. As in the engine (the model runner), the process has the serving
process's mmap threshold (worker/host_memory.py) and each call gets fresh logits (copied outside the timing) that
it may keep: handed over with `private=True` to a sampler that takes it.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VOCABS = {"SmolLM2": 49152, "Gemma 3": 262144}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="another version of mistralrs/sample/sampler.py to compare with")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per case and sampler (fastest taken)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    import torch

    from mistralrs.sample import Sampler, SamplingParams
    from mistralrs.worker.host_memory import bound_heap_retention

    bound_heap_retention()
    torch.set_num_threads(args.threads)
    samplers = {"this tree": Sampler()}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_sampler", args.baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        samplers = {"baseline": module.Sampler(), **samplers}
    cases = {
        "greedy": SamplingParams(temperature=0),
        "greedy, logit bias": SamplingParams(temperature=0, logit_bias={2: -100.0}),
        "temperature 1 (default)": SamplingParams(temperature=1.0),
        "t 0.7, top-k 40, top-p 0.9": SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
    }
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}\n")
    print("| vocab | rows | case | " + " | ".join(f"{name} (ms)" for name in samplers)
          + (" | speed-up |" if args.baseline else " |"))
    print("|---" * (3 + len(samplers) + bool(args.baseline)) + "|")
    for vocab_name, vocab_size in VOCABS.items():
        for num_rows in (1, 8):
            logits = torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(0)) * 3
            for case, params in cases.items():
                ms = time_samplers(samplers, logits, params, args.calls)
                cells = " | ".join(f"{ms[name]:.3f}" for name in samplers)
                ratio = f" | {ms['baseline'] / ms['this tree']:.1f}x |" if args.baseline else " |"
                print(f"| {vocab_name} ({vocab_size}) | {num_rows} | {case} | {cells}{ratio}")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def time_samplers(samplers: dict, logits, params, calls: int) -> dict[str, float]:
    """Fastest ms per call of each sampler, the samplers called alternately (after one warm-up call each)."""
    import torch

    from mistralrs.sample import SamplingRow

    def rows():
        return [SamplingRow(params, [1, 2, 3], 3, None if params.is_greedy else torch.Generator().manual_seed(i))
                for i in range(logits.shape[0])]

    handed_over = {name: "private" in inspect.signature(sampler.__call__).parameters
                   for name, sampler in samplers.items()}
    best = dict.fromkeys(samplers, float("inf"))
    for call in range(calls + 1):
        for name, sampler in samplers.items():
            batch = rows()
            fresh = logits.clone()
            start = time.perf_counter()
            sampler(fresh, batch, **({"private": True} if handed_over[name] else {}))
            if call:
                best[name] = min(best[name], 1000 * (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    main()
