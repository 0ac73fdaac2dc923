"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over packed tokens and a paged cache of compressed latents.

Per token the cache holds one row `[kv_lora_rank normalized latent ++ qk_rope_head_dim roped key]` (the model
declares it as `KVCacheSpec(num_kv_heads=1, head_dim=kv_lora_rank + qk_rope_head_dim, v_head_dim=0)`), not
per-head K and V. `kv_b_proj` (`[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`) turns a latent into
each head's non-rotary key part and its value.

Three implementations of the same math:
- absorbed (fast path, `fb.attention_backend == "sdpa"` and `absorb` set, dense `kv_b_proj`): the key up-projection
  is folded into the queries (`q_nope @ W_uk` gives a query in latent space), all heads attend to the one shared
  latent "head" `[latent ++ k_pe]` with value `latent`, and the value up-projection `W_uv` is applied to the
  attention output. Nothing per head is ever built over the context.
- decompressed (`absorb` unset or a quantized `kv_b_proj`): the gathered contexts are decompressed into per-head K/V
  every step and attended with one `scaled_dot_product_attention` call.
- reference (`fb.attention_backend == "reference"`): per-sequence float32 loop with slots computed from the block
  tables, decompressing like `transformers` does (the plain twin the tests compare against).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mistralrs.layers.linear import Linear
    from mistralrs.worker.forward_batch import ForwardBatch


