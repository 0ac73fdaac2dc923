"""Bad input answers an OpenAI-shaped 4xx error, never a 500, and the server keeps serving."""

from __future__ import annotations

import openai
import pytest

from mistralrs.server import BackgroundServer, ServerConfig
from tests.server.conftest import MAX_BODY_BYTES, request

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]
IMAGE = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]

# (path, body, status, param, code)
BAD_REQUESTS = [
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, None),
    (CHAT, {"model": "default"}, 400, "messages", None),
    (CHAT, {"messages": 5}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": [{"content": "no role"}]}, 400, "messages[0]", None),
    (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature", None),
    (CHAT, {"messages": HELLO, "n": 1.5}, 400, "n", None),
    (CHAT, {"messages": HELLO, "n": 0}, 400, "n", None),
    (CHAT, {"messages": HELLO, "n": 10**6}, 400, "n", None),
    (CHAT, {"messages": HELLO, "seed": 2**70}, 400, "seed", None),
    (CHAT, {"messages": HELLO, "seed": -1}, 400, "seed", None),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens", None),
    (CHAT, {"messages": HELLO, "top_p": 2.0}, 400, "top_p", None),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p", None),
    (CHAT, {"messages": HELLO, "temperature": 2.5}, 400, "temperature", None),
    (CHAT, {"messages": HELLO, "presence_penalty": 1e308}, 400, "presence_penalty", None),
    (CHAT, {"messages": HELLO, "frequency_penalty": -2.5}, 400, "frequency_penalty", None),
    (CHAT, {"messages": HELLO, "logit_bias": {"5": 101}}, 400, "logit_bias.5", None),
    (CHAT, {"messages": HELLO, "stop": [""]}, 400, "stop", None),
    (CHAT, {"messages": HELLO, "stop": ""}, 400, "stop", None),
    (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs", None),
    (CHAT, {"messages": HELLO, "logit_bias": {"abc": 1.0}}, 400, "logit_bias", None),
    (CHAT, {"messages": HELLO, "logit_bias": {"99999": 1.0}}, 400, "logit_bias", None),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages", "context_length_exceeded"),
    (CHAT, {"messages": IMAGE}, 400, "messages[0].content[1]", "image_input_not_supported"),
    (CHAT, {"messages": HELLO, "grammar": {"type": "regex", "value": "[a-z"}}, 400, "grammar", None),
    (CHAT, {"messages": HELLO, "grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}},
     400, "response_format", None),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "response_format.json_schema.schema", None),
    (CHAT, {"messages": HELLO, "adapters": ["mine"]}, 400, "adapters", None),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", None),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools[0]", None),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": ["one", "two"]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "x", "logprobs": 50}, 400, "logprobs", None),
    (COMPLETIONS, {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": "x", "best_of": 0}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": "x", "best_of": 1, "n": 2}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": 42}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "x" * 2000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/images/generations", {"prompt": "a cat"}, 400, None, None),
    ("/v1/images/generations", {"prompt": "a cat", "size": "big"}, 400, "size", None),
    ("/activate_adapters", {"adapter_names": ["a"]}, 400, None, None),
    ("/re_isq", {"ggml_type": "Q9"}, 400, "ggml_type", None),
    ("/re_isq", {}, 400, "ggml_type", None),
    ("/v1/nothing-here", {}, 404, None, None),
]


def assert_openai_error(status: int, body, expected_status: int, param=None, code=None) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["param"] == param
    assert body["error"]["code"] == code


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_request_gets_a_4xx_openai_error(server, path, body, status, param, code):
    assert_openai_error(*request(server, "POST", path, body), status, param, code)


def test_wrong_method_and_oversize_body(server):
    status, body = request(server, "GET", CHAT)
    assert_openai_error(status, body, 405)
    status, body = request(server, "POST", CHAT, b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert_openai_error(status, body, 413, code="request_too_large")


def test_openai_client_sees_the_error_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=HELLO, n=0)
    assert caught.value.body["param"] == "n"
    reply = client.chat.completions.create(model="default", messages=HELLO, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_api_key_is_required_when_set(runner):
    with BackgroundServer(runner, ServerConfig(api_key="sekrit")) as server:
        base = server.url + "/v1"
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        status, body = request(server, "POST", "/v1/chat/completions", {"messages": HELLO})
        assert_openai_error(status, body, 401, code="invalid_api_key")
        assert request(server, "GET", "/health") == (200, "OK")
        good = openai.OpenAI(base_url=base, api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="default", messages=HELLO, max_tokens=2).choices


def test_cors_preflight_is_answered_when_configured(runner):
    with BackgroundServer(runner, ServerConfig(cors_origins=["http://example.com"])) as server:
        status, _ = request(server, "OPTIONS", CHAT, headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
    assert status == 200
