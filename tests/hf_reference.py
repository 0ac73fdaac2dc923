"""Reference continuations from `transformers` models, shared by the real-model tests."""

from __future__ import annotations

import torch


def hf_greedy_with_margin(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], float]:
    """Greedy continuation by full forward passes, and the smallest top-1/top-2 logit margin met on the way."""
    ids = list(prompt_ids)
    margin = float("inf")
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top2 = logits.topk(2).values
            margin = min(margin, float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], margin
