"""Tiny random Hugging Face models written to disk for the end-to-end tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
EOS_TOKEN_ID = len(CHARACTERS) + 2          # <|im_end|>


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (and newline) plus three special tokens.

    Every id sequence decodes to text that encodes back to the same ids, so tests can compare text.
    """
    vocab = {ch: i for i, ch in enumerate(CHARACTERS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def hf_config(arch: str, vocab_size: int):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=EOS_TOKEN_ID, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def make_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0):
    """Write a random model, its tokenizer and a ChatML template; return the transformers model (fp32, eval)."""
    import transformers

    tokenizer = char_tokenizer()
    config = hf_config(arch, tokenizer.get_vocab_size())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # larger logits than the default init, so that greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "chat_template": CHATML}))
    return model
