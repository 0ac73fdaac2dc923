"""How much one client's request slows another client's running stream (issue 12, items 2 and 3).

    .venv/bin/python bench/bench_interference.py [--scenario prefill|stop|both] [--trees PATH[,PATH...]]
        [--prompt-tokens 3000] [--stream-tokens 120] [--stop-strings 100000] [--fallback-stop-strings 32] [--n 8]
        [--threads 0]

A "victim" stream (greedy, EOS banned, `--stream-tokens` tokens on the default SmolLM2 GGUF) is timed alone, then
again while a second request runs beside it, started once the stream has produced its first 10 tokens:
- `prefill`: a completion whose prompt has `--prompt-tokens` tokens (max_tokens 1): the stream's largest gap
  between two tokens while that prompt is prefilled is the figure (the scheduler's bound is one step of at most
  `max_num_batched_tokens` tokens).
- `stop`: a request with `--stop-strings` stop strings of 8 characters and `n = --n` choices generating
  `--stream-tokens` tokens (when the engine refuses that many, the refusal is shown and `--fallback-stop-strings`
  are used instead).
Each measurement runs in its own subprocess with a fresh Runner (prefix caching off). `--trees` runs the same
measurements against other checkouts of the package (e.g. an export of the commit before a fix) one after the
other, so before/after figures come from one run on the same machine; a tree is put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP_TOKENS = 10


def _runner(threads: int):
    from mistralrs import ModelDType, Runner, Which
    from mistralrs.loader.default_model import default_model_path

    if threads:
        import torch
        torch.set_num_threads(threads)
    path = default_model_path()
    return Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                             dtype=ModelDType.F32), prefix_cache_n=0, show_progress=False)


def _stream_times(runner, prompt: str, max_tokens: int, no_eos: dict, started: threading.Event | None) -> list[float]:
    """Monotonic time of every streamed chunk of a greedy completion; sets `started` after WARMUP_TOKENS."""
    from mistralrs import CompletionRequest

    times = []
    for _chunk in runner.send_completion_request(CompletionRequest(
            prompt=prompt, model="m", max_tokens=max_tokens, temperature=0.0, logit_bias=no_eos, stream=True)):
        times.append(time.monotonic())
        if started is not None and len(times) == WARMUP_TOKENS:
            started.set()
    return times


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def _aggressor(args, runner, no_eos: dict, tag: int):
    """The request that runs beside the stream: returns (description, callable sending it)."""
    from bench_common import prompt_of
    from mistralrs import CompletionRequest

    if args.scenario == "prefill":
        text = f"{tag} " + prompt_of(lambda t: runner.tokenize_text(t, False), args.prompt_tokens)
        request = CompletionRequest(prompt=text, model="m", max_tokens=1, temperature=0.0)
        return f"prompt of {len(runner.tokenize_text(text, False))} tokens", lambda: runner.send_completion_request(
            request)
    count, refused = args.stop_strings, None
    while True:
        stops = [f"~{i:06d}#" for i in range(count)]   # 8 characters that the model will not write
        request = CompletionRequest(prompt="Write a long story.", model="m", max_tokens=args.stream_tokens,
                                    temperature=0.0, logit_bias=no_eos, n_choices=args.n, stop_seqs=stops)
        try:
            runner.llm_engine.abort(runner.submit_completion(request).request_id)
        except ValueError as exc:
            if refused:
                raise
            refused, count = f"{count} refused ({exc})", args.fallback_stop_strings
            continue
        label = f"{count} stop strings, n={args.n}" + (f" [{refused}]" if refused else "")
        return label, lambda: runner.send_completion_request(request)


def measure(args) -> dict:
    """One subprocess: the stream alone, then beside the aggressor."""
    runner = _runner(args.threads)
    no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}
    prompt = "Once upon a time"
    _stream_times(runner, prompt, 8, no_eos, None)   # warm-up
    t0 = time.monotonic()
    alone = _stream_times(runner, prompt, args.stream_tokens, no_eos, None)
    alone_total = alone[-1] - t0
    label, send = _aggressor(args, runner, no_eos, tag=int(time.time()))
    started, span = threading.Event(), {}

    def run_aggressor():
        started.wait()
        span["start"] = time.monotonic()
        send()
        span["end"] = time.monotonic()

    thread = threading.Thread(target=run_aggressor)
    thread.start()
    t0 = time.monotonic()
    beside = _stream_times(runner, prompt, args.stream_tokens, no_eos, started)
    beside_total = beside[-1] - t0
    thread.join()
    during = [t for t in beside if span["start"] <= t <= span["end"]]
    gaps_during = _gaps([max(t for t in beside if t <= span["start"])] + during) if during else []
    runner.close()
    return {"aggressor": label, "alone_s": alone_total, "alone_max_gap_s": max(_gaps(alone)),
            "alone_median_gap_s": statistics.median(_gaps(alone)), "beside_s": beside_total,
            "beside_max_gap_s": max(_gaps(beside)), "aggressor_s": span["end"] - span["start"],
            "tokens_during": len(during), "max_gap_during_s": max(gaps_during) if gaps_during else None}


def _run_tree(tree: str, scenario: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, HERE]), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--scenario", scenario,
           "--prompt-tokens", str(args.prompt_tokens), "--stream-tokens", str(args.stream_tokens),
           "--stop-strings", str(args.stop_strings), "--fallback-stop-strings", str(args.fallback_stop_strings),
           "--n", str(args.n), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="both", choices=["prefill", "stop", "both"])
    parser.add_argument("--trees", default=os.path.dirname(HERE),
                        help="comma-separated package checkouts to compare (default: this one)")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--stream-tokens", type=int, default=120)
    parser.add_argument("--stop-strings", type=int, default=100_000)
    parser.add_argument("--fallback-stop-strings", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    scenarios = ["prefill", "stop"] if args.scenario == "both" else [args.scenario]
    print("| scenario | tree | aggressor | stream alone (s) | max gap alone | stream beside (s) | max gap beside "
          "| aggressor (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in scenarios:
        for tree in args.trees.split(","):
            r = _run_tree(tree, scenario, args)
            print(f"| {scenario} | {tree} | {r['aggressor']} | {r['alone_s']:.2f} | {r['alone_max_gap_s']:.3f} | "
                  f"{r['beside_s']:.2f} | {r['beside_max_gap_s']:.3f} | {r['aggressor_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
