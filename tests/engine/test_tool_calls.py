"""Tool-call parsing for the wrappers of REFERENCE §8.6."""

from __future__ import annotations

import json

import pytest

from mistralrs.engine.tool_calls import (
    ParsedToolCall,
    forced_call_schema,
    may_become_tool_call,
    parse_tool_calls,
    strict_schema,
)

WEATHER = ParsedToolCall("get_weather", json.dumps({"city": "Paris"}))
TIME = ParsedToolCall("get_time", json.dumps({"tz": "UTC"}))


@pytest.mark.parametrize("text,expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [WEATHER]),
    ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}', [WEATHER]),
    ('  <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', [WEATHER]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>', [WEATHER, TIME]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"tz": "UTC"}}]', [WEATHER, TIME]),
    ('{"function": "get_weather", "parameters": {"city": "Paris"}}', [WEATHER]),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', [WEATHER]),
    ('[{"name": "get_time", "parameters": {"tz": "UTC"}}]', [TIME]),
])
def test_calls_are_parsed(text, expected):
    assert parse_tool_calls(text) == expected


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    '{"city": "Paris"}',                                   # JSON, but no function name
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',   # unfinished
    '<tool_call>{"name": "x", "arguments": {}}</tool_call> and then some prose',
    '[1, 2, 3]',
    '',
])
def test_plain_text_is_not_a_call(text):
    assert parse_tool_calls(text) is None


def test_streaming_hold_back():
    assert may_become_tool_call("")
    assert may_become_tool_call("  <tool")
    assert may_become_tool_call('<tool_call>{"name": "get')
    assert may_become_tool_call("[TOOL")
    assert may_become_tool_call('{"name"')
    assert not may_become_tool_call("Hello")
    assert not may_become_tool_call(" The answer")


def test_strict_schema_closes_every_object_it_does_not_open_itself():
    address = {"type": "object", "properties": {"street": {"type": "string"}}}
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "address": {"$ref": "#/$defs/address"},
                       "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
                       "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
                       "either": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                       "mixed": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}},
        "$defs": {"address": address},
        "required": ["city"],
    }
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    props = strict["properties"]
    assert strict["$defs"]["address"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["extra"]["additionalProperties"] == {"type": "integer"}      # the schema's own choice stays
    assert props["either"]["anyOf"] == [{"type": "object", "additionalProperties": False}, {"type": "null"}]
    assert props["mixed"] == schema["properties"]["mixed"]                    # allOf: left open (see docstring)
    assert props["city"] == {"type": "string"} and strict["required"] == ["city"]
    assert "additionalProperties" not in address and "additionalProperties" not in schema  # input untouched
    assert strict_schema({"type": "object", "additionalProperties": True}) == {"type": "object",
                                                                              "additionalProperties": True}


def test_forced_call_arguments_are_strict():
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    bare = {"type": "function", "function": {"name": "ping"}}
    named = forced_call_schema([tool, bare], {"type": "function", "function": {"name": "get_weather"}})
    assert named["properties"]["arguments"]["additionalProperties"] is False
    required = forced_call_schema([tool, bare], "required")
    assert [s["properties"]["arguments"] for s in required["anyOf"]] == [
        strict_schema(tool["function"]["parameters"]), {"type": "object", "additionalProperties": False}]
