"""Forced tool calls on the real default model (SmolLM2-135M-Instruct) over HTTP with the `openai` client: the
arguments follow the function's parameter schema strictly, so the call finishes (issue 11, item 8)."""

from __future__ import annotations

import json

import openai
import pytest

from mistralrs import ModelDType, Runner, Which
from mistralrs.loader.default_model import default_model_path
from mistralrs.server import BackgroundServer, ServerConfig

# No `additionalProperties`: without strict arguments, greedy SmolLM2 adds and repeats a "description" key
# until max_tokens.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(one_intra_op_thread):
    path = default_model_path()
    runner = Runner(Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name,
                               dtype=ModelDType.F32), show_progress=False)
    with BackgroundServer(runner, ServerConfig()) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    runner.close()


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_finishes_with_declared_arguments(client, tool_choice):
    out = client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER], max_tokens=60,
                                         tool_choice=tool_choice, temperature=0.0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
