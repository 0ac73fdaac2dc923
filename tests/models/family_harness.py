"""Shared checks for the per-family model tests: our packed/paged model against `transformers` (fp32, tiny random).

A test file builds tiny HF models (`build_pair`) and calls the `check_*` functions below, which drive our model
through a trivial block allocator that hands out shuffled (non-contiguous) blocks, one step at a time.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from collections.abc import Callable, Iterator

import torch
import transformers

from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options

ATOL = 1e-4  # fp32 logits tolerance against transformers
BLOCK_SIZE = 4
VOCAB_SIZE = 128
NUM_GREEDY_TOKENS = 32


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Runs the block with `num_threads` intra-op threads (tiny models run fastest, and steadiest on a busy
    machine, on one), then restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sharpen(model: torch.nn.Module, seed: int, norm_center: float = 1.0, embed_std: float = 0.15) -> None:
    """Re-initialise with larger weights than HF's 0.02 so attention is peaked and masking errors show.

    Norm weights become `norm_center + 0.1 * noise` (0 for Gemma's `1 + w` norms, 1 otherwise); biases 0.1 * noise;
    matrices 0.15 * noise, the embedding `embed_std` * noise (smaller where the model scales it up).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(norm_center + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                std = (embed_std if "embed_tokens" in name else 0.15) if param.dim() == 2 else 0.1
                param.copy_(std * torch.randn(param.shape, generator=gen))


def build_pair(config: transformers.PretrainedConfig, model_cls: type, path: str, seed: int = 0,
               norm_center: float = 1.0, embed_std: float = 0.15) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF reference model, our model loaded from the HF checkpoint saved under `path`)."""
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    sharpen(hf, seed=seed + 1, norm_center=norm_center, embed_std=embed_std)
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config_dict = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    ours = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu")
    return hf, ours


class TinyRunner:
    """Test driver: a trivial block allocator handing out shuffled (non-contiguous) blocks, one step at a time; the
    execution `options` are applied to the model and its steps as the model runner does."""

    def __init__(self, model, num_blocks: int = 64, seed: int = 0, options: ExecutionOptions = ExecutionOptions(),
                 dtype: torch.dtype = torch.float32):
        self.model = model
        apply_execution_options(model, options)
        self.kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, BLOCK_SIZE, dtype, "cpu")
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}
        self.options = options

    def step(self, work: list[tuple[int, list[int]]], prompt_lens: dict[int, int] | None = None) -> list[torch.Tensor]:
        """Runs one step over `(seq_id, new_token_ids)` pairs (`prompt_lens`: seq_id -> prompt length, as the engine
        passes it); returns each chunk's logits `[len, vocab]`."""
        chunks = []
        for seq_id, token_ids in work:
            table = self.block_tables.setdefault(seq_id, [])
            start = self.num_computed.get(seq_id, 0)
            while len(table) * BLOCK_SIZE < start + len(token_ids):
                table.append(self.free_blocks.pop())
            chunks.append(SeqChunk(token_ids=list(token_ids), start_pos=start, block_ids=list(table),
                                   prompt_len=(prompt_lens or {}).get(seq_id, 0)))
            self.num_computed[seq_id] = start + len(token_ids)
        fb = ForwardBatch.build(chunks, BLOCK_SIZE, self.kv_caches, "cpu", self.options.attention_backend)
        with torch.inference_mode():
            hidden = self.model(fb.input_ids, fb.positions, fb)
            logits = self.model.compute_logits(hidden)
            last = self.model.compute_logits(hidden[fb.last_token_indices])
        torch.testing.assert_close(last, logits[fb.last_token_indices], atol=1e-5, rtol=0)
        return list(logits.split(fb.query_lens))


def prompt(seed: int, length: int) -> list[int]:
    """Random token ids."""
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, token_ids: list[int], chunk_lens: list[int] | None = None) -> torch.Tensor:
    """`transformers` logits `[len(token_ids), vocab]`: one forward call, or one call per chunk over its cache
    (the reference where the math depends on the chunking, as LongRoPE's short/long choice does)."""
    with torch.inference_mode():
        if chunk_lens is None:
            return hf(torch.tensor([token_ids])).logits[0].float()
        cache = transformers.DynamicCache(config=hf.config)
        outs, start = [], 0
        for n in chunk_lens:
            outs.append(hf(torch.tensor([token_ids[start:start + n]]), cache=cache, use_cache=True).logits[0].float())
            start += n
        assert start == len(token_ids)
        return torch.cat(outs)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 logits equal within ATOL."""
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def check_one_chunk(hf, ours, length: int = 20) -> None:
    """A whole prompt in one step."""
    token_ids = prompt(1, length)
    (logits,) = TinyRunner(ours).step([(0, token_ids)])
    assert_close(logits, hf_logits(hf, token_ids))


def check_chunked_prefill_then_decode(hf, ours, chunk_sensitive: bool = False) -> None:
    """A 19-token prompt in three chunks, then token-by-token decode: equal to `transformers` over the whole prompt
    in one call, then one call per token (`chunk_sensitive`: the calls are made that way, over its cache)."""
    token_ids = prompt(2, 23)
    runner = TinyRunner(ours, seed=3)
    bounds = ((0, 7), (7, 12), (12, 19)) + tuple((i, i + 1) for i in range(19, 23))
    parts = [runner.step([(0, token_ids[a:b])], prompt_lens={0: 19})[0] for a, b in bounds]
    chunk_lens = [19, 1, 1, 1, 1] if chunk_sensitive else None
    assert_close(torch.cat(parts), hf_logits(hf, token_ids, chunk_lens))


def check_packed_sequences(hf, ours, chunk_sensitive: bool = False) -> None:
    """Three sequences of different lengths in one step, then two decodes and a prefill chunk in the next."""
    prompts = [prompt(10 + i, n) for i, n in enumerate((20, 7, 13))]
    runner = TinyRunner(ours, seed=4)
    prompt_lens = {s: len(p) for s, p in enumerate(prompts)}
    first = runner.step([(0, prompts[0][:16]), (1, prompts[1]), (2, prompts[2][:9])], prompt_lens)
    second = runner.step([(1, [5]), (0, prompts[0][16:17]), (2, prompts[2][9:])], prompt_lens)

    def ref(token_ids: list[int], chunk_lens: list[int]) -> torch.Tensor:
        return hf_logits(hf, token_ids, chunk_lens if chunk_sensitive else None)

    whole_first = hf_logits(hf, prompts[0])  # a prompt's chunks all equal the prompt's one-call forward
    assert_close(first[0], whole_first[:16])
    assert_close(first[1], ref(prompts[1], [7]))
    assert_close(first[2], ref(prompts[2][:9], [9]))
    assert_close(second[0], ref(prompts[1] + [5], [7, 1])[-1:])
    assert_close(second[1], whole_first[16:17])
    assert_close(second[2], ref(prompts[2], [9, 4])[9:])


def check_moe_backends_agree(ours) -> None:
    """The one MoE switch: the grouped path and the per-token twin give the same logits (ends on "fused")."""
    token_ids = prompt(7, 21)
    outs = []
    for backend in ("reference", "fused"):
        (logits,) = TinyRunner(ours, options=ExecutionOptions(moe_backend=backend)).step([(0, token_ids)])
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def check_reference_backend(ours) -> None:
    """The batched SDPA path equals the per-sequence float32 reference twin."""
    prompts = [prompt(30 + i, n) for i, n in enumerate((18, 5))]
    outs = {}
    for backend in ("sdpa", "reference"):
        runner = TinyRunner(ours, seed=5, options=ExecutionOptions(attention_backend=backend))
        first = runner.step([(0, prompts[0][:11]), (1, prompts[1])])
        second = runner.step([(0, prompts[0][11:]), (1, [3])])
        outs[backend] = torch.cat(first + second)
    torch.testing.assert_close(outs["sdpa"], outs["reference"], atol=1e-5, rtol=0)


def hf_greedy(hf, token_ids: list[int], num_tokens: int, use_generate: bool = True) -> list[int]:
    """`num_tokens` greedy tokens from `transformers`: `generate`, or (`use_generate=False`) a plain loop of
    forward calls over a cache, one token per call after the prompt."""
    if use_generate:
        gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=num_tokens, eos_token_id=None,
                                                   pad_token_id=0)
        hf.generation_config.eos_token_id = None
        with torch.inference_mode():
            return hf.generate(torch.tensor([token_ids]), generation_config=gen_config)[0, len(token_ids):].tolist()
    cache = transformers.DynamicCache(config=hf.config)
    generated, step_ids = [], token_ids
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = hf(torch.tensor([step_ids]), cache=cache, use_cache=True).logits[0, -1]
            generated.append(int(logits.argmax()))
            step_ids = generated[-1:]
    return generated


def greedy_ours(ours, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy tokens of all `prompts` prefilled in one step, then decoded together one token per step."""
    runner = TinyRunner(ours, seed=6)
    generated: list[list[int]] = [[] for _ in prompts]
    logits = runner.step(list(enumerate(prompts)))
    for _ in range(num_tokens):
        next_ids = [int(chunk[-1].argmax()) for chunk in logits]
        for out, token in zip(generated, next_ids):
            out.append(token)
        logits = runner.step([(i, [t]) for i, t in enumerate(next_ids)])
    return generated


