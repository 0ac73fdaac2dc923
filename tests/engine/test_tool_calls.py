"""Tool-call parsing for the wrappers of REFERENCE §8.6."""

from __future__ import annotations

import json

import pytest

from mistralrs.engine.tool_calls import ParsedToolCall, may_become_tool_call, parse_tool_calls

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
