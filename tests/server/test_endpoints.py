"""The server driven by the official `openai` client over a real socket, on a tiny random model."""

from __future__ import annotations

import os

import openai
import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest
from mistralrs.server import BackgroundServer, ServerConfig
from mistralrs.server.app import public_model_name
from tests.server.conftest import NO_EOS, make_runner, request

GREEDY = dict(temperature=0, max_tokens=12, extra_body={"logit_bias": NO_EOS})


def chat_prompt(text: str) -> str:
    """The tiny model's ChatML template applied to one user message."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_is_the_runner_reply(client, runner):
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello!"}],
                                           **GREEDY)
    expected = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Hello!"}], model="x", temperature=0, max_tokens=12,
        logit_bias=NO_EOS))
    assert reply.object == "chat.completion" and reply.model == os.path.basename(runner.model_id)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_any_model_name_selects_the_served_model(client, runner):
    """The reference's server examples send model="mistral" or "llama-3.1": one model is served, so any name is it."""
    for name in ("mistral", "llama-3.1"):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], **GREEDY)
        assert reply.model == public_model_name(runner.model_id)
    chunks = list(client.completions.create(model="mistral", prompt="Hi", stream=True, **GREEDY))
    assert {c.model for c in chunks} == {public_model_name(runner.model_id)}
    assert client.models.retrieve("mistral").id == public_model_name(runner.model_id)


def test_strict_model_name_restores_the_404(runner):
    with BackgroundServer(runner, ServerConfig(strict_model_name=True, model_aliases=("alias.gguf",))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="mistral", messages=messages, max_tokens=2)
        assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("mistral")
        for name in ("default", runner.model_id, "alias.gguf"):
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=2)
            assert reply.model == public_model_name(runner.model_id)


def test_completion_is_the_runner_completion(client, runner):
    reply = client.completions.create(model=runner.model_id, prompt="The quick brown", echo=True, suffix="!",
                                      **GREEDY)
    expected = runner.send_completion_request(CompletionRequest(
        prompt="The quick brown", model="x", temperature=0, max_tokens=12, logit_bias=NO_EOS))
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "The quick brown" + expected.choices[0].text + "!"
    assert reply.usage.completion_tokens == 12


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming_equals_non_streaming(client, kind, include_usage):
    if kind == "chat":
        create, args = client.chat.completions.create, dict(messages=[{"role": "user", "content": "Stream me"}])
    else:
        create, args = client.completions.create, dict(prompt="Stream me")
    whole = create(model="default", **args, **GREEDY)
    chunks = list(create(model="default", **args, **GREEDY, stream=True,
                         stream_options={"include_usage": include_usage}))
    pieces = [(c.choices[0].delta.content if kind == "chat" else c.choices[0].text) or "" for c in chunks if c.choices]
    expected = whole.choices[0].message.content if kind == "chat" else whole.choices[0].text
    assert "".join(pieces) == expected
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usages) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
        assert all(c.choices for c in chunks[:-1])
        assert usages[0].completion_tokens == whole.usage.completion_tokens
        assert usages[0].prompt_tokens == whole.usage.prompt_tokens
    else:
        assert usages == [] and all(c.choices for c in chunks)


def test_stream_loop_of_the_reference_server_example(client):
    """examples/server/streaming.py: `delta = chunk.choices[0].delta.content; resp += delta` on every chunk."""
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Stream"}],
                                            stream=True, **GREEDY)
    resp = ""
    for chunk in stream:
        delta = chunk.choices[0].delta.content
        resp += delta
    assert len(resp) > 0 and chunk.choices[0].finish_reason == "length"