def greedy_prompts() -> list[list[int]]:
    """The two prompts (9 and 4 tokens) of the greedy checks."""
    return [prompt(40, 9), prompt(41, 4)]


def check_greedy_matches_generate(hf, ours, use_generate: bool = True) -> None:
    """32 greedy tokens of two sequences decoded together equal `transformers` run on each (`hf_greedy`)."""
    prompts = greedy_prompts()
    expected = [hf_greedy(hf, p, NUM_GREEDY_TOKENS, use_generate) for p in prompts]
    assert greedy_ours(ours, prompts, NUM_GREEDY_TOKENS) == expected
    assert len(set(expected[0])) > 1  # not a degenerate repetition of one token


def check_load_errors(hf, missing_name: str) -> None:
    """Loading fails loudly on a missing and on an unexpected tensor."""
    import pytest

    config_dict = hf.config.to_dict()
    state = dict(hf.state_dict())
    missing = {k: v for k, v in state.items() if k != missing_name}
    with pytest.raises(ValueError, match=f"missing weights: {missing_name.replace('.', '[.]')}"):
        load_model(config_dict, missing.items(), dtype=torch.float32, device="cpu")
    extra = dict(state, **{"model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected weights: model\.layers\.0\.extra\.weight"):
        load_model(config_dict, extra.items(), dtype=torch.float32, device="cpu")


def max_logit_change(ours, edit: Callable[[torch.nn.Module], None]) -> float:
    """Largest change in one-chunk logits when `edit` is applied to a deep copy of `ours`."""
    import copy

    token_ids = prompt(1, 20)
    (before,) = TinyRunner(ours).step([(0, token_ids)])
    edited = copy.deepcopy(ours)
    edit(edited)
    (after,) = TinyRunner(edited).step([(0, token_ids)])
    return float((before - after).abs().max())
