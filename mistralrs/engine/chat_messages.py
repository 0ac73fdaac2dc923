"""Chat messages as chat templates expect them: the front door's input side, for the Python API and HTTP alike.

OpenAI-shaped messages may hold what the templates on the Hub cannot print:
- content as a list of parts: the text parts are joined with newlines; an image part is refused with a
  ValueError naming the message and the part (this is a text model);
- an assistant message with `content: null` (or "") and `tool_calls`: a template that prints `tool_calls` itself
  gets the message as transformers passes it; any other template (SmolLM2's concatenates `message['content']`)
  gets the calls as the content, written as the model writes a call (JSON `{"name", "arguments"}`, a list when
  there are several), so that the conversation keeps them (the reference server does the same, REFERENCE §2.3);
- tool-call `arguments` as a JSON string: templates get a dict, as they expect.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})  # OpenAI's and transformers' image parts


class ContentPartError(ValueError):
    """An image content part sent to this text model (HTTP: 400, `param` naming the part)."""

    http_status = 400  # the server's status for it
    error_code = "image_input_not_supported"  # the server's `code` for it

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param  # where the part is: "messages[i].content[j]"


def template_messages(messages: str | list[dict[str, Any]], template_prints_tool_calls: bool) -> list[dict[str, Any]]:
    """`messages` (a user prompt string, or message dicts) ready for the chat template; the given dicts are not
    changed. `template_prints_tool_calls`: the template renders `tool_calls` itself."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    converted = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": _text_of_parts(i, content)}
        if message.get("tool_calls"):
            message = _with_dict_arguments(message)
            if not message.get("content") and not template_prints_tool_calls:
                message = {**message, "content": _calls_as_text(message["tool_calls"])}
        converted.append(message)
    return converted


def _text_of_parts(index: int, parts: list[Any]) -> str:
    """The text parts of message `index`'s content joined with newlines; an image part is a ContentPartError."""
    texts = []
    for j, part in enumerate(parts):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in IMAGE_PART_TYPES or (isinstance(part, dict) and "image_url" in part):
            raise ContentPartError(f"{where}: image input is not supported by this model, a text-only model "
                                   "(vision models are not built in this version)", where)
        else:
            raise ValueError(f"{where} must be {{'type': 'text', 'text': str}}; got {part!r:.200}")
    return "\n".join(texts)


def _with_dict_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool calls with their JSON `arguments` as dicts, as chat templates expect."""
    converted = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass   # templates that print the arguments get the string as it was sent
        converted.append({**call, "type": call.get("type", "function"), "function": function})
    return {**message, "tool_calls": converted}


def _calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls written as the model writes one: `{"name", "arguments"}`, a list when there are several."""
    written = [{"name": call["function"].get("name"), "arguments": call["function"].get("arguments", {})}
               for call in calls]
    return json.dumps(written[0] if len(written) == 1 else written, ensure_ascii=False)
