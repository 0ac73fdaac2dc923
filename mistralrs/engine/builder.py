"""Puts a loaded model, a sized KV cache, the scheduler and the engine thread together."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from mistralrs.adapters.anymoe import has_anymoe
from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.core import Scheduler, SchedulerConfig
from mistralrs.engine.commands import CommandHandlers
from mistralrs.engine.engine import Engine
from mistralrs.engine.input_processor import InputProcessor
from mistralrs.loader.pipeline import LoadedModel
from mistralrs.worker.device_map import layer_devices
from mistralrs.worker.model_runner import ModelRunner
from mistralrs.worker.options import ExecutionOptions
from mistralrs.worker.speculative import SpeculativeRunner

if TYPE_CHECKING:
    from mistralrs.engine.tensor_parallel import TPRuntime

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 256 * 2**20      # KV cache on the CPU when nothing sizes it
DEFAULT_CPU_KV_MIN_TOKENS = 4096
DEFAULT_GPU_MEM_USAGE = 0.85            # fraction of the free GPU memory (after loading) for the KV cache
VALID_BLOCK_SIZES = (8, 16, 32)
DEFAULT_PREFILL_TOKENS_WHILE_DECODING = 128  # prompt tokens of a step that also decodes (see core/scheduler.py)


@dataclass
class EngineConfig:
    """Engine sizing, from the Runner / CLI arguments of the same names."""

    max_seqs: int = 16                   # most sequences running at once
    no_kv_cache: bool = False            # recompute the whole sequence every step
    prefix_cache_n: int = 16             # 0 turns prefix caching off (blocks are the unit of reuse here)
    prompt_chunksize: int = 512          # most prompt tokens of one sequence per step
    block_size: int = 32                 # pa_blk_size
    pa_ctxt_len: int | None = None       # KV capacity in tokens (all sequences together)
    pa_gpu_mem: int | None = None        # KV capacity in MB
    pa_gpu_mem_usage: float | None = None  # KV capacity as a fraction of the device memory
    seed: int | None = None              # seeds the RNG of sequences that have no seed of their own
    prefill_tokens_while_decoding: int = DEFAULT_PREFILL_TOKENS_WHILE_DECODING  # prompt tokens per step (all
    # chunks together) while some sequence decodes: bounds a running stream's wait for its next token
    allow_special_tokens_in_messages: bool = False  # special-token text typed in a chat message becomes a
    # control token (the reference's behaviour); by default it stays text
    speculative_gamma: int = 32          # draft tokens per sequence and step when a draft model is loaded

    def __post_init__(self) -> None:
        if self.max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {self.max_seqs}")
        if self.prompt_chunksize < 1:
            raise ValueError(f"prompt_chunksize must be >= 1, got {self.prompt_chunksize}")
        if self.prefill_tokens_while_decoding < 1:
            raise ValueError(f"prefill_tokens_while_decoding must be >= 1, got {self.prefill_tokens_while_decoding}")
        if self.block_size not in VALID_BLOCK_SIZES:
            raise ValueError(f"pa_blk_size must be one of {VALID_BLOCK_SIZES}, got {self.block_size}")
        if self.prefix_cache_n < 0:
            raise ValueError(f"prefix_cache_n must be >= 0, got {self.prefix_cache_n}")
        if self.pa_ctxt_len is not None and self.pa_ctxt_len < 1:
            raise ValueError(f"pa_ctxt_len must be >= 1, got {self.pa_ctxt_len}")
        if self.pa_gpu_mem is not None and self.pa_gpu_mem < 1:
            raise ValueError(f"pa_gpu_mem must be >= 1 (MB), got {self.pa_gpu_mem}")
        if self.pa_gpu_mem_usage is not None and not 0 < self.pa_gpu_mem_usage <= 1:
            raise ValueError(f"pa_gpu_mem_usage must be in (0, 1], got {self.pa_gpu_mem_usage}")
        if isinstance(self.speculative_gamma, bool) or not isinstance(self.speculative_gamma, int) \
                or self.speculative_gamma < 1:
            raise ValueError(f"speculative_gamma must be an int >= 1, got {self.speculative_gamma!r}")


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_kv_blocks(config: EngineConfig, loaded: LoadedModel, bytes_per_block: int) -> int:
    """KV capacity in blocks, by priority pa_ctxt_len > pa_gpu_mem_usage > pa_gpu_mem > default (REFERENCE §8.12):
    the tokens an automatic device map planned for, else on CUDA 85% of the free memory, else 256 MiB, never more
    than `max_seqs` full contexts."""
    if config.pa_ctxt_len is not None:
        return math.ceil(config.pa_ctxt_len / config.block_size)
    if config.pa_gpu_mem_usage is not None:
        return int(_available_bytes(loaded.device) * config.pa_gpu_mem_usage) // bytes_per_block
    if config.pa_gpu_mem is not None:
        return config.pa_gpu_mem * 2**20 // bytes_per_block
    most_useful = math.ceil(config.max_seqs * loaded.max_model_len / config.block_size)
    planned = getattr(getattr(loaded.model, "device_map", None), "kv_tokens", None)
    if planned is not None:   # an automatic map left room for this many tokens on each of its devices
        return min(most_useful, math.ceil(planned / config.block_size))
    if loaded.device.type == "cuda":
        budget = int(_available_bytes(loaded.device) * DEFAULT_GPU_MEM_USAGE)
        return min(most_useful, budget // bytes_per_block)
    blocks = max(DEFAULT_CPU_KV_BYTES // bytes_per_block,
                 math.ceil(DEFAULT_CPU_KV_MIN_TOKENS / config.block_size))
    return min(most_useful, blocks)


def main_device_bytes_per_block(loaded: LoadedModel, block_size: int) -> int:
    """Bytes one KV block takes on the model's device: the layers a device map puts elsewhere keep their caches
    there (on the CPU, memory maps committed only as they fill), so they do not spend the device's budget."""
    spec = loaded.model.kv_cache_spec()
    devices = layer_devices(loaded.model, spec.num_layers, loaded.device)
    on_main = max(1, sum(device == loaded.device for device in devices))
    return spec.bytes_per_block(block_size, loaded.dtype) * on_main // spec.num_layers


