"""One engine's measurements for bench_smollm2.py; prints one JSON line. Run by bench_smollm2.py."""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

from bench_common import prompt_of  # this folder is on sys.path when run as a script

EOS_STRINGS = ("<|im_end|>", "<|endoftext|>", "<eos>", "<end_of_turn>")  # SmolLM2's and Gemma's end tokens


def story_prompt(i: int) -> str:
    """The prompt of stream `i` of the concurrent case (every engine gets the same ones)."""
    return f"Story number {i}: once upon a time"


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
        counts.append(complete(story_prompt(i), n_decode).usage.completion_tokens)

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
        out = llm.create_completion(story_prompt(i), max_tokens=n_decode, temperature=0.0, logit_bias=no_eos)
        total += out["usage"]["completion_tokens"]
    aggregate_tps = total / (time.perf_counter() - start)
    peak = peak_rss_mb()  # before the batched run's own context (its KV cache for n_conc sequences)
    batched_tps = llama_cpp_batched_tps(llm, threads, n_decode, n_conc)
    return dict(load_s=load_s, prompt_tps=prompt_tps, decode_tps=decode_tps, aggregate_tps=aggregate_tps,
                batched_tps=batched_tps, peak_rss_mb=peak, batched_peak_rss_mb=peak_rss_mb())


def llama_cpp_batched_tps(llm, threads: int, n_decode: int, n_conc: int) -> float:
    """llama.cpp decoding `n_conc` sequences together, as its own `batched` example does: a second context on the
    loaded model with a KV cache per sequence, the prompts of the 8-stream case prefilled in one `llama_batch`
    (each token under its sequence's id), then one `llama_decode` per step over a batch holding every sequence's
    next token; greedy through a sampler chain (EOS banned as in the other runs), `n_decode` tokens each.
    Returns the aggregate tokens/s from the prefill to the last token."""
    import llama_cpp

    prompts = [llm.tokenize(story_prompt(i).encode()) for i in range(n_conc)]
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_conc * (max(map(len, prompts)) + n_decode)
    params.n_batch = params.n_ubatch = max(sum(map(len, prompts)), n_conc)
    params.n_seq_max = n_conc
    params.kv_unified = False  # a cache per sequence: llama.cpp's advice for sequences that share no prefix
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bias = (llama_cpp.llama_logit_bias * 1)()
    bias[0].token, bias[0].bias = llama_cpp.llama_vocab_eos(vocab), -100.0
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_logit_bias(
        llama_cpp.llama_vocab_n_tokens(vocab), 1, bias))
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        start = time.perf_counter()
        decode([(token, pos, seq, pos == len(prompt) - 1)
                for seq, prompt in enumerate(prompts) for pos, token in enumerate(prompt)])
        rows = [sum(map(len, prompts[:seq + 1])) - 1 for seq in range(n_conc)]  # each prompt's last token
        positions = [len(prompt) for prompt in prompts]
        for step in range(n_decode):
            tokens = [llama_cpp.llama_sampler_sample(sampler, ctx, row) for row in rows]
            if step == n_decode - 1:
                break
            decode([(token, positions[seq] + step, seq, True) for seq, token in enumerate(tokens)])
            rows = list(range(n_conc))
        return n_conc * n_decode / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


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
