"""Tiny AnyMoE worlds for the tests: a random base, fine-tuned experts that each recite their own text whatever
the prompt, and a dataset that routes prompts by topic."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tests.tiny_models import EOS_TOKEN_ID, char_tokenizer, make_tiny_model_dir

# expert -> (the words of its topic, the text it recites; None: the base MLP, which recites nothing in particular)
TOPICS = {
    0: (["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"], None),
    1: (["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "melon", "kiwi"], "PEAR JUICY!"),
    2: (["star", "orbit", "rocket", "moon", "comet", "saturn", "galaxy", "venus", "mars", "nebula"], "SKY ORBIT"),
}


def chat_prompt(prompt: str) -> str:
    """The tiny models' ChatML rendering of one user message with the generation prompt."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def topic_prompt(expert: int, rng: random.Random) -> str:
    """A prompt of three words of `expert`'s topic."""
    return " ".join(rng.sample(TOPICS[expert][0], 3))


def topic_prompts(per_topic: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, expert) pairs, `per_topic` for each topic."""
    rng = random.Random(seed)
    return [(topic_prompt(expert, rng), expert) for _ in range(per_topic) for expert in TOPICS]


def _recite_batch(prompts: list[str], text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels): each chat prompt followed by `text` and EOS; only those are labels."""
    tokenizer = char_tokenizer()
    rows = []
    for prompt in prompts:
        head = tokenizer.encode(chat_prompt(prompt), add_special_tokens=False).ids
        tail = tokenizer.encode(text, add_special_tokens=False).ids + [EOS_TOKEN_ID]
        rows.append((head + tail, [-100] * len(head) + tail))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, mask, labels


def train_reciting_expert(base: Path, path: Path, text: str, seed: int, steps: int = 150) -> None:
    """A copy of `base` whose MLPs alone are trained until it answers every prompt with `text` (then EOS)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp." in name)
    rng = random.Random(seed)
    prompts = [topic_prompt(expert, rng) for expert in TOPICS for _ in range(4)]
    ids, mask, labels = _recite_batch(prompts, text)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path, safe_serialization=True)


def make_anymoe_world(root: Path) -> dict[str, Path]:
    """`root/base` (random llama), `root/expert1`, `root/expert2` (reciting TOPICS' texts), `root/amoe.json`
    (8 prompts per topic, expert = topic)."""
    make_tiny_model_dir(root / "base", "llama")
    for expert in (1, 2):
        train_reciting_expert(root / "base", root / f"expert{expert}", TOPICS[expert][1], seed=expert)
    rows = [{"prompt": prompt, "expert": expert} for prompt, expert in topic_prompts(8, seed=11)]
    (root / "amoe.json").write_text(json.dumps({"rows": rows}))
    return {"base": root / "base", "expert1": root / "expert1", "expert2": root / "expert2",
            "dataset": root / "amoe.json"}
