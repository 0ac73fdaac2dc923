"""Paged attention over packed tokens.

`PagedAttention.forward(q, k, v, fb)` first writes the new K/V of every token into this layer's cache at
`fb.slot_mapping`, then attends each sequence's queries to its whole context read back through its block table.

Two implementations of the same math, chosen by `fb.attention_backend`:
- "sdpa": one gather of all contexts into `[num_seqs, kv_heads, max_context_len, head_dim]`, queries scattered
  into `[num_seqs, heads, max_query_len, head_dim]`, one `scaled_dot_product_attention` call with a boolean
  mask cached per sliding window on the ForwardBatch, and a gather back to the packed axis. When no padding is
  needed (all chunks equally long: a pure decode step, or a single sequence) the scatter/gather are plain
  views, and a single decoding sequence outside any window runs without a mask.
- "reference": a loop over sequences with explicit float32 math and slots computed from the block tables
  (the plain twin that tests compare the fast path against).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mistralrs.worker.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """Multi-head / grouped-query attention reading and writing layer `layer_idx` of the paged KV cache.

    Args:
        num_heads: query heads.
        num_kv_heads: key/value heads (divides num_heads; GQA when smaller).
        head_dim: features per head.
        layer_idx: which entry of `fb.kv_caches` this layer owns.
        scale: softmax scale (usually head_dim ** -0.5).
        sliding_window: keys older than this many positions are not attended (None: full attention).
        logit_softcap: when set, scores become `softcap * tanh(scores / softcap)` before masking (Gemma 2).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        layer_idx: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """Writes k/v to the cache, then attends.

        q `[num_tokens, num_heads, head_dim]`, k/v `[num_tokens, num_kv_heads, head_dim]`
        -> `[num_tokens, num_heads * head_dim]`.
        """
        k_cache, v_cache = fb.kv_caches[self.layer_idx]
        if fb.attention_backend == "reference":
            return paged_attention_reference(q, k, v, k_cache, v_cache, fb, self.scale, self.sliding_window,
                                             self.logit_softcap)
        k_cache.index_copy_(0, fb.slot_mapping, k)
        v_cache.index_copy_(0, fb.slot_mapping, v)
        return self._batched(q, k_cache, v_cache, fb)

    def _batched(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 fb: ForwardBatch) -> torch.Tensor:
        num_seqs, max_q, max_ctx = fb.num_seqs, fb.max_query_len, fb.max_context_len
        kv_shape = (num_seqs, max_ctx, self.num_kv_heads, self.head_dim)
        keys = fb.gather_contexts(k_cache).view(kv_shape).transpose(1, 2)
        values = fb.gather_contexts(v_cache).view(kv_shape).transpose(1, 2)
        if fb.query_pad_indices is not None:
            padded = q.new_zeros(num_seqs * max_q, self.num_heads, self.head_dim)
            q = padded.index_copy_(0, fb.query_pad_indices, q)
        queries = q.view(num_seqs, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        mask = fb.attention_mask(self.sliding_window)
        if self.logit_softcap is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            out = _softcapped_attention(queries, keys, values, mask, self.scale, self.logit_softcap)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, self.num_heads * self.head_dim)
        if fb.query_pad_indices is not None:
            out = out.index_select(0, fb.query_pad_indices)
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layer={self.layer_idx}, window={self.sliding_window}, softcap={self.logit_softcap}")


def _softcapped_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    scale: float, softcap: float,
) -> torch.Tensor:
    """Explicit attention with tanh logit soft-capping; same layouts as `scaled_dot_product_attention`."""
    group = queries.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def paged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    fb: ForwardBatch,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Plain per-sequence paged attention: writes K/V by block table, then float32 softmax attention.

    Reads only the Python-side metadata of `fb` (query offsets, context lengths, block tables), so it checks
    the fast path's precomputed slots and gather indices independently.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    bs = fb.block_size
    outputs = []
    for s, (ctx_len, table) in enumerate(zip(fb.context_lens, fb.block_tables)):
        begin, end = fb.query_start_locs[s], fb.query_start_locs[s + 1]
        start_pos = ctx_len - (end - begin)
        new_slots = [table[p // bs] * bs + p % bs for p in range(start_pos, ctx_len)]
        k_cache[new_slots] = k[begin:end]
        v_cache[new_slots] = v[begin:end]
        context_slots = [table[p // bs] * bs + p % bs for p in range(ctx_len)]
        keys = k_cache[context_slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = v_cache[context_slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[begin:end].float(), keys) * scale  # [heads, q_len, ctx_len]
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        query_pos = torch.arange(start_pos, ctx_len).unsqueeze(1)
        key_pos = torch.arange(ctx_len).unsqueeze(0)
        allowed = key_pos <= query_pos
        if fb.bidirectional_blocks is not None:  # the chunk's keys are its queries: the last end - begin positions
            query_blocks = fb.bidirectional_blocks[begin:end].cpu()
            key_blocks = torch.cat([torch.full((start_pos,), -1, dtype=query_blocks.dtype), query_blocks])
            allowed = allowed | ((query_blocks[:, None] == key_blocks[None, :]) & (query_blocks[:, None] >= 0))
        if sliding_window is not None:
            allowed = allowed & (key_pos > query_pos - sliding_window)
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)
        outputs.append(out.reshape(end - begin, num_heads * q.shape[2]))
    return torch.cat(outputs).to(q.dtype)
