"""A tiny model written to GGUF (llama.cpp layout) loads and matches its safetensors twin."""

from __future__ import annotations

import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.loader.gguf_fixtures import write_tiny_gguf
from tests.loading import load_which
from tests.tiny_models import hf_config

VOCAB = 320
# max |logit difference| against the F32 safetensors twin, per GGUF tensor type (logits are O(1..10) here)
TOLERANCE = {"F32": 1e-4, "F16": 2e-2, "Q8_0": 1e-1}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def twin_dir(request, tmp_path_factory):
    import transformers

    arch = request.param
    path = tmp_path_factory.mktemp(f"twin-{arch}")
    config = hf_config(arch, VOCAB)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path, model, config, arch


def _logits(loaded, token_ids: list[int]) -> torch.Tensor:
    spec = loaded.model.kv_cache_spec()
    kv = allocate_kv_caches(spec, 4, 32, loaded.dtype, loaded.device)
    batch = ForwardBatch.build([SeqChunk(token_ids, 0, [0, 1, 2, 3])], 32, kv, loaded.device)
    with torch.inference_mode():
        hidden = loaded.model(batch.input_ids, batch.positions, batch)
        return loaded.model.compute_logits(hidden).cpu()   # on CUDA too: the oracle runs on the CPU


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "Q8_0"])
def test_gguf_matches_safetensors_twin(twin_dir, ggml_type, tmp_path):
    path, hf_model, config, arch = twin_dir
    files = write_tiny_gguf(hf_model, config, tmp_path / "tiny.gguf", arch=arch, ggml_type=ggml_type)
    token_ids = list(range(3, 60, 2))
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    gguf = load_which(Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=files[0].split("/")[-1],
                                    dtype=ModelDType.F32), show_progress=False)
    diff = (_logits(gguf, token_ids) - expected).abs().max().item()
    assert diff < TOLERANCE[ggml_type]


def test_gguf_runner_multi_file_with_tokenizer_from_metadata(twin_dir, tmp_path):
    path, hf_model, config, arch = twin_dir
    files = write_tiny_gguf(hf_model, config, tmp_path / "split.gguf", arch=arch, num_files=2)
    names = [f.split("/")[-1] for f in files]
    runner = Runner(Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=names, dtype=ModelDType.F32),
                    show_progress=False)
    prompt_ids = runner.tokenize_text("hello world", add_special_tokens=False)
    res = runner.send_completion_request(CompletionRequest(prompt="hello world", model="tiny", max_tokens=8,
                                                           temperature=0.0))
    with torch.no_grad():
        first = int(hf_model(torch.tensor([prompt_ids])).logits[0, -1].argmax())
    assert res.choices[0].text.startswith(runner.detokenize_text([first], skip_special_tokens=True))
    chat = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], model="t", max_tokens=4, temperature=0.0))
    assert chat.usage.completion_tokens >= 1
    runner.close()
