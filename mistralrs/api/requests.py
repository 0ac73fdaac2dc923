"""`ChatCompletionRequest` and `CompletionRequest` (REFERENCE §1.6, §1.7, §8.4).

The keyword order is the runtime order of mistralrs 0.5.0; additions come last (`seed` on both, `stream`
on completions). Unlike the reference's opaque objects these are dataclasses whose fields read back.
Construction validates every field (TypeError for a wrong type, ValueError for a bad value; both name the
field) and normalises a few so the runner sees one form:
- chat `messages` given as a plain string becomes `[{"role": "user", "content": ...}]`;
- `stop_seqs` given as one string becomes a one-element list;
- `logit_bias` keys given as digit strings become ints, values become floats;
- `tool_schemas` given as JSON strings become dicts, with `"arguments"` renamed to `"parameters"`;
- `tool_choice` given as `"none"`/`"auto"` becomes a `ToolChoice`, and is `ToolChoice.Auto` when tools are
  given without a choice; the OpenAI forced form `{"type": "function", "function": {"name": ...}}` is kept;
- `grammar` given as a dict for `json_schema`/`llguidance` becomes its JSON string;
- `top_logprobs` becomes 1 when `logprobs=True` and it was not given.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import Any

from .enums import ToolChoice

GRAMMAR_TYPES = ("regex", "lark", "json_schema", "llguidance")  # accepted values of `grammar_type`
MAX_TOP_LOGPROBS = 20  # most alternatives per token a request may ask for (as in the OpenAI API)
FLOAT32_MAX = 3.4028234663852886e38  # float fields are used as float32: beyond this they become infinite
_EMPTY_PROMPT = "Received an empty prompt."
_NOT_MESSAGES = "Expected a string or list of dicts."


def _check_bool(owner: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner} must be a bool, got {type(value).__name__}.")
    return value


def _check_int(owner: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner} must be an int, got {type(value).__name__}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner} must be {bounds}, got {value}.")
    return int(value)


def _check_float(owner: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return `value` as a float finite in float32 within the given bounds, or raise naming `owner`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner} must be a float, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner} must be a finite float, got {value}.")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{owner} must be within +-3.4e38 (it is used as a float32, where {value} is infinite).")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{owner} must be {'>' if low_open else '>='} {low}, got {value}.")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{owner} must be {'<' if high_open else '<='} {high}, got {value}.")
    return value


def _check_str(owner: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner} must be a str, got {type(value).__name__}.")
    return value


def _check_str_list(owner: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner} must be a list of str, got {type(value).__name__}.")
    return [_check_str(f"{owner}[{i}]", item) for i, item in enumerate(value)]


def _check_stop_seqs(owner: str, value: Any) -> list[str]:
    """One stop string or a list of them; empty strings are rejected."""
    stops = [value] if isinstance(value, str) else _check_str_list(owner, value)
    if any(not stop for stop in stops):
        raise ValueError(f"{owner} must not contain an empty string.")
    return stops


def _check_logit_bias(owner: str, value: Any) -> dict[int, float]:
    """{token id (int or digit string) >= 0: finite float}."""
    if not isinstance(value, dict):
        raise TypeError(f"{owner} must be a dict of token id to float, got {type(value).__name__}.")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        token_id = _check_int(f"{owner} key {key!r}", token_id, minimum=0)
        biases[token_id] = _check_float(f"{owner}[{key!r}]", bias)
    return biases


def _check_grammar(owner: str, grammar: Any, grammar_type: Any) -> tuple[str | None, str | None]:
    """`grammar` and `grammar_type` come together; JSON kinds may be dicts and must parse as JSON."""
    if grammar is None and grammar_type is None:
        return None, None
    if grammar is None or grammar_type is None:
        raise ValueError(f"{owner}.grammar and {owner}.grammar_type must be given together (or neither).")
    grammar_type = _check_str(f"{owner}.grammar_type", grammar_type)
    if grammar_type not in GRAMMAR_TYPES:
        raise ValueError(f"{owner}.grammar_type must be one of {', '.join(GRAMMAR_TYPES)}; got {grammar_type!r}.")
    is_json = grammar_type in ("json_schema", "llguidance")
    if is_json and isinstance(grammar, (dict, list)):
        grammar = json.dumps(grammar)
    grammar = _check_str(f"{owner}.grammar", grammar)
    if is_json:
        try:
            json.loads(grammar)
        except json.JSONDecodeError as err:
            raise ValueError(f"{owner}.grammar is not valid JSON for grammar_type {grammar_type!r}: {err}") from None
    return grammar, grammar_type


def _check_tool_schema(owner: str, schema: Any) -> dict[str, Any]:
    """One tool: `{"type": "function", "function": {"name", "description"?, "parameters"?}}` (dict or JSON)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"{owner} is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise TypeError(f"{owner} must be a JSON object (str or dict), got {type(schema).__name__}.")
    if schema.get("type", "function") != "function":
        raise ValueError(f"{owner}.type must be 'function', got {schema.get('type')!r}.")
    function = schema.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{owner} must have a 'function' object with a 'name'.")
    _check_str(f"{owner}.function.name", function.get("name"))
    function = dict(function)
    if "parameters" not in function and "arguments" in function:
        function["parameters"] = function.pop("arguments")
    return {**schema, "type": "function", "function": function}