def reference_logprobs(hf_model, runner, prompt_ids: list[int], generated: list[int], top: int):
    """(chosen token logprob, top alternatives) per generated token, by transformers with the same logit bias."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + generated])).logits[0].float()
    for token_id, bias in NO_EOS.items():
        logits[:, int(token_id)] += bias
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:-1]
    return [(float(row[t]), row.topk(top)) for row, t in zip(logprobs, generated)]


def test_chat_logprobs_match_transformers_streaming_or_not(client, runner, tiny_model):
    messages = [{"role": "user", "content": "Logprobs please"}]
    reply = client.chat.completions.create(model="default", messages=messages, logprobs=True, top_logprobs=3,
                                           **GREEDY)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    prompt_ids = runner.tokenize_text(chat_prompt("Logprobs please"), False)
    generated = [runner.tokenize_text(e.token, False)[0] for e in content]
    reference = reference_logprobs(tiny_model[1], runner, prompt_ids, generated, 3)
    for entry, (logprob, top) in zip(content, reference):
        assert entry.logprob == pytest.approx(logprob, abs=1e-3)
        assert entry.bytes == list(entry.token.encode())
        assert [t.token for t in entry.top_logprobs] == [runner.detokenize_text([int(i)], False) for i in top.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    chunks = list(client.chat.completions.create(model="default", messages=messages, logprobs=True,
                                                 top_logprobs=3, stream=True, **GREEDY))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_in_the_legacy_shape(client, runner, tiny_model):
    reply = client.completions.create(model="default", prompt="Some text", logprobs=2, echo=True, **GREEDY)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "Some text" + "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == len("Some text")
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    prompt_ids = runner.tokenize_text("Some text", True)
    generated = [runner.tokenize_text(t, False)[0] for t in logprobs.tokens]
    reference = reference_logprobs(tiny_model[1], runner, prompt_ids, generated, 2)
    assert logprobs.token_logprobs == pytest.approx([lp for lp, _ in reference], abs=1e-3)
    streamed = [lp for c in client.completions.create(model="default", prompt="Some text", logprobs=2,
                                                      stream=True, **GREEDY)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=1e-4)


def test_n_choices_and_seed(client):
    args = dict(model="default", messages=[{"role": "user", "content": "Pick"}], n=3, temperature=1.0, seed=7,
                max_tokens=8)
    first, second = client.chat.completions.create(**args), client.chat.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1


def test_streaming_several_choices(client):
    args = {"model": "default", "messages": [{"role": "user", "content": "Two at once"}], "n": 2, "temperature": 1.0,
            "seed": 3, "max_tokens": 10}
    whole = client.chat.completions.create(**args)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_as_string_or_list(client, as_list):
    messages = [{"role": "user", "content": "Stop somewhere"}]
    full = client.chat.completions.create(model="default", messages=messages, **GREEDY).choices[0].message.content
    stop = full[5:7]
    cut = client.chat.completions.create(model="default", messages=messages, stop=[stop] if as_list else stop,
                                         **GREEDY).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[:full.index(stop)].lstrip()


def test_max_completion_tokens_and_text_parts(client):
    reply = client.chat.completions.create(
        model="default", temperature=0, max_completion_tokens=5, extra_body={"logit_bias": NO_EOS},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "parts"}]}])
    joined = client.chat.completions.create(model="default", temperature=0, max_tokens=5,
                                            extra_body={"logit_bias": NO_EOS},
                                            messages=[{"role": "user", "content": "Two\nparts"}])
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].message.content == joined.choices[0].message.content


def test_tools_are_accepted(client):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": parameters}}]
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Weather?"}],
                                           tools=tools, tool_choice="auto", max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_max_tokens_beyond_the_context_is_clamped(client, runner):
    reply = client.completions.create(model="default", prompt="Long run", temperature=0, max_tokens=100_000,
                                      extra_body={"logit_bias": NO_EOS})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == runner.max_model_len


def test_models_health_and_openapi(client, server, runner):
    models = client.models.list()
    assert [m.id for m in models.data] == [os.path.basename(runner.model_id)]   # not the server's directory
    assert models.data[0].owned_by == "local"
    assert client.models.retrieve("default").id == os.path.basename(runner.model_id)
    assert request(server, "GET", "/health") == (200, "OK")
    status, document = request(server, "GET", "/api-doc/openapi.json")
    assert status == 200
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(document["paths"])
    chat_body = document["components"]["schemas"]["ChatCompletionBody"]
    assert {"messages", "top_k", "min_p", "grammar", "dry_multiplier"} <= set(chat_body["properties"])


def test_truncate_sequence_keeps_the_tail(tiny_model):
    runner = make_runner(tiny_model[0], truncate_sequence=True)
    try:
        with BackgroundServer(runner) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            prompt = "x" * (runner.max_model_len + 50)
            reply = client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0,
                                              extra_body={"logit_bias": NO_EOS})
            assert reply.usage.prompt_tokens == runner.max_model_len - 8
            assert reply.usage.completion_tokens == 8
    finally:
        runner.close()


def test_messages_as_a_string_is_one_user_message(client):
    as_string = client.chat.completions.create(model="default", messages="Just a string", **GREEDY)
    as_list = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Just a string"}],
                                             **GREEDY)
    assert as_string.choices[0].message.content == as_list.choices[0].message.content
    assert as_string.usage.prompt_tokens == as_list.usage.prompt_tokens
