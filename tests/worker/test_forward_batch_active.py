"""The running step's batch (`ForwardBatch.active` / `ForwardBatch.current`, mistralrs/worker/forward_batch.py) and
the adapter hooks' one channel for per-token weights: `LoraState.weights_for` reads the current batch's
`adapter_weights` (its copy on the layer's device), and the active set outside a step."""

from __future__ import annotations

import threading

import pytest
import torch

from mistralrs.adapters.lora import LoraState
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec, SeqChunk, allocate_kv_caches

META = torch.device("meta")


def _batch() -> ForwardBatch:
    caches = allocate_kv_caches(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4), 2, 8, torch.float32, "cpu")
    return ForwardBatch.build([SeqChunk([1, 2, 3], 0, [0]), SeqChunk([4], 2, [1])], 8, caches, "cpu")


def test_active_sets_current_within_the_block_and_nests():
    outer, inner = _batch(), _batch()
    assert ForwardBatch.current() is None
    with outer.active() as entered:
        assert entered is outer and ForwardBatch.current() is outer
        with inner.active():
            assert ForwardBatch.current() is inner
        assert ForwardBatch.current() is outer
    assert ForwardBatch.current() is None


def test_active_is_reset_when_the_step_raises():
    batch = _batch()
    with pytest.raises(RuntimeError, match="boom"):
        with batch.active():
            raise RuntimeError("boom")
    assert ForwardBatch.current() is None


def test_another_thread_does_not_see_this_threads_step():
    seen = []
    with _batch().active():
        thread = threading.Thread(target=lambda: seen.append(ForwardBatch.current()))
        thread.start()
        thread.join()
    assert seen == [None]


def _state() -> LoraState:
    state = LoraState(["a", "b"])
    state.activate(["a"])
    return state


def test_hooks_apply_the_active_set_outside_a_step():
    weights = _state().weights_for(torch.zeros(4, 3))
    assert torch.equal(weights, torch.tensor([[1.0, 0.0]] * 4))
    assert LoraState(["a"]).weights_for(torch.zeros(4, 3)) is None


def test_hooks_apply_the_current_batchs_weights_within_a_step():
    state, batch = _state(), _batch()
    batch.adapter_weights = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    with batch.active():
        assert state.weights_for(torch.zeros(4, 3)) is batch.adapter_weights
        with pytest.raises(ValueError, match="cover 4 tokens, the layer got 2"):
            state.weights_for(torch.zeros(2, 3))
    batch.adapter_weights = None
    with batch.active():
        assert state.weights_for(torch.zeros(4, 3)) is None   # a step in which no token uses an adapter


def test_hooks_on_another_device_read_the_batchs_copy_there():
    state, batch = _state(), _batch()
    batch.adapter_weights = torch.ones(4, 2)
    with batch.active():
        weights = state.weights_for(torch.zeros(4, 3, device=META))
    assert weights.device == META and weights is batch.on(META).adapter_weights
