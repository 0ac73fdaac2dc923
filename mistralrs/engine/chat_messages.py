"""Chat messages as chat templates expect them: the front door's input side, for the Python API and HTTP alike.

OpenAI-shaped messages may hold what the templates on the Hub cannot print:
- content as a list of parts: the text parts are joined with newlines; an image part is refused with a
  ValueError naming the message and the part for a text model; for a vision model (`image_text` given) it is
  written as `image_text` in its place among the text parts ("" drops it), or with `native_images` the content
  stays a list of `{"type": "image"}` and `{"type": "text", "text": ...}` parts in the order sent, for templates
  that print image parts themselves (engine/image_prompt.py chooses);
- an assistant message with `content: null` (or "") and `tool_calls`: a template that prints `tool_calls` itself
  gets the message as transformers passes it; any other template (SmolLM2's concatenates `message['content']`)
  gets the calls as the content, written as the model writes a call (JSON `{"name", "arguments"}`, a list when
  there are several), so that the conversation keeps them (the reference server does the same, REFERENCE §2.3);
- tool-call `arguments` as a JSON string: templates get a dict, as they expect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})  # OpenAI's and transformers' image parts


class ContentPartError(ValueError):
    """An image content part sent to this text model (HTTP: 400, `param` naming the part)."""

    http_status = 400  # the server's status for it
    error_code = "image_input_not_supported"  # the server's `code` for it

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param  # where the part is: "messages[i].content[j]"


@dataclass(frozen=True)
class ImagePart:
    """One image content part of a chat request."""

    where: str  # "messages[i].content[j]"
    source: Any  # what the part names: a URL / path / base64 string, bytes, or a PIL image (Python API)


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in IMAGE_PART_TYPES or "image_url" in part)


def _image_source(part: dict[str, Any], where: str) -> Any:
    """The image an image part names: `image_url` (a string or `{"url": ...}`), else transformers' `image`."""
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        value = part.get("image")
    if value is None or value == "":
        raise ValueError(f"{where}: an image part needs an image_url {{'url': ...}} (or `image`), got {part!r:.200}")
    return value


def image_parts(messages: str | list[dict[str, Any]]) -> list[ImagePart]:
    """The image parts of a request's messages, in conversation order (ValueError for a part naming no image)."""
    if isinstance(messages, str):
        return []
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if _is_image_part(part):
                where = f"messages[{i}].content[{j}]"
                found.append(ImagePart(where, _image_source(part, where)))
    return found


def placeholders_typed(messages: str | list[dict[str, Any]], count_in: Callable[[str], int]) -> int:
    """How many image placeholders (`count_in(text)` of each text) the request's own text holds (content strings
    and text parts)."""
    if isinstance(messages, str):
        return count_in(messages)
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            count += count_in(content)
        elif isinstance(content, list):
            count += sum(count_in(part["text"]) for part in content
                         if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return count


def template_messages(messages: str | list[dict[str, Any]], template_prints_tool_calls: bool,
                      image_text: str | None = None, native_images: bool = False) -> list[dict[str, Any]]:
    """`messages` (a user prompt string, or message dicts) ready for the chat template; the given dicts are not
    changed. `template_prints_tool_calls`: the template renders `tool_calls` itself. `image_text`: None for a
    text model (an image part is a ContentPartError), else what an image part is written as (see the module
    docstring, also for `native_images`)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    converted = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = _native_parts(i, content) if native_images else _text_of_parts(i, content, image_text)
            message = {**message, "content": parts}
        if message.get("tool_calls"):
            message = _with_dict_arguments(message)
            if not message.get("content") and not template_prints_tool_calls:
                message = {**message, "content": _calls_as_text(message["tool_calls"])}
        converted.append(message)
    return converted


def _text_of_parts(index: int, parts: list[Any], image_text: str | None) -> str:
    """The text parts of message `index`'s content joined with newlines, an image part written as `image_text`
    (dropped when it is ""); an image part is a ContentPartError when `image_text` is None (a text model)."""
    texts = []
    for j, part in enumerate(parts):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif _is_image_part(part):
            if image_text is None:
                raise ContentPartError(f"{where}: image input is not supported by this model, a text-only model",
                                       where)
            if image_text:
                texts.append(image_text)
        else:
            raise ValueError(f"{where} must be {{'type': 'text', 'text': str}}; got {part!r:.200}")
    return "\n".join(texts)


def _native_parts(index: int, parts: list[Any]) -> list[dict[str, str]]:
    """Message `index`'s parts as templates that print images expect: `{"type": "image"}` and text parts."""
    converted = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            converted.append({"type": "text", "text": part["text"]})
        elif _is_image_part(part):
            converted.append({"type": "image"})
        else:
            raise ValueError(f"messages[{index}].content[{j}] must be {{'type': 'text', 'text': str}}; "
                             f"got {part!r:.200}")
    return converted


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