def _check_tool_choice(owner: str, value: Any, tools: list[dict[str, Any]] | None) -> Any:
    """ToolChoice, "none"/"auto"/"required", or the OpenAI forced form naming one of the tools."""
    if value is None:
        return ToolChoice.Auto if tools else None
    if value == "required":   # OpenAI: the model must call one of the tools (constrained generation)
        if not tools:
            raise ValueError(f"{owner} is 'required' but no tool_schemas were given.")
        return value
    if isinstance(value, (ToolChoice, str)):
        try:
            return ToolChoice.from_str(value)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
    if not isinstance(value, dict):
        raise TypeError(f"{owner} must be a ToolChoice, 'none', 'auto' or a function object, got {value!r}.")
    function = value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if value.get("type") != "function" or not isinstance(name, str):
        raise ValueError(f"{owner} as an object must be {{'type': 'function', 'function': {{'name': ...}}}}.")
    if name not in {tool["function"]["name"] for tool in tools or []}:
        raise ValueError(f"{owner} names function {name!r}, which is not among tool_schemas.")
    return value


def _check_tool_calls(owner: str, value: Any) -> None:
    """OpenAI-shaped tool calls of an assistant message: [{"id"?, "type"?, "function": {name, arguments}}]."""
    if not isinstance(value, list):
        raise TypeError(f"{owner} must be a list of tool-call dicts, got {type(value).__name__}.")
    for i, call in enumerate(value):
        where = f"{owner}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise TypeError(f"{where} must be a dict with a 'function' object.")
        _check_str(f"{where}.function.name", function.get("name"))
        if not isinstance(function.get("arguments", ""), (str, dict)):
            raise TypeError(f"{where}.function.arguments must be a JSON str or a dict.")
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function', got {call.get('type')!r}.")
        if call.get("id") is not None:
            _check_str(f"{where}.id", call["id"])


def _check_content_parts(owner: str, parts: list[Any], role: str) -> None:
    """Text parts `{"type": "text", "text"}` and (user only) image parts `{"type": "image_url", "image_url"}`."""
    if not parts:
        raise ValueError(f"{owner} must not be an empty list of parts.")
    for i, part in enumerate(parts):
        where = f"{owner}[{i}]"
        if not isinstance(part, dict):
            raise TypeError(f"{where} must be a dict content part, got {type(part).__name__}.")
        if part.get("type") == "text":
            _check_str(f"{where}.text", part.get("text"))
        elif "image_url" in part:
            if role != "user":
                raise ValueError(f"{where}: image parts are only accepted in 'user' messages, not {role!r}.")
            image = part["image_url"]
            url = image.get("url") if isinstance(image, dict) else image
            _check_str(f"{where}.image_url.url", url)
        else:
            raise ValueError(f"{where}.type must be 'text' or 'image_url', got {part.get('type')!r}.")


