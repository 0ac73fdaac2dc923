"""Structured output and tool calling through the Python API on a tiny random model.

Random weights would almost never produce these shapes by chance, so a matching output shows the grammar
constrained generation.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, ToolChoice, Which
from mistralrs.loader.tokenizer import tokenizer_from_gguf_metadata
from mistralrs.sample import Sampler, SamplingParams, SamplingRow
from mistralrs.sample.grammar import GrammarCompiler, apply_grammar_masks
from tests.tiny_models import CHARACTERS, EOS_TOKEN_ID, char_tokenizer, make_tiny_model_dir



class Answer(BaseModel):
    """The structured output the JSON-schema tests ask for (validated by pydantic, the independent check)."""

    model_config = ConfigDict(extra="forbid")
    color: Literal["red", "green", "blue"]
    ok: bool
    code: str = Field(pattern="^[a-z]{2,4}$")


SCHEMA = Answer.model_json_schema()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }}"
    "({{ c['function']['arguments']['city'] }}){% endfor %}"
    "{% elif m['role'] == 'tool' %}result[{{ m['tool_call_id'] }}]: {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-grammar")
    make_tiny_model_dir(path, "llama")
    (path / "tools.jinja").write_text(TOOL_TEMPLATE)
    runner = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32), jinja_explicit=str(path / "tools.jinja"))
    yield runner
    runner.close()


def complete(runner, prompt="Say:", **kw):
    request = CompletionRequest(prompt=prompt, model="tiny", max_tokens=kw.pop("max_tokens", 120), **kw)
    return runner.send_completion_request(request).choices[0]


def test_regex_output_matches(runner):
    for temperature, seed in ((0.0, None), (1.0, 3), (1.0, 4)):
        choice = complete(runner, temperature=temperature, seed=seed, grammar="[0-9]{3}-[a-z]{2}",
                          grammar_type="regex")
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", choice.text), choice.text
        assert choice.finish_reason == "stop"


def test_json_schema_output_validates(runner):
    for seed in (1, 2):
        choice = complete(runner, temperature=1.0, seed=seed, grammar=SCHEMA, grammar_type="json_schema")
        Answer.model_validate_json(choice.text)


def test_lark_and_llguidance_grammars(runner):
    lark = 'start: "yes" | "no" | NUM\nNUM: /[1-9][0-9]?/'
    text = complete(runner, temperature=1.0, seed=5, grammar=lark, grammar_type="lark").text
    assert re.fullmatch(r"yes|no|[1-9][0-9]?", text), text
    raw = {"grammars": [{"lark_grammar": 'start: "ab" /[xyz]{3}/'}]}
    text = complete(runner, temperature=0.0, grammar=raw, grammar_type="llguidance").text
    assert re.fullmatch(r"ab[xyz]{3}", text), text


ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # no finite value matches


@pytest.mark.parametrize("grammar,grammar_type", [("[0-9", "regex"), ("start: undefined_rule", "lark"),
                                                  ({"type": "nonsense"}, "json_schema"),
                                                  ({"type": "integer", "minimum": 5, "maximum": 3}, "json_schema"),
                                                  (ENDLESS, "json_schema"),
                                                  ({"grammars": [{"json_schema": ENDLESS}]}, "llguidance")])
def test_bad_grammar_is_value_error(runner, grammar, grammar_type):
    with pytest.raises(ValueError, match="grammar"):
        complete(runner, grammar=grammar, grammar_type=grammar_type)


def test_endless_tool_parameters_are_a_value_error(runner):
    nest = {"type": "function", "function": {"name": "nest", "parameters": ENDLESS}}
    with pytest.raises(ValueError, match="tool_schemas: no call can be generated .*recursion through '#'"):
        runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Nest"}], model="tiny", tool_schemas=[nest], tool_choice="required",
            max_tokens=20))


def test_mixed_batch_leaves_free_rows_alone(runner):
    def free(seed):
        return complete(runner, prompt="Once upon", temperature=1.0, seed=seed, max_tokens=24,
                        logit_bias={EOS_TOKEN_ID: -100.0}).text
    alone = [free(7), free(8)]
    results = {}

    def run(key, **kw):
        results[key] = complete(runner, **kw)

    threads = [threading.Thread(target=run, args=(f"g{i}",),
                                kwargs=dict(grammar="[0-9]{20}", grammar_type="regex", temperature=1.0, seed=i))
               for i in range(2)]
    threads += [threading.Thread(target=lambda s=s: results.__setitem__(s, free(s))) for s in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[7], results[8]] == alone
    assert all(re.fullmatch(r"[0-9]{20}", results[f"g{i}"].text) for i in range(2))


def test_sampler_masks_only_constrained_rows():
    compiler = GrammarCompiler(char_tokenizer(), [EOS_TOKEN_ID])
    state = compiler.compile("regex", "[a-c]").new_state()
    vocab = char_tokenizer().get_vocab_size()
    logits = torch.randn(2, vocab)
    masked = apply_grammar_masks(logits, [None, state])
    assert torch.equal(masked[0], logits[0])
    allowed = {i for i in range(vocab) if masked[1, i] > float("-inf")}
    assert allowed == {CHARACTERS.index(c) for c in "abc"}
    rows = [SamplingRow(SamplingParams(temperature=0.0, grammar=s), [1], 1) for s in (None, state)]
    tokens = Sampler()(logits, rows)
    assert tokens[0].token_id == int(logits[0].argmax())
    assert CHARACTERS[tokens[1].token_id] in "abc"


def chat(runner, **kw):
    request = ChatCompletionRequest(messages=kw.pop("messages", [{"role": "user", "content": "Weather?"}]),
                                    model="tiny", max_tokens=kw.pop("max_tokens", 120), **kw)
    return runner.send_chat_completion_request(request)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call(runner, choice):
    response = chat(runner, tool_schemas=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=11)
    out = response.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.id.startswith("call-") and call.type.cli_names[0] == "function"
    if choice != "required":
        assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args in ({"city": "Paris"}, {"city": "Oslo"}, {"zone": "UTC"}, {"zone": "CET"})


def test_forced_tool_call_streaming(runner):
    chunks = list(chat(runner, tool_schemas=[WEATHER], stream=True, temperature=0.0,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [c for chunk in chunks for ch in chunk.choices for c in (ch.delta.tool_calls or [])]
    contents = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
    finish = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    assert contents == "" and finish == ["tool_calls"]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"


def test_parallel_calls_parsed(runner):
    schema = {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    "arguments": t["function"]["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": False} for t in (WEATHER, TIME)]}}
    response = chat(runner, tool_schemas=[WEATHER, TIME], tool_choice=ToolChoice.Auto, grammar=schema,
                    grammar_type="json_schema", temperature=1.0, seed=2)
    out = response.choices[0]
    assert out.finish_reason == "tool_calls" and len(out.message.tool_calls) == 2


def test_tool_choice_none_gives_plain_content(runner):
    call = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                             "arguments": WEATHER["function"]["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}
    response = chat(runner, tool_schemas=[WEATHER], tool_choice="none", grammar=call, grammar_type="json_schema",
                    temperature=0.0)
    out = response.choices[0]
    assert out.message.tool_calls is None and out.finish_reason == "stop"
    assert json.loads(out.message.content)["name"] == "get_weather"


def test_multi_turn_with_tool_message_renders(runner):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call-1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]
    request = ChatCompletionRequest(messages=messages, model="t", tool_schemas=[WEATHER])
    prompt = runner.llm_engine._inputs.tool_chat_template.render(
        runner.llm_engine._messages(request, [WEATHER]), add_generation_prompt=True, tools=[WEATHER])
    assert "call get_weather(Paris)" in prompt and "result[call-1]: sunny" in prompt
    response = chat(runner, messages=messages, tool_schemas=[WEATHER], max_tokens=5, temperature=0.0,
                    logit_bias={EOS_TOKEN_ID: -100.0})
    assert response.usage.prompt_tokens == len(runner.tokenize_text(prompt, add_special_tokens=False))


def test_sentencepiece_gguf_vocabulary_masks_by_token_bytes():
    """A GGUF SentencePiece tokenizer (no tokenizer.json for llguidance) constrains by each token's bytes: a byte
    token is its byte (the lead byte of "é" alone is no text), `▁` a space; text the grammar forces is encoded as
    a continuation (no `▁` prepended)."""
    pieces = ["a", "b", "c", "ab", "bc", "x", "\u2581x"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    tokenizer = tokenizer_from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": True})
    compiler = GrammarCompiler(tokenizer, [2])

    def allowed(grammar: str) -> set[str]:
        masked = apply_grammar_masks(torch.zeros(1, len(tokens)), [compiler.compile("regex", grammar).new_state()])
        return {tokenizer.id_to_token(i) for i in range(len(tokens)) if masked[0, i] > float("-inf")}

    assert allowed("[ax]c?") == {"a", "x", "<0x61>", "<0x78>"}
    assert allowed("\u00e9") == {"<0xC3>"}
    assert allowed(" x") == {"\u2581x"}
