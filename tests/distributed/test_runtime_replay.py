"""What the head broadcasts is all another rank's model needs: a second model runner that only `replay`s the head's
`StepInputs` writes the same KV cache and computes the same logits as the head, for requests with different LoRA
sets, chunked prompts and several sequences per step (in one process, so the other rank's results can be read)."""

from __future__ import annotations

import threading

import torch

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs.worker.model_runner import ModelRunner, StepInputs
from tests.adapters.adapter_fixtures import make_base_and_adapters, write_ordering
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS

NO_SPECIAL = {i: -1e9 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))}


class ReplayingPeers:
    """Stands in for the other ranks: replays every step on `twin` and keeps the logits both runners computed."""

    def __init__(self, head: ModelRunner, twin: ModelRunner) -> None:
        self.twin = twin
        self.steps = 0
        self.head_logits: list[torch.Tensor] = []
        self.twin_logits: list[torch.Tensor] = []
        self._current = self.head_logits
        compute = head.model.compute_logits

        def recording(hidden):
            logits = compute(hidden)
            self._current.append(logits.clone())
            return logits

        head.model.compute_logits = recording

    @classmethod
    def attached_to(cls, head: ModelRunner):
        """Peers that replay `head`'s steps on a twin runner of the same model and KV capacity, set as its peers."""
        num_blocks = head.kv_caches[0][0].shape[0] // head.block_size
        twin = ModelRunner(head.model, num_blocks=num_blocks, block_size=head.block_size,
                           kv_dtype=head.kv_caches[0][0].dtype, device=head.device, options=head.options)
        head.peers = peers = cls(head, twin)
        return peers

    def send_step(self, step: StepInputs) -> None:
        self.steps += 1
        self._current = self.twin_logits
        try:
            self.twin.replay(step)
        finally:
            self._current = self.head_logits

    def step_failed(self, exc: Exception) -> None:
        raise AssertionError(f"a step failed: {exc}")

    def keep_alive(self) -> None:
        """Nothing to tell."""


def test_replayed_steps_write_the_same_kv_and_logits(tmp_path):
    base, adapters = make_base_and_adapters(tmp_path, ["a1", "a2"])
    preload = [{"name": n, "adapter_model_id": str(adapters)} for n in ("a1", "a2")]
    order = write_ordering(tmp_path / "ordering.json", base, order=["a1"], preload_adapters=preload)
    runner = Runner(Which.Lora(adapters_model_id=str(adapters), order=order, dtype=ModelDType.F32),
                    prompt_chunksize=8)
    head = runner.llm_engine._engine.model_runner
    peers = ReplayingPeers.attached_to(head)

    def send(prompt: str, names):
        runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": prompt}], model="m", max_tokens=6, temperature=0.0,
            adapters=names, logit_bias=NO_SPECIAL))

    threads = [threading.Thread(target=send, args=(prompt, names)) for prompt, names in (
        ("The quick brown fox jumps over the lazy dog.", ["a1"]), ("Hello there", ["a2"]), ("0123456789", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runner.close()
    assert peers.steps > 3 and len(peers.head_logits) == len(peers.twin_logits) > 0
    for got, want in zip(peers.twin_logits, peers.head_logits):
        assert torch.equal(got, want)
    for (k_twin, v_twin), (k_head, v_head) in zip(peers.twin.kv_caches, head.kv_caches):
        assert torch.equal(k_twin, k_head) and torch.equal(v_twin, v_head)
    assert head.kv_caches[0][0].abs().sum() > 0