class MultiHeadLatentAttention(nn.Module):
    """Attention over the compressed-latent paged cache of layer `layer_idx` (see the module docstring).

    Args:
        num_heads: query heads.
        qk_nope_head_dim: per-head query/key features without position (the part `kv_b_proj` decompresses).
        qk_rope_head_dim: per-head rotary query features; the rotary key is shared by all heads.
        v_head_dim: per-head value features.
        kv_lora_rank: width of the cached latent.
        layer_idx: which entry of `fb.kv_caches` this layer owns.
        scale: softmax scale.
    """

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 kv_lora_rank: int, *, layer_idx: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.layer_idx = layer_idx
        self.scale = scale
        self.absorb = True  # switch: absorbed fast path (True) or per-step decompression (False) on "sdpa"

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                kv_b_proj: Linear, fb: ForwardBatch) -> torch.Tensor:
        """Writes `[latent ++ k_pe]` to the cache at `fb.slot_mapping`, then attends.

        q_nope `[num_tokens, num_heads, qk_nope_head_dim]`, q_pe `[num_tokens, num_heads, qk_rope_head_dim]` (roped),
        latent `[num_tokens, kv_lora_rank]` (normalized), k_pe `[num_tokens, qk_rope_head_dim]` (roped)
        -> `[num_tokens, num_heads * v_head_dim]`.
        """
        cache = fb.kv_caches[self.layer_idx][0]  # [num_slots, 1, kv_lora_rank + qk_rope_head_dim]
        entries = torch.cat((latent, k_pe), dim=-1).unsqueeze(1)  # [num_tokens, 1, kv_lora_rank + rope]
        if fb.attention_backend == "reference":
            return self._reference(q_nope, q_pe, entries, cache, kv_b_proj, fb)
        cache.index_copy_(0, fb.slot_mapping, entries.to(cache.dtype))
        contexts = fb.gather_contexts(cache).squeeze(1)  # [num_seqs * max_ctx, lora + rope]
        w_kv_b = kv_b_proj.quant_method.dense_weight(kv_b_proj)
        if self.absorb and w_kv_b is not None:
            return self._absorbed(q_nope, q_pe, contexts, w_kv_b, fb)
        return self._decompressed(q_nope, q_pe, contexts, kv_b_proj, fb)

    def _pad_queries(self, q: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """`[num_tokens, heads, d]` -> `[num_seqs, heads, max_query_len, d]` (padding rows zero)."""
        if fb.query_pad_indices is not None:
            padded = q.new_zeros(fb.num_seqs * fb.max_query_len, *q.shape[1:])
            q = padded.index_copy_(0, fb.query_pad_indices, q)
        return q.view(fb.num_seqs, fb.max_query_len, *q.shape[1:]).transpose(1, 2)

    def _unpad(self, out: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """`[num_seqs, heads, max_query_len, d]` -> `[num_tokens, heads, d]`."""
        heads, dim = out.shape[1], out.shape[-1]
        out = out.transpose(1, 2).reshape(fb.num_seqs * fb.max_query_len, heads, dim)
        if fb.query_pad_indices is not None:
            out = out.index_select(0, fb.query_pad_indices)
        return out

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, contexts: torch.Tensor, w_kv_b: torch.Tensor,
                  fb: ForwardBatch) -> torch.Tensor:
        w_kv_b = w_kv_b.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv_b.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)  # [num_tokens, heads, kv_lora_rank]
        queries = self._pad_queries(torch.cat((q_latent, q_pe), dim=-1), fb)
        keys = contexts.view(fb.num_seqs, 1, fb.max_context_len, contexts.shape[-1])  # one shared latent head
        values = keys[..., : self.kv_lora_rank]
        out = F.scaled_dot_product_attention(queries, keys.expand(-1, self.num_heads, -1, -1),
                                             values.expand(-1, self.num_heads, -1, -1),
                                             attn_mask=fb.attention_mask(None), scale=self.scale)
        out_latent = self._unpad(out, fb)  # [num_tokens, heads, kv_lora_rank]
        out = torch.einsum("thr,hvr->thv", out_latent, w_uv)
        return out.reshape(out.shape[0], self.num_heads * self.v_head_dim)

    def _decompress(self, latents: torch.Tensor, kv_b_proj: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """`[n, kv_lora_rank]` -> (k_nope `[n, heads, qk_nope_head_dim]`, v `[n, heads, v_head_dim]`)."""
        kv = kv_b_proj(latents).view(latents.shape[0], self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def _decompressed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, contexts: torch.Tensor, kv_b_proj: Linear,
                      fb: ForwardBatch) -> torch.Tensor:
        k_nope, values = self._decompress(contexts[:, : self.kv_lora_rank], kv_b_proj)
        k_pe = contexts[:, None, self.kv_lora_rank:].expand(-1, self.num_heads, -1)
        shape = (fb.num_seqs, fb.max_context_len, self.num_heads)
        keys = torch.cat((k_nope, k_pe), dim=-1).view(*shape, -1).transpose(1, 2)
        values = values.reshape(*shape, self.v_head_dim).transpose(1, 2)
        queries = self._pad_queries(torch.cat((q_nope, q_pe), dim=-1), fb)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=fb.attention_mask(None),
                                             scale=self.scale)
        out = self._unpad(out, fb)
        return out.reshape(out.shape[0], self.num_heads * self.v_head_dim)

    def _reference(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, cache: torch.Tensor,
                   kv_b_proj: Linear, fb: ForwardBatch) -> torch.Tensor:
        """Plain per-sequence twin: writes by block table, decompresses, float32 softmax attention."""
        bs, rank = fb.block_size, self.kv_lora_rank
        queries = torch.cat((q_nope, q_pe), dim=-1)
        outputs = []
        for s, (ctx_len, table) in enumerate(zip(fb.context_lens, fb.block_tables)):
            begin, end = fb.query_start_locs[s], fb.query_start_locs[s + 1]
            start_pos = ctx_len - (end - begin)
            cache[[table[p // bs] * bs + p % bs for p in range(start_pos, ctx_len)]] = entries[begin:end].to(
                cache.dtype)
            context = cache[[table[p // bs] * bs + p % bs for p in range(ctx_len)]].squeeze(1)
            k_nope, values = self._decompress(context[:, :rank].to(q_nope.dtype), kv_b_proj)
            k_pe = context[:, None, rank:].to(k_nope.dtype).expand(-1, self.num_heads, -1)
            keys = torch.cat((k_nope, k_pe), dim=-1).float()
            scores = torch.einsum("qhd,khd->hqk", queries[begin:end].float(), keys) * self.scale
            allowed = torch.arange(ctx_len).unsqueeze(0) <= torch.arange(start_pos, ctx_len).unsqueeze(1)
            scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
            out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values.float())
            outputs.append(out.reshape(end - begin, self.num_heads * self.v_head_dim))
        return torch.cat(outputs).to(q_nope.dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, nope={self.qk_nope_head_dim}, rope={self.qk_rope_head_dim}, "
                f"v={self.v_head_dim}, kv_lora_rank={self.kv_lora_rank}, layer={self.layer_idx}, absorb={self.absorb}")