def _check_message(owner: str, message: dict[str, Any]) -> None:
    """One chat message: role, content (str, parts, or None with tool calls), optional name/tool fields."""
    if "role" not in message:
        raise ValueError(f"{owner} has no 'role'.")
    role = _check_str(f"{owner}.role", message["role"])
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise ValueError(f"{owner}.tool_calls is only accepted on 'assistant' messages, not {role!r}.")
        _check_tool_calls(f"{owner}.tool_calls", tool_calls)
    content = message.get("content")
    if content is None:
        if not tool_calls:
            raise ValueError(f"{owner}.content is required (it may be None only when tool_calls are given).")
    elif isinstance(content, list):
        _check_content_parts(f"{owner}.content", content, role)
    else:
        _check_str(f"{owner}.content", content)
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            _check_str(f"{owner}.{key}", message[key])


def _check_messages(owner: str, messages: Any) -> list[dict[str, Any]]:
    """A plain string (one user message) or a non-empty list of message dicts; returns the list."""
    if isinstance(messages, str):
        if not messages:
            raise ValueError(f"{_EMPTY_PROMPT} ({owner} is empty)")
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise TypeError(f"{_NOT_MESSAGES} ({owner}: got {type(messages).__name__})")
    if not messages:
        raise ValueError(f"{_EMPTY_PROMPT} ({owner} is empty)")
    for i, message in enumerate(messages):
        _check_message(f"{owner}[{i}]", message)
    return list(messages)


def _validate_shared(request: Any) -> None:
    """Validate and normalise the fields both request kinds have, in place."""
    owner = type(request).__name__
    request.model = _check_str(f"{owner}.model", request.model)
    request.n_choices = _check_int(f"{owner}.n_choices", request.n_choices)
    if request.n_choices < 1:
        raise ValueError(f"Number of choices must be greater than 0. ({owner}.n_choices={request.n_choices})")
    request.stream = _check_bool(f"{owner}.stream", request.stream)
    optional_checks = {
        "logit_bias": _check_logit_bias,
        "max_tokens": partial(_check_int, minimum=1),
        "presence_penalty": _check_float,
        "frequency_penalty": _check_float,
        "stop_seqs": _check_stop_seqs,
        "temperature": partial(_check_float, low=0.0),
        "top_p": partial(_check_float, low=0.0, high=1.0, low_open=True),
        "top_k": partial(_check_int, minimum=0),
        "adapters": _check_str_list,
        "min_p": partial(_check_float, low=0.0, high=1.0, high_open=True),
        "dry_multiplier": partial(_check_float, low=0.0),
        "dry_base": partial(_check_float, low=0.0, low_open=True),
        "dry_allowed_length": partial(_check_int, minimum=0),
        "dry_sequence_breakers": _check_str_list,
        "seed": partial(_check_int, minimum=0),
    }
    for name, check in optional_checks.items():
        value = getattr(request, name)
        if value is not None:
            setattr(request, name, check(f"{owner}.{name}", value))
    request.grammar, request.grammar_type = _check_grammar(owner, request.grammar, request.grammar_type)
    if request.tool_schemas is not None:
        if not isinstance(request.tool_schemas, (list, tuple)):
            raise TypeError(f"{owner}.tool_schemas must be a list of JSON strings or dicts.")
        request.tool_schemas = [
            _check_tool_schema(f"{owner}.tool_schemas[{i}]", schema) for i, schema in enumerate(request.tool_schemas)
        ]
    request.tool_choice = _check_tool_choice(f"{owner}.tool_choice", request.tool_choice, request.tool_schemas)


