"""Runs one scheduled step: packed tensors in, one sampled token per finished chunk out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.core import SchedulerOutput
from mistralrs.sample import SampledToken, Sampler, SamplingParams, SamplingRow
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches

SMALL_STEP_TOKENS = 16   # steps with fewer tokens than this run on one CPU thread (see ModelRunner._set_threads_for)


@dataclass
class SeqSampling:
    """How one sequence samples: its request's parameters and its own RNG (None when greedy)."""

    params: SamplingParams
    generator: torch.Generator | None
    adapters: tuple[str, ...] | None = None  # the sequence's LoRA adapter set (None: the model's active set)


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler."""

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, block_size, kv_dtype, device)
        self.sampler = Sampler()
        self.adapters = adapter_runtime_of(model)  # per-token adapter weights; None without separate adapters
        self.max_threads = torch.get_num_threads()
        self._threads = self.max_threads

    def _set_threads_for(self, num_tokens: int) -> None:
        """On the CPU, small (decode) steps run on one thread: at these sizes the weight-only int4/int8 kernels
        lose more to thread synchronisation than they gain (measured on SmolLM2: 41.6 vs 26.7 tok/s on a
        2-core machine); steps with many tokens use every thread. The setting is per thread, so it is made on
        the engine thread itself."""
        if self.device.type != "cpu":
            return
        threads = 1 if num_tokens < SMALL_STEP_TOKENS else self.max_threads
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, sampling: dict[int, SeqSampling]) -> dict[int, SampledToken]:
        """Compute the scheduled chunks and sample for those that reached their sequence's end."""
        chunks = []
        for scheduled in output.scheduled:
            seq = scheduled.seq
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids[start:start + scheduled.num_new_tokens]
            chunks.append(SeqChunk(tokens, start, seq.block_ids, seq.num_prompt_tokens))
        batch = ForwardBatch.build(chunks, self.block_size, self.kv_caches, self.device)
        self._set_threads_for(len(batch.input_ids))
        if self.adapters is not None:
            sets = [sampling[s.seq.seq_id].adapters for s in output.scheduled]
            hidden = self.adapters.forward(self.model, batch, output.scheduled, sets)
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch)
        sample_rows = [i for i, s in enumerate(output.scheduled) if s.sample]
        if not sample_rows:
            return {}
        rows_index = batch.last_token_indices[torch.tensor(sample_rows, device=batch.last_token_indices.device)]
        logits = self.model.compute_logits(hidden[rows_index])
        rows = []
        for i in sample_rows:
            seq = output.scheduled[i].seq
            seq_sampling = sampling[seq.seq_id]
            rows.append(SamplingRow(seq_sampling.params, seq.all_token_ids, seq.num_prompt_tokens,
                                    seq_sampling.generator))
        tokens = self.sampler(logits, rows)
        return {output.scheduled[i].seq.seq_id: tok for i, tok in zip(sample_rows, tokens)}
