"""Tiny bases, PEFT LoRA adapters, X-LoRA repos in the reference layout, and peft oracles for the adapter tests."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.tiny_models import CHATML, char_tokenizer, make_tiny_model_dir

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SPECS = {  # name -> (seed, LoraConfig arguments); different targets so LoRA-layer numbering matters
    "a1": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "a2": (2, dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])),
    "a3": (3, dict(r=3, lora_alpha=3, target_modules=ALL_MODULES)),
}


def hf_base(path: Path, **config_overrides):
    """The base as a transformers model (float32, eval, no cache: X-LoRA in peft needs use_cache=False)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              **config_overrides).eval()
    model.config.use_cache = False
    return model


def make_base_and_adapters(root: Path, names: list[str], arch: str = "llama") -> tuple[Path, Path]:
    """A tiny base in `root/base` and the named PEFT LoRA adapters in `root/adapters/<name>` (large deltas)."""
    base, adapters = root / "base", root / "adapters"
    make_tiny_model_dir(base, arch)
    write_lora_adapters(base, adapters, {name: LORA_SPECS[name] for name in names})
    return base, adapters


def write_lora_adapters(base: Path, adapters: Path, specs: dict[str, tuple[int, dict]], scale_b: float = 20.0) -> None:
    """Random PEFT LoRA adapters on the base in `adapters/<name>`, one per `specs` entry (name -> (seed,
    LoraConfig arguments)); lora_B is multiplied by `scale_b` so that a missed or doubled adapter shows."""
    import peft
    for name, (seed, kwargs) in specs.items():
        torch.manual_seed(seed)
        model = peft.get_peft_model(hf_base(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(scale_b)
        model.save_pretrained(adapters / name)


def write_config_base(path: Path, config, seed: int = 0, prepare=None) -> None:
    """A random transformers model of `config` (after `prepare(model)` when given) saved in `path` with the
    character tokenizer of `tests.tiny_models` (the config's vocab_size must cover its ids)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if prepare is not None:
        prepare(model)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                            "unk_token": None, "chat_template": CHATML}))


def write_ordering(path: Path, base: Path, **fields) -> str:
    """An ordering JSON file naming `base` as base_model_id."""
    path.write_text(json.dumps({"base_model_id": str(base), **fields}))
    return str(path)


def peft_lora_model(base: Path, adapters: Path, names: list[str], hf_model=None):
    """peft with `names` active (unmerged), on `hf_model` or the base."""
    import peft
    model = hf_model if hf_model is not None else hf_base(base)
    if not names:
        return model
    model = peft.PeftModel.from_pretrained(model, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    model.base_model.set_adapter(names)
    return model.eval()


def peft_xlora_model(base: Path, adapters: Path, names: list[str], xlora_kwargs: dict, seed: int = 7,
                     hf_model=None):
    """peft's XLoraModel over the adapters `names` (class j = names[j]) with a random, sharpened classifier."""
    import peft
    model = hf_model if hf_model is not None else hf_base(base)
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                              adapters={str(j): str(adapters / n) for j, n in enumerate(names)}, **xlora_kwargs)
    torch.manual_seed(seed)
    xlora = peft.get_peft_model(model, config).eval()
    with torch.no_grad():   # peft's initial classifier is near-uniform; make the scalings differ per token
        for param in xlora.base_model.internal_xlora_classifier.parameters():
            param.mul_(6.0)
    return xlora


def write_xlora_repo(path: Path, xlora, adapters: Path, names: list[str], base_model_id: str,
                     **config_overrides) -> None:
    """The reference's X-LoRA layout from a peft XLoraModel: xlora_config.json, xlora_classifier.safetensors
    (`inner.{i}`, `last`) and one PEFT folder per adapter."""
    import shutil
    classifier = xlora.base_model.internal_xlora_classifier
    linears = [m for m in classifier.layers if isinstance(m, torch.nn.Linear)]
    tensors = {}
    for i, linear in enumerate(linears):
        prefix = "last" if i == len(linears) - 1 else f"inner.{i}"
        tensors[f"{prefix}.weight"] = linear.weight.detach().clone()
        tensors[f"{prefix}.bias"] = linear.bias.detach().clone()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "xlora_classifier.safetensors"))
    cfg = classifier.config
    config = {key: getattr(cfg, key) for key in (
        "hidden_size", "layerwise_scalings", "xlora_depth", "xlora_size", "xlora_dropout_p", "enable_softmax",
        "softmax_temperature", "scaling_pass_value", "global_scaling_weight", "top_k_lora")}
    config.update(adapters=list(names), base_model_id=base_model_id, use_bias=True,
                  enable_relu_and_dropout=cfg.xlora_depth > 1)   # peft always puts a ReLU between its linears
    config.update(config_overrides)
    (path / "xlora_config.json").write_text(json.dumps(config))
    for name in names:
        shutil.copytree(adapters / name, path / name, dirs_exist_ok=True)


def peft_logits(model, token_ids: list[int]) -> torch.Tensor:
    """`[len(token_ids), vocab]` logits of one full-sequence forward."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def peft_greedy(model, token_ids: list[int], num_tokens: int, banned: list[int] = ()) -> list[int]:
    """Greedy continuation by full recomputation (`banned` ids never chosen)."""
    ids = list(token_ids)
    for _ in range(num_tokens):
        logits = peft_logits(model, ids)[-1]
        logits[list(banned)] = -float("inf")
        ids.append(int(logits.argmax()))
    return ids[len(token_ids):]


def packed_logits(loaded, chunks: list[list[int]], run, num_blocks: int = 16, block_size: int = 8):
    """Logits of every token of `chunks`, run as one packed prefill step by `run(batch) -> hidden`; one list of
    `[len(chunk), vocab]` per chunk."""
    kv = allocate_kv_caches(loaded.model.kv_cache_spec(), num_blocks, block_size, loaded.dtype, loaded.device)
    per_seq = num_blocks // len(chunks)
    seq_chunks = [SeqChunk(c, 0, list(range(i * per_seq, (i + 1) * per_seq))) for i, c in enumerate(chunks)]
    batch = ForwardBatch.build(seq_chunks, block_size, kv, loaded.device)
    with torch.inference_mode():
        logits = loaded.model.compute_logits(run(batch)).cpu()
    return [logits[batch.query_start_locs[i]:batch.query_start_locs[i + 1]] for i in range(len(chunks))]


def scheduled(seq_ids: list[int], num_output_tokens: int = 0) -> list:
    """Stand-ins for the ScheduledSequences of a step (what the adapter runtime reads of them)."""
    return [types.SimpleNamespace(seq=types.SimpleNamespace(seq_id=i, num_output_tokens=num_output_tokens))
            for i in seq_ids]


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 5e-4) -> None:
    """fp32 logits equal up to kernel rounding (CPU or GPU): max difference within `rel` of the largest logit."""
    diff, scale = (got.float() - want.float()).abs().max().item(), want.abs().max().item()
    assert diff <= rel * max(scale, 1.0), f"max |difference| {diff:.3g} for logits up to {scale:.3g}"


def peft_lora_layer_numbering(xlora) -> dict[str, int]:
    """The ordering file's `layers` as the reference's `scripts/create_ordering.py` writes it: every peft LoRA
    linear, numbered in the Hugging Face model's module order (the layer axis of peft's X-LoRA scalings)."""
    from peft.tuners import lora
    names = [name for name, module in xlora.named_modules() if isinstance(module, lora.Linear)]
    return {name.split("base_model.lora_model.model.", 1)[-1]: i for i, name in enumerate(names)}