@dataclass
class ChatCompletionRequest:
    """A chat request (`Runner.send_chat_completion_request`); fields as in OpenAI chat completions."""

    messages: str | list[dict[str, Any]]  # a user prompt string, or OpenAI-style message dicts
    model: str  # ignored for routing; responses carry the loaded model's id
    logprobs: bool = False  # report the log probability of every generated token
    n_choices: int = 1  # independent sequences (choices) to generate; >= 1
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit
    top_logprobs: int | None = None  # alternatives reported per token (0..20); 1 when logprobs and unset
    max_tokens: int | None = None  # most generated tokens; None: up to the model's maximum length
    presence_penalty: float | None = None  # subtracted once per token present in the context
    frequency_penalty: float | None = None  # subtracted per occurrence of a token in the context
    stop_seqs: list[str] | None = None  # strings (or single tokens) that end generation
    temperature: float | None = None  # None means 1.0; below 1e-7 means greedy argmax
    top_p: float | None = None  # nucleus sampling mass in (0, 1]; None = off
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    stream: bool = False  # return an iterator of ChatCompletionChunkResponse
    grammar: str | None = None  # constraint text (regex, Lark, or JSON for json_schema/llguidance)
    grammar_type: str | None = None  # one of GRAMMAR_TYPES; given together with grammar
    adapters: list[str] | None = None  # LoRA adapter names to activate for this request
    min_p: float | None = None  # drop tokens with p < min_p * max_p; in [0, 1)
    tool_schemas: list[str] | None = None  # tools as JSON strings or dicts (stored as dicts)
    tool_choice: ToolChoice | None = None  # Auto/NoTools, "auto"/"none", or a forced function object
    dry_multiplier: float | None = None  # DRY repetition penalty strength; None or 0 = off
    dry_base: float | None = None  # DRY exponential base (default 1.75)
    dry_allowed_length: int | None = None  # DRY: repeats up to this length are free (default 2)
    dry_sequence_breakers: list[str] | None = None  # DRY: strings that stop repeat matching
    seed: int | None = None  # addition: per-request sampling seed for reproducible output

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.messages = _check_messages(f"{owner}.messages", self.messages)
        self.logprobs = _check_bool(f"{owner}.logprobs", self.logprobs)
        if self.top_logprobs is not None:
            self.top_logprobs = _check_int(f"{owner}.top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        elif self.logprobs:
            self.top_logprobs = 1
        _validate_shared(self)


@dataclass
class CompletionRequest:
    """A raw-text completion request (`Runner.send_completion_request`); no chat template is applied."""

    prompt: str  # the text to continue
    model: str  # ignored for routing; responses carry the loaded model's id
    best_of: int = 1  # sequences to generate, of which the most likely (cumulative logprob) are returned
    echo_prompt: bool = False  # put the prompt in front of the returned text
    presence_penalty: float | None = None  # subtracted once per token present in the context
    frequency_penalty: float | None = None  # subtracted per occurrence of a token in the context
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit
    max_tokens: int | None = None  # most generated tokens; None: up to the model's maximum length
    n_choices: int = 1  # choices to return; >= 1
    stop_seqs: list[str] | None = None  # strings (or single tokens) that end generation
    temperature: float | None = None  # None means 1.0; below 1e-7 means greedy argmax
    top_p: float | None = None  # nucleus sampling mass in (0, 1]; None = off
    suffix: str | None = None  # appended to the returned text
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    grammar: str | None = None  # constraint text (regex, Lark, or JSON for json_schema/llguidance)
    grammar_type: str | None = None  # one of GRAMMAR_TYPES; given together with grammar
    adapters: list[str] | None = None  # LoRA adapter names to activate for this request
    min_p: float | None = None  # drop tokens with p < min_p * max_p; in [0, 1)
    tool_schemas: list[str] | None = None  # tools as JSON strings or dicts (stored as dicts)
    tool_choice: ToolChoice | None = None  # Auto/NoTools, "auto"/"none", or a forced function object
    dry_multiplier: float | None = None  # DRY repetition penalty strength; None or 0 = off
    dry_base: float | None = None  # DRY exponential base (default 1.75)
    dry_allowed_length: int | None = None  # DRY: repeats up to this length are free (default 2)
    dry_sequence_breakers: list[str] | None = None  # DRY: strings that stop repeat matching
    stream: bool = False  # addition: return an iterator of CompletionChunkResponse (reference: none)
    seed: int | None = None  # addition: per-request sampling seed for reproducible output

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.prompt = _check_str(f"{owner}.prompt", self.prompt)
        if not self.prompt:
            raise ValueError(f"{_EMPTY_PROMPT} ({owner}.prompt is empty)")
        self.best_of = _check_int(f"{owner}.best_of", self.best_of, minimum=1)
        self.echo_prompt = _check_bool(f"{owner}.echo_prompt", self.echo_prompt)
        if self.suffix is not None:
            self.suffix = _check_str(f"{owner}.suffix", self.suffix)
        _validate_shared(self)
