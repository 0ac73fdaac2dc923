"""Public API behaviour that needs no model: bad Runner arguments fail clearly, the signature is the reference's."""

from __future__ import annotations

import inspect

import pytest

from mistralrs import Architecture, Runner, Which

@pytest.mark.parametrize("kwargs,what", [
    (dict(in_situ_quant="Q9K"), "in_situ_quant"),
    (dict(which_draft=Which.GGML(quantized_model_id="d", quantized_filename="f.bin", topology="t.yml")),
     "which_draft"),
    (dict(which_draft=Which.Plain(model_id="d"), speculative_gamma=0), "speculative_gamma"),
    (dict(num_device_layers=["8", "x"]), "num_device_layers"),
    (dict(num_device_layers="8"), "num_device_layers"),
    (dict(prompt_chunksize=0), "prompt_chunksize"),
    (dict(prompt_chunksize=64, prompt_batchsize=32), "prompt_batchsize"),
    (dict(pa_blk_size=7), "pa_blk_size"),
])
def test_runner_rejects_bad_arguments(kwargs, what):
    with pytest.raises(ValueError, match=what):
        Runner(Which.Plain(model_id="unused"), **kwargs)


def test_runner_signature_is_the_reference_one():
    params = list(inspect.signature(Runner).parameters)
    reference = ["which", "max_seqs", "no_kv_cache", "prefix_cache_n", "token_source", "speculative_gamma",
                 "which_draft", "chat_template", "jinja_explicit", "num_device_layers", "in_situ_quant",
                 "anymoe_config", "pa_gpu_mem", "pa_gpu_mem_usage", "pa_ctxt_len", "pa_blk_size", "no_paged_attn",
                 "paged_attn", "prompt_chunksize", "seed"]
    assert params[:len(reference)] == reference
    assert "prompt_batchsize" in params


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["FancyNewForCausalLM"], "hidden_size": 8, "intermediate_size": 16, '
        '"num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        Runner(Which.Plain(model_id=str(tmp_path)))


def test_architecture_strings_are_accepted():
    assert Which.Plain(model_id="m", arch="mistral").arch == Architecture.Mistral
