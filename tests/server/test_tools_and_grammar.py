"""Tool calling and structured output over HTTP, driven by the official `openai` client."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict

from tests.server.conftest import request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather?"}]


class Pet(BaseModel):
    """The structured output asked for with response_format (pydantic validates it independently)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["cat", "dog"]
    indoor: bool


def test_response_format_pydantic(client):
    completion = client.beta.chat.completions.parse(model="default", messages=MESSAGES, response_format=Pet,
                                                    max_tokens=60, temperature=1.0, seed=3)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet)
    Pet.model_validate_json(completion.choices[0].message.content)


def test_grammar_field_regex_and_lark(client):
    out = client.completions.create(model="default", prompt="Code:", max_tokens=40, temperature=0.0,
                                    extra_body={"grammar": {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.choices[0].text)
    out = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=40, temperature=0.0,
                                         extra_body={"grammar": {"type": "lark", "value": 'start: "A" /[b-d]{4}/'}})
    assert re.fullmatch(r"A[b-d]{4}", out.choices[0].message.content)


def test_bad_grammar_is_4xx(client, server):
    with pytest.raises(openai.BadRequestError, match="grammar"):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5,
                                       extra_body={"grammar": {"type": "regex", "value": "[0-9"}})
    status, body = request(server, "POST", "/v1/chat/completions", {
        "model": "default", "messages": MESSAGES, "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert 400 <= status < 500 and "grammar" in body["error"]["message"]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_forced_tool_call(client, tool_choice):
    out = client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=80,
                                         tool_choice=tool_choice, temperature=1.0, seed=5)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call-")
    if tool_choice != "required":
        assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) in ({"city": "Paris"}, {"city": "Oslo"}, {"zone": "UTC"},
                                                   {"zone": "CET"})


def test_forced_tool_call_streaming(client):
    stream = client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0.0, stream=True)
    deltas = [choice for chunk in stream for choice in chunk.choices]
    calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert "".join(d.delta.content or "" for d in deltas) == ""
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Oslo")


def test_tool_choice_none_is_plain_text(client):
    out = client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                         max_tokens=40, temperature=0.0,
                                         extra_body={"grammar": {"type": "regex", "value": '\\{"name": "x"\\}'}})
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == '{"name": "x"}'


def test_multi_turn_with_tool_message(client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "rain"}]
    out = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=4,
                                         temperature=0.0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
