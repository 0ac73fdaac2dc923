"""Paged attention: the batched SDPA path equals the per-sequence reference, and both equal plain causal attention."""

from __future__ import annotations

import random

import pytest
import torch

from mistralrs.layers.attention import PagedAttention
from mistralrs.layers.rotary import RotaryEmbedding, apply_rotary
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec, SeqChunk, allocate_kv_caches

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 48

# (start_pos, num_new_tokens) per sequence; each case stresses one layout of the batched path.
CASES = {
    "single_prefill": [(0, 13)],
    "single_decode": [(17, 1)],
    "decode_batch": [(5, 1), (22, 1), (9, 1)],
    "equal_chunks": [(3, 4), (10, 4)],
    "mixed": [(0, 9), (14, 1), (6, 5), (0, 2)],
    "contiguous_prefill": [(0, 13)],   # consecutive blocks: the context is read as a view of the cache
    "contiguous_decode": [(17, 1)],
}


def _random_step(case: str, seed: int):
    """Random q/k/v plus chunks whose block tables are random, non-contiguous blocks; caches pre-filled."""
    gen = torch.Generator().manual_seed(seed)
    blocks = list(range(NUM_BLOCKS))
    if case.startswith("contiguous"):
        blocks.reverse()   # popped in order 3, 4, 5, ... after dropping the first three
        del blocks[-3:]
    else:
        random.Random(seed).shuffle(blocks)
    chunks = []
    for start, n in CASES[case]:
        needed = -(-(start + n) // BLOCK_SIZE) + 1  # one spare block: tables may be longer than needed
        table = [blocks.pop() for _ in range(needed)]
        chunks.append(SeqChunk(token_ids=[0] * n, start_pos=start, block_ids=table))
    num_tokens = sum(n for _, n in CASES[case])
    q = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    caches = allocate_kv_caches(spec, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
    for cache in caches[0]:
        cache.copy_(torch.randn(cache.shape, generator=gen))  # the "earlier" context and unrelated garbage
    return chunks, q, k, v, caches


def _run(chunks, q, k, v, caches, backend, **attn_kwargs):
    caches = [(k_c.clone(), v_c.clone()) for k_c, v_c in caches]
    fb = ForwardBatch.build(chunks, BLOCK_SIZE, caches, "cpu", attention_backend=backend)
    attn = PagedAttention(HEADS, KV_HEADS, HEAD_DIM, layer_idx=0, scale=HEAD_DIM**-0.5, **attn_kwargs)
    return attn(q, k, v, fb), caches, fb


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"logit_softcap": 2.0}, {"sliding_window": 64}])
def test_batched_equals_reference(case, options):
    chunks, q, k, v, caches = _random_step(case, seed=len(case))
    fast, fast_caches, fb = _run(chunks, q, k, v, caches, "sdpa", **options)
    slow, slow_caches, _ = _run(chunks, q, k, v, caches, "reference", **options)
    assert fast.shape == (q.shape[0], HEADS * HEAD_DIM)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for (fk, fv), (sk, sv) in zip(fast_caches, slow_caches):  # same slots written
        assert torch.equal(fk, sk) and torch.equal(fv, sv)
    assert fb.last_token_indices.tolist() == [loc - 1 for loc in fb.query_start_locs[1:]]
    assert (fb.contiguous_start is not None) == case.startswith("contiguous")


