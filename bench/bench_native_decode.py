"""The fused decoder layer's native decode step against its ATen-call twin, interleaved in one process.

    .venv/bin/python bench/bench_native_decode.py [--model smollm2|gemma3|FILE.gguf] [--threads 2] [--rounds 6]
        [--prompt-tokens N]

1. The model forward of one single-stream decode step (decoder layers, embedding, final norm; no LM head) at
   contexts of 16, 128, 512 and 2048 tokens: per round, `ExecutionOptions.native_decode` on and off in turn (the order
   alternating), each the fastest of 20 repeated forwards of the same step; printed as the fastest over the rounds.
2. Single-stream greedy decode through a Runner (bench_smollm2.py's 128 tokens, EOS banned), native on and off in
   turn per round: median tok/s of each. The prompt is "Once upon a time", or with --prompt-tokens N a text of
   about N tokens (decode at a long context; tok/s counts the decode steps only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXTS = (16, 128, 512, 2048)
BLOCK_SIZE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="a prompt of about this many tokens")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    import torch

    from bench_smollm2 import model_path
    from mistralrs.layers.fused_decode import EXTENSION

    torch.set_num_threads(args.threads)
    if EXTENSION.get(wait=True) is None:
        raise SystemExit("the fused decode extension could not be built (see the warning above)")
    model = model_path(args.model)
    print(f"{os.path.basename(model)}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    forward_times(model, args.rounds)
    decode_tps(model, args.rounds, args.prompt_tokens)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def forward_times(model_file: str, rounds: int) -> None:
    import torch

    from mistralrs import ModelDType, Which
    from mistralrs.api.load_spec import load_spec
    from mistralrs.loader.pipeline import load
    from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
    from mistralrs.worker.options import ExecutionOptions, apply_execution_options

    which = Which.GGUF(quantized_model_id=os.path.dirname(model_file),
                       quantized_filename=os.path.basename(model_file), dtype=ModelDType.BF16)
    model = load(load_spec(which, show_progress=False)).model
    blocks = list(range(max(CONTEXTS) // BLOCK_SIZE + 1))
    kv = allocate_kv_caches(model.kv_cache_spec(), len(blocks), BLOCK_SIZE, model.dtype, "cpu")
    with torch.inference_mode():
        model(*_inputs(ForwardBatch.build([SeqChunk(list(range(1, max(CONTEXTS))), 0, blocks)],
                                          BLOCK_SIZE, kv, "cpu")))
        print("| context | forward, ATen calls (ms) | forward, native (ms) | ATen / native |")
        print("|---|---|---|---|")
        for context in CONTEXTS:
            batch = ForwardBatch.build([SeqChunk([7], context - 1, blocks)], BLOCK_SIZE, kv, "cpu")
            best = {True: float("inf"), False: float("inf")}
            for i in range(rounds):
                for native in ((True, False) if i % 2 == 0 else (False, True)):
                    apply_execution_options(model, ExecutionOptions(native_decode=native))
                    for _ in range(20):
                        start = time.perf_counter()
                        model(*_inputs(batch))
                        best[native] = min(best[native], time.perf_counter() - start)
            print(f"| {context} | {best[False] * 1e3:.2f} | {best[True] * 1e3:.2f} | "
                  f"{best[False] / best[True]:.2f}x |")


def _inputs(batch):
    return batch.input_ids, batch.positions, batch


def decode_tps(model_file: str, rounds: int, prompt_tokens: int) -> None:
    from bench_smollm2 import DECODE_TOKENS
    from mistralrs import CompletionRequest, ModelDType, Runner, Which
    from mistralrs.worker.options import ExecutionOptions, apply_execution_options

    os.environ["MISTRALRS_CPU_THREADS"] = "auto"  # the engine as the CLI and the server run it
    which = Which.GGUF(quantized_model_id=os.path.dirname(model_file),
                       quantized_filename=os.path.basename(model_file), dtype=ModelDType.BF16)
    runner = Runner(which, prefix_cache_n=0, show_progress=False)
    no_eos = {t: -100.0 for t in runner.llm_engine._loaded.tokenizer.eos_token_ids}
    prompt = "Once upon a time"
    if prompt_tokens > 0:
        tokenizer = runner.llm_engine._loaded.tokenizer.tokenizer
        sentence = "The old lighthouse keeper counted the ships that passed the harbour every night. "
        prompt = sentence * max(1, prompt_tokens // len(tokenizer.encode(sentence).ids))
        print(f"prompt of {len(tokenizer.encode(prompt).ids)} tokens")

    def tps(native: bool) -> float:
        apply_execution_options(runner.llm_engine._loaded.model, ExecutionOptions(native_decode=native))
        usage = runner.send_completion_request(CompletionRequest(
            prompt=prompt, model="m", max_tokens=DECODE_TOKENS, temperature=0.0,
            logit_bias=no_eos)).usage
        return usage.completion_tokens / usage.total_completion_time_sec

    tps(True)  # warm-up
    runs: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for native in ((True, False) if i % 2 == 0 else (False, True)):
            runs[native].append(tps(native))
    runner.close()
    aten, native = (statistics.median(runs[k]) for k in (False, True))
    print(f"decode tok/s (median of {rounds}): ATen calls {aten:.1f}, native {native:.1f}, native / ATen "
          f"{native / aten:.2f}x")


if __name__ == "__main__":
    main()
