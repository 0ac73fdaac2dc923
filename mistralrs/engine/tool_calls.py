"""Tool calls parsed out of generated text (REFERENCE §8.6).

Models announce calls in a few wrappers: Llama 3.x `<|python_tag|>{...}` (or a bare JSON object), Hermes / Qwen
`<tool_call>{...}</tool_call>` (one block per call), Mistral `[TOOL_CALLS][{...}, ...]`. Inside, a call is
`{"name": str, "parameters" | "arguments": {...}}` (`function` is accepted for `name`), alone or in a list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.DOTALL)
_OPENERS = (PYTHON_TAG, MISTRAL_TAG, HERMES_OPEN, "{", "[")


@dataclass
class ParsedToolCall:
    """One call found in the text."""

    name: str        # function name
    arguments: str   # its arguments as a JSON object string


def _call_from(obj: object) -> ParsedToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name", obj.get("function"))
    if isinstance(name, dict):          # OpenAI-shaped {"function": {"name", "arguments"}}
        obj, name = name, name.get("name")
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ParsedToolCall(name, json.dumps(args, ensure_ascii=False))


def _calls_from_json(text: str) -> list[ParsedToolCall] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls


def parse_tool_calls(text: str) -> list[ParsedToolCall] | None:
    """The calls in `text` when the whole text is tool calls in a known wrapper; None when it is plain text."""
    body = text.strip()
    if body.startswith(HERMES_OPEN):
        blocks = _HERMES_BLOCK.findall(body)
        if not blocks or _HERMES_BLOCK.sub("", body).strip():
            return None
        calls: list[ParsedToolCall] = []
        for block in blocks:
            found = _calls_from_json(block.strip())
            if found is None:
                return None
            calls.extend(found)
        return calls
    for tag in (PYTHON_TAG, MISTRAL_TAG):
        if body.startswith(tag):
            body = body[len(tag):].strip()
            break
    return _calls_from_json(body)


def may_become_tool_call(text: str) -> bool:
    """While streaming: True when the text so far could still turn out to be a tool call (hold it back)."""
    body = text.lstrip()
    if not body:
        return True
    return any(body.startswith(o) or o.startswith(body) for o in _OPENERS)


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # keywords holding a list of schemas
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # keywords holding name → schema
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else")  # keywords holding one schema


def _is_object_schema(schema: dict) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def strict_schema(schema: object, fragment: bool = False) -> object:
    """A copy of a JSON schema where every object schema that does not set `additionalProperties` itself gets
    `"additionalProperties": false`, as OpenAI's strict tool calls read a function's parameters: only the
    declared properties, each at most once (llguidance would otherwise allow any extra key, repeated).

    Objects built with `allOf` stay open, and so do the `allOf` parts (`fragment`) themselves: there
    `additionalProperties` would not see the properties the other parts declare and would reject them.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            strict[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key == "allOf" and isinstance(value, list):
            strict[key] = [strict_schema(part, fragment=True) for part in value]
        elif key in _SUBSCHEMA_LISTS or key in _SUBSCHEMAS:
            strict[key] = strict_schema(value)
        else:
            strict[key] = value
    open_object = fragment or "allOf" in strict or "additionalProperties" in strict
    if _is_object_schema(strict) and not open_object:
        strict["additionalProperties"] = False
    return strict


def _call_schema(tool: dict) -> dict:
    """JSON schema of one call of an OpenAI-shaped tool: {"name": const, "arguments": its parameters, strict}."""
    function = tool["function"]
    parameters = strict_schema(function.get("parameters") or {"type": "object"})
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_schema(tools: list[dict], tool_choice: object) -> dict | None:
    """The JSON schema generation is held to for a forced tool choice; None when the choice forces nothing.

    `tool_choice` is "required" (a call of any tool) or `{"type": "function", "function": {"name": ...}}`
    (a call of that tool); anything else (auto, none) leaves generation free. The output is plain JSON,
    which `parse_tool_calls` accepts whatever the model's own wrapper is. The arguments follow the parameters
    schema strictly (`strict_schema`).
    """
    if tool_choice == "required":
        schemas = [_call_schema(tool) for tool in tools]
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return _call_schema(next(tool for tool in tools if tool["function"]["name"] == name))
    return None


class ToolCallStream:
    """Streaming: holds a choice's text back while it may still become a tool call.

    `feed(text, finished)` returns (text to show now, parsed calls or None). Once the text can no longer be a
    call, everything held is released and later text passes straight through.
    """

    def __init__(self) -> None:
        self.held = ""  # text kept back so far
        self.released = False  # the text turned out to be plain content

    def feed(self, text: str, finished: bool) -> tuple[str, list[ParsedToolCall] | None]:
        if self.released:
            return text, None
        self.held += text
        if finished:
            calls = parse_tool_calls(self.held)
            if calls:
                return "", calls
            self.released = True
            return self.held, None
        if may_become_tool_call(self.held):
            return "", None
        self.released = True
        return self.held, None
