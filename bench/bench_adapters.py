"""Decode cost of LoRA and X-LoRA adapters on SmolLM2-135M (GGUF Q4_1 base, kept quantized).

Random PEFT adapters of SmolLM2's shapes on all seven projections of every layer are written to a work
directory (no download), then single-stream greedy decode tokens/s over `--n-decode` tokens is measured, in one
process, for:
- the bare base (`Which.GGUF`);
- one active LoRA adapter of rank 8 and of rank 64 (`Which.LoraGGUF`; adapters on a quantized base stay separate);
- X-LoRA over two rank-8 adapters with a random classifier (`Which.XLoraGGUF`: a scaling pass, then the real pass).
Prints one JSON line per configuration with its ratio to the base. Example:
    python bench/bench_adapters.py --threads 2 --work-dir /tmp/adapter_bench
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

PROJECTIONS = {  # PEFT module name -> (in_features, out_features) for SmolLM2-135M
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
NUM_LAYERS, HIDDEN = 30, 576


def write_adapter(path: str, rank: int, seed: int) -> None:
    """A PEFT-layout LoRA adapter with random A and B (alpha = 2 * rank)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(NUM_LAYERS):
        for module, (fan_in, fan_out) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * fan_in**-0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, peft_type="LORA", task_type="CAUSAL_LM",
                  target_modules=sorted({m.split(".")[-1] for m in PROJECTIONS}))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def write_xlora(path: str, adapters_dir: str, names: list[str], base_model_id: str) -> None:
    """The reference's X-LoRA layout: config, a one-layer random classifier and the adapter folders."""
    import shutil
    generator = torch.Generator().manual_seed(7)
    os.makedirs(path, exist_ok=True)
    save_file({"last.weight": torch.randn(len(names), HIDDEN, generator=generator) * HIDDEN**-0.5,
               "last.bias": torch.zeros(len(names))}, os.path.join(path, "xlora_classifier.safetensors"))
    config = dict(hidden_size=HIDDEN, base_model_id=base_model_id, adapters=names, xlora_depth=1,
                  layerwise_scalings=False, enable_softmax=True, softmax_temperature=1.0, use_bias=True)
    with open(os.path.join(path, "xlora_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    for name in names:
        shutil.copytree(os.path.join(adapters_dir, name), os.path.join(path, name), dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-decode", type=int, default=128)
    parser.add_argument("--work-dir", default="/tmp/mistralrs_adapter_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_common import (
        runner_decode_tps,  # this folder is on sys.path when run as a script
    )
    from bench_gpu import make_tokenizer_dir

    from mistralrs import Which
    from mistralrs.loader.default_model import default_model_path

    gguf = default_model_path()
    work = args.work_dir
    tok_dir, adapters = os.path.join(work, "tokenizer"), os.path.join(work, "adapters")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        make_tokenizer_dir(tok_dir)
    for name, rank, seed in (("r8", 8, 1), ("r64", 64, 2), ("r8b", 8, 3)):
        if not os.path.exists(os.path.join(adapters, name)):
            write_adapter(os.path.join(adapters, name), rank, seed)
    write_xlora(os.path.join(work, "xlora"), adapters, ["r8", "r8b"], tok_dir)
    gguf_args = dict(quantized_model_id=os.path.dirname(gguf), quantized_filename=os.path.basename(gguf))

    def ordering(order: list[str]) -> str:
        path = os.path.join(work, f"ordering_{'_'.join(order)}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"base_model_id": tok_dir, "order": order}, f)
        return path

    configs = {
        "base": Which.GGUF(**gguf_args),
        "lora r8": Which.LoraGGUF(**gguf_args, tok_model_id=tok_dir, adapters_model_id=adapters, order=ordering(["r8"])),
        "lora r64": Which.LoraGGUF(**gguf_args, tok_model_id=tok_dir, adapters_model_id=adapters,
                                   order=ordering(["r64"])),
        "x-lora 2 x r8": Which.XLoraGGUF(**gguf_args, tok_model_id=tok_dir, xlora_model_id=os.path.join(work, "xlora"),
                                         order=ordering(["r8", "r8b"])),
    }
    base = None
    for name, which in configs.items():
        start = time.perf_counter()
        tps = runner_decode_tps(which, args.n_decode)
        base = base or tps
        print(json.dumps(dict(config=name, decode_tps=round(tps, 1), ratio_to_base=round(tps / base, 3),
                              wall_s=round(time.perf_counter() - start, 1))), flush=True)


if __name__ == "__main__":
    main()