def build_engine(loaded: LoadedModel, config: EngineConfig,
                 handlers: CommandHandlers | None = None,
                 options: ExecutionOptions | None = None,
                 draft: LoadedModel | None = None,
                 peers: TPRuntime | None = None) -> tuple[Engine, InputProcessor]:
    """Size the KV cache, start the engine thread (running control commands with `handlers`), and return it with
    its input processor. `options`: how the model runs (None: `ExecutionOptions.from_env()`, a library's
    defaults with the environment's choices). `draft`: a draft model for speculative decoding (its KV cache has
    the target's block layout, so each block costs both). `peers`: the head's tensor-parallel runtime, which
    hands the KV size to the other ranks and every step to their models."""
    adapters = adapter_runtime_of(loaded.model)
    xlora = adapters.state.xlora if adapters is not None else None
    if xlora is not None and xlora.non_granular_index is not None and config.max_seqs != 1:
        logger.info("X-LoRA tgt_non_granular_index forces max_seqs = 1 (was %d)", config.max_seqs)
        config = dataclasses.replace(config, max_seqs=1)
    kv_factor = adapters.kv_cache_factor if adapters is not None else 1   # X-LoRA's scaling pass has its own
    bytes_per_block = main_device_bytes_per_block(loaded, config.block_size) * kv_factor
    if draft is not None:
        bytes_per_block += main_device_bytes_per_block(draft, config.block_size)
    num_blocks = num_kv_blocks(config, loaded, bytes_per_block)
    if num_blocks < 1:
        raise ValueError("the KV cache sizing leaves no room for a single block; raise pa_ctxt_len / pa_gpu_mem")
    capacity = num_blocks * config.block_size
    logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, config.block_size, capacity)
    if peers is not None:
        peers.publish_kv_blocks(num_blocks, config.block_size)
    scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=config.max_seqs,
        max_num_batched_tokens=config.prompt_chunksize + config.max_seqs,
        prompt_chunksize=config.prompt_chunksize,
        block_size=config.block_size,
        num_blocks=num_blocks,
        # blocks are keyed by the adapter set (Sequence.cache_salt); frozen X-LoRA scalings are per sequence, and
        # so is an AnyMoE model's routing (a block's K/V depends on its whole prompt)
        enable_prefix_caching=(config.prefix_cache_n > 0 and not config.no_kv_cache
                               and (xlora is None or xlora.non_granular_index is None)
                               and not has_anymoe(loaded.model)),
        no_kv_cache=config.no_kv_cache,
        max_prefill_tokens_while_decoding=min(config.prefill_tokens_while_decoding, config.prompt_chunksize),
    ))
    options = ExecutionOptions.from_env() if options is None else options
    runner = ModelRunner(loaded.model, num_blocks=num_blocks, block_size=config.block_size,
                         kv_dtype=loaded.dtype, device=loaded.device, options=options, peers=peers)
    if draft is not None:
        draft_runner = ModelRunner(draft.model, num_blocks=num_blocks, block_size=config.block_size,
                                   kv_dtype=draft.dtype, device=draft.device, options=options)
        runner = SpeculativeRunner(runner, draft_runner, config.speculative_gamma)
    engine = Engine(scheduler, runner, loaded.tokenizer.tokenizer, seed=config.seed, handlers=handlers)
    max_len = min(loaded.max_model_len, capacity)
    if draft is not None:   # the draft reads every position the target does
        max_len = min(max_len, draft.max_model_len)
    if config.no_kv_cache:
        # every step recomputes the whole sequence in one chunk, so the chunk size bounds its length
        max_len = min(max_len, config.prompt_chunksize)
    return engine, InputProcessor(loaded.tokenizer, max_len,
                                  allow_special_tokens_in_messages=config.allow_special_tokens_in_messages)


def build_command_engine(handlers: CommandHandlers, seed: int | None = None) -> Engine:
    """An engine thread for a model that serves no token requests (a diffusion model): its scheduler stays empty,
    so the thread only runs the control commands of `handlers`, one at a time, in the order they are queued."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1, prompt_chunksize=1,
                                          block_size=VALID_BLOCK_SIZES[0], num_blocks=1,
                                          enable_prefix_caching=False, no_kv_cache=True))
    return Engine(scheduler, None, None, seed=seed, handlers=handlers)


def on_short_lived_thread(fn: Callable[[], T], name: str = "mistralrs-load") -> T:
    """Runs `fn()` on a thread that ends when it returns, and returns its result (re-raising its error).

    Model loading goes through this so that the engine thread is the process's only long-lived OpenMP master:
    libgomp keeps a worker pool per thread that ever ran a parallel region, and while the main thread's pool is
    alive, the engine thread's parallel regions (every matmul of a step) wait far longer for their workers. On the
    2-core development machine SmolLM2 decoded 32 tok/s on two threads after loading on the main thread, 80 tok/s
    after loading on a short-lived one (whose pool is freed with it); see docs/benchmarks.md.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:   # handed to the caller below, whatever it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