def test_reference_equals_plain_causal_attention():
    """Chunked prefill through the cache equals one causal SDPA over the whole sequence (GQA by repetition)."""
    gen = torch.Generator().manual_seed(7)
    total = 11
    q = torch.randn(total, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    group = HEADS // KV_HEADS
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(group, 0), v.transpose(0, 1).repeat_interleave(group, 0),
        is_causal=True,
    ).transpose(0, 1).reshape(total, HEADS * HEAD_DIM)
    for backend in ("reference", "sdpa"):
        caches = allocate_kv_caches(spec, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
        attn = PagedAttention(HEADS, KV_HEADS, HEAD_DIM, layer_idx=0, scale=HEAD_DIM**-0.5)
        table = [40, 3, 17]
        outs = []
        for a, b in ((0, 6), (6, 10), (10, 11)):
            chunk = SeqChunk(token_ids=[0] * (b - a), start_pos=a, block_ids=table)
            fb = ForwardBatch.build([chunk], BLOCK_SIZE, caches, "cpu", attention_backend=backend)
            outs.append(attn(q[a:b], k[a:b], v[a:b], fb))
        torch.testing.assert_close(torch.cat(outs), expected, atol=1e-5, rtol=1e-5)


def test_forward_batch_slots_and_masks():
    chunks = [SeqChunk([1, 2, 3], start_pos=2, block_ids=[7, 2]), SeqChunk([4], start_pos=0, block_ids=[5])]
    spec = KVCacheSpec(num_layers=2, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    caches = allocate_kv_caches(spec, 8, BLOCK_SIZE, torch.float32, "cpu")
    fb = ForwardBatch.build(chunks, BLOCK_SIZE, caches, "cpu")
    assert fb.input_ids.tolist() == [1, 2, 3, 4]
    assert fb.positions.tolist() == [2, 3, 4, 0]
    assert fb.slot_mapping.tolist() == [30, 31, 8, 20]
    assert fb.last_token_indices.tolist() == [2, 3]
    assert (fb.max_query_len, fb.max_context_len, fb.context_lens) == (3, 5, [5, 1])
    mask = fb.attention_mask(2)
    assert mask.shape == (2, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert mask[1, 0, 0].int().tolist() == [1, 0, 0, 0, 0]
    assert fb.attention_mask(2) is mask  # cached per window
    assert spec.bytes_per_block(BLOCK_SIZE, torch.bfloat16) == 2 * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2


def test_forward_batch_rejects_bad_chunks():
    caches = allocate_kv_caches(KVCacheSpec(1, KV_HEADS, HEAD_DIM), 4, BLOCK_SIZE, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"chunks\[0\]\.block_ids covers 4 tokens, needs 5"):
        ForwardBatch.build([SeqChunk([1], start_pos=4, block_ids=[0])], BLOCK_SIZE, caches, "cpu")
    with pytest.raises(ValueError, match=r"chunks\[1\]\.token_ids is empty"):
        ForwardBatch.build([SeqChunk([1], 0, [0]), SeqChunk([], 0, [1])], BLOCK_SIZE, caches, "cpu")
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        ForwardBatch.build([SeqChunk([1], 0, [0])], BLOCK_SIZE, caches, "cpu", attention_backend="flash")


def test_rotary_partial_and_scaled():
    rope = RotaryEmbedding(4, 10000.0, None, 128, device="cpu")
    x = torch.randn(3, 2, 6)
    positions = torch.tensor([0, 1, 5])
    cos, sin = rope.cos_sin(positions, torch.float32)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[0], x[0])  # position 0 is the identity
    assert torch.equal(out[..., 4:], x[..., 4:])  # features past rotary_dim pass through
    angle = 5 * (1.0 / 10000.0 ** (torch.arange(0, 4, 2).float() / 4))  # position 5, pairs (i, i + 2)
    x1, x2 = x[2, :, :2], x[2, :, 2:4]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    torch.testing.assert_close(out[2, :, :4], expected)
    linear = RotaryEmbedding(4, 10000.0, {"type": "linear", "factor": 4.0}, 128, device="cpu")
    torch.testing.assert_close(linear.inv_freq, rope.inv_freq / 4)
    with pytest.raises(ValueError, match="rope_scaling.factor is required"):
        RotaryEmbedding(4, 10000.0, {"rope_type": "llama3"}, 128, device="cpu")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.7, "mscale_all_dim": 1.0},
])
def test_rope_scaling_matches_transformers(scaling):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=2048,
                                      rope_parameters=dict(scaling, rope_theta=50000.0))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours = RotaryEmbedding(64, 50000.0, scaling, 2048, device="cpu")
    torch.testing.assert_close(ours.inv_freq, inv_freq, atol=0, rtol=0)
    assert ours.attention_factor == pytest.approx(attention_factor)
