"""One engine's measurements for bench_smollm2.py; prints one JSON line. Run by bench_smollm2.py."""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

from bench_common import prompt_of  # this folder is on sys.path when run as a script

EOS_STRINGS = ("<|im_end|>", "<|endoftext|>", "<eos>", "<end_of_turn>")  # SmolLM2's and Gemma's end tokens


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_mistralrs_api(model: str, threads: int, dtype: str, n_prompt: int, n_decode: int, n_conc: int,
                        reference: bool) -> dict:
    """This engine, or the reference `mistralrs` wheel: both are driven through the same 0.5.0 Python API."""
    import os

    from mistralrs import CompletionRequest, ModelDType, Runner, Which

    if not reference:
        import torch

        from mistralrs.layers.fused_decode import EXTENSION

        torch.set_num_threads(threads)
        EXTENSION.get(wait=True)  # its one-off compile (cached afterwards) stays out of the timings
    which = Which.GGUF(quantized_model_id=os.path.dirname(model), quantized_filename=os.path.basename(model),
                       dtype=ModelDType.Auto if reference else ModelDType.from_str(dtype))
    start = time.perf_counter()
    runner = Runner(which, prefix_cache_n=0) if reference else Runner(which, prefix_cache_n=0, show_progress=False)
    load_s = time.perf_counter() - start
    eos = [ids[0] for ids in (runner.tokenize_text(t, False) for t in EOS_STRINGS) if len(ids) == 1]
    no_eos = {t: -100.0 for t in eos}   # the reference ignores logit_bias, so its runs may stop early
    prompt = prompt_of(lambda t: runner.tokenize_text(t, False), n_prompt)

    def complete(text: str, max_tokens: int):
        return runner.send_completion_request(CompletionRequest(
            prompt=text, model="m", max_tokens=max_tokens, temperature=0.0, logit_bias=no_eos))

    complete("Warm up the engine.", 4)
    usage = complete(prompt, 1).usage
    prompt_tps = usage.prompt_tokens / usage.total_prompt_time_sec
    usage = complete("Once upon a time", n_decode).usage
    decode_tps = usage.completion_tokens / usage.total_completion_time_sec
    counts = []

    def worker(i: int) -> None:
        counts.append(complete(f"Story number {i}: once upon a time", n_decode).usage.completion_tokens)

    threads_ = [threading.Thread(target=worker, args=(i,)) for i in range(n_conc)]
    start = time.perf_counter()
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    aggregate_tps = sum(counts) / (time.perf_counter() - start)
    return dict(load_s=load_s, prompt_tps=prompt_tps, decode_tps=decode_tps, aggregate_tps=aggregate_tps,
                peak_rss_mb=peak_rss_mb())


def bench_llama_cpp(model: str, threads: int, n_prompt: int, n_decode: int, n_conc: int) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - start
    no_eos = {llm.token_eos(): -100.0}
    prompt = prompt_of(lambda t: llm.tokenize(t.encode(), add_bos=False), n_prompt)
    tokens = llm.tokenize(prompt.encode(), add_bos=False)
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    prompt_tps = len(tokens) / (time.perf_counter() - start)
    llm.reset()
    short = llm.tokenize(b"Once upon a time", add_bos=False)
    llm.eval(short)
    start = time.perf_counter()
    out = llm.create_completion("Once upon a time", max_tokens=n_decode, temperature=0.0, logit_bias=no_eos)
    decode_tps = out["usage"]["completion_tokens"] / (time.perf_counter() - start)
    # llama-cpp-python's high-level API serves one sequence at a time: 8 requests run back to back.
    start = time.perf_counter()
    total = 0
    for i in range(n_conc):
        out = llm.create_completion(f"Story number {i}: once upon a time", max_tokens=n_decode, temperature=0.0,
                                    logit_bias=no_eos)
        total += out["usage"]["completion_tokens"]
    aggregate_tps = total / (time.perf_counter() - start)
    return dict(load_s=load_s, prompt_tps=prompt_tps, decode_tps=decode_tps, aggregate_tps=aggregate_tps,
                peak_rss_mb=peak_rss_mb())


def main() -> None:
    engine, model, threads, dtype, n_prompt, n_decode, n_conc = sys.argv[1:8]
    threads, n_prompt, n_decode, n_conc = int(threads), int(n_prompt), int(n_decode), int(n_conc)
    if engine in ("ours", "reference"):
        result = bench_mistralrs_api(model, threads, dtype, n_prompt, n_decode, n_conc, engine == "reference")
    elif engine == "llama.cpp":
        result = bench_llama_cpp(model, threads, n_prompt, n_decode, n_conc)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
