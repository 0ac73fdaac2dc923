"""Response objects returned by `Runner` (REFERENCE §1.8).

Keyword-constructed dataclasses with the reference's field names. `created` is unix seconds everywhere
(the reference used milliseconds in stream chunks, a bug). `to_dict()` gives the JSON body the HTTP server
sends: the field-by-field form, recursively, where a tool call's `tp` is written as `"type": "function"`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from .enums import ToolCallType


def _unix_seconds() -> int:
    return int(time.time())


def _jsonable(value: Any) -> Any:
    """Recursively turn response objects (anything with `to_dict`) and lists into JSON values."""
    if isinstance(value, _Response):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


class _Response:
    """Base of the response dataclasses: provides `to_dict()`."""

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-compatible JSON form of this object (nested objects and lists converted)."""
        return {spec.name: _jsonable(getattr(self, spec.name)) for spec in fields(self)}


@dataclass(kw_only=True)
class Usage(_Response):
    """Token counts and timings of one request; times are measured from when the request was queued."""

    completion_tokens: int  # tokens generated, over all choices
    prompt_tokens: int  # tokens of the prompt
    total_tokens: int  # prompt_tokens + completion_tokens
    avg_tok_per_sec: float  # total_tokens / total_time_sec
    avg_prompt_tok_per_sec: float  # prompt_tokens / total_prompt_time_sec
    avg_compl_tok_per_sec: float  # completion_tokens / total_completion_time_sec
    total_time_sec: float  # queueing to the last token
    total_prompt_time_sec: float  # queueing to the end of prefill
    total_completion_time_sec: float  # end of prefill to the last token
    cached_prompt_tokens: int = 0  # addition: prompt tokens served from the prefix cache

    def to_dict(self) -> dict[str, Any]:
        """All fields, plus OpenAI's `prompt_tokens_details.cached_tokens` (= cached_prompt_tokens)."""
        body = super().to_dict()
        body["prompt_tokens_details"] = {"cached_tokens": self.cached_prompt_tokens}
        return body


@dataclass(kw_only=True)
class TopLogprob(_Response):
    """One alternative token at a position (reference form: `token` is the id, `bytes` the text)."""

    token: int  # token id
    logprob: float  # natural log of its probability
    bytes: str | None = None  # decoded text of the token


@dataclass(kw_only=True)
class ResponseLogprob(_Response):
    """Log probability of one generated token, with the most likely alternatives."""

    token: str  # decoded text of the generated token
    logprob: float  # natural log of its probability
    bytes: list[int] | None = None  # UTF-8 bytes of the token text
    top_logprobs: list[TopLogprob] = field(default_factory=list)  # most likely tokens at this position


@dataclass(kw_only=True)
class Logprobs(_Response):
    """Per-token log probabilities of one choice."""

    content: list[ResponseLogprob] | None = None  # one entry per generated token


@dataclass(kw_only=True)
class CalledFunction(_Response):
    """The function a tool call invokes."""

    name: str  # function name
    arguments: str  # arguments as a JSON string


@dataclass(kw_only=True)
class ToolCallResponse(_Response):
    """One parsed tool call. The attribute is `tp` as in the reference; `type` reads the same value."""

    id: str = field(default_factory=lambda: f"call-{uuid.uuid4()}")  # "call-<uuid4>"
    tp: ToolCallType = ToolCallType.Function  # always Function
    function: CalledFunction  # name and JSON arguments

    @property
    def type(self) -> ToolCallType:
        """Alias of `tp` (the OpenAI field name)."""
        return self.tp

    def to_dict(self) -> dict[str, Any]:
        """OpenAI form: `{"id", "type": "function", "function": {"name", "arguments"}}`."""
        return {"id": self.id, "type": self.tp.cli_names[0], "function": self.function.to_dict()}


@dataclass(kw_only=True)
class ResponseMessage(_Response):
    """The assistant message of a chat choice."""

    content: str | None  # generated text; None when tool calls were parsed from it
    role: str = "assistant"  # always "assistant"
    tool_calls: list[ToolCallResponse] | None = None  # parsed tool calls, if any


@dataclass(kw_only=True)
class Choice(_Response):
    """One choice of a chat response."""

    finish_reason: str  # "stop", "length", "canceled" or "generated-image"
    index: int  # choice number
    message: ResponseMessage  # the generated message
    logprobs: Logprobs | None = None  # set when the request asked for logprobs


@dataclass(kw_only=True)
class ChatCompletionResponse(_Response):
    """Result of a non-streaming chat request."""

    id: str  # request id
    choices: list[Choice]  # in the order the sequences finished
    created: int = field(default_factory=_unix_seconds)  # unix seconds
    model: str  # id of the loaded model
    system_fingerprint: str = "local"  # always "local"
    object: str = "chat.completion"  # always "chat.completion"
    usage: Usage  # token counts and timings


@dataclass(kw_only=True)
class Delta(_Response):
    """The new piece of an assistant message in a stream chunk."""

    content: str | None  # new text; None when the chunk carries tool calls or only a finish reason
    role: str = "assistant"  # always "assistant"
    tool_calls: list[ToolCallResponse] | None = None  # tool calls, once parsed


@dataclass(kw_only=True)
class ChunkChoice(_Response):
    """One choice of a stream chunk."""

    finish_reason: str | None  # None until the choice finishes
    index: int  # choice number
    delta: Delta  # the new piece
    logprobs: ResponseLogprob | None = None  # logprob of the token(s) in this piece, when asked for


@dataclass(kw_only=True)
class ChatCompletionChunkResponse(_Response):
    """One chunk of a streaming chat response."""

    id: str  # request id
    choices: list[ChunkChoice]  # one per choice that produced a piece this step
    created: int = field(default_factory=_unix_seconds)  # unix seconds (the reference used ms: fixed)
    model: str  # id of the loaded model
    system_fingerprint: str = "local"  # always "local"
    object: str = "chat.completion.chunk"  # always "chat.completion.chunk"
    usage: Usage | None = None  # set on the final chunk only


@dataclass(kw_only=True)
class CompletionChoice(_Response):
    """One choice of a completion response."""

    finish_reason: str  # "stop", "length" or "canceled"
    index: int  # choice number
    text: str  # generated text (with the prompt in front when echo_prompt, suffix appended)
    logprobs: Logprobs | None = None  # always None: completions do not report logprobs


@dataclass(kw_only=True)
class CompletionResponse(_Response):
    """Result of a non-streaming completion request."""

    id: str  # request id
    choices: list[CompletionChoice]  # in the order the sequences finished
    created: int = field(default_factory=_unix_seconds)  # unix seconds
    model: str  # id of the loaded model
    system_fingerprint: str = "local"  # always "local"
    object: str = "text_completion"  # always "text_completion"
    usage: Usage  # token counts and timings


@dataclass(kw_only=True)
class CompletionChunkChoice(_Response):
    """One choice of a streaming completion chunk (addition: the reference Python API cannot stream these)."""

    finish_reason: str | None  # None until the choice finishes
    index: int  # choice number
    text: str  # new text
    logprobs: Logprobs | None = None  # always None


@dataclass(kw_only=True)
class CompletionChunkResponse(_Response):
    """One chunk of a streaming completion (OpenAI `text_completion` chunk)."""

    id: str  # request id
    choices: list[CompletionChunkChoice]  # one per choice that produced a piece this step
    created: int = field(default_factory=_unix_seconds)  # unix seconds
    model: str  # id of the loaded model
    system_fingerprint: str = "local"  # always "local"
    object: str = "text_completion"  # always "text_completion"
    usage: Usage | None = None  # set on the final chunk only


@dataclass(kw_only=True)
class ImageChoice(_Response):
    """One generated image: a local PNG path or a base64 data URL, by the requested format."""

    url: str | None = None  # path of the saved PNG (`image-generation-<uuid>.png`)
    b64_json: str | None = None  # "data:image/png;base64,..." string


@dataclass(kw_only=True)
class ImageGenerationResponse(_Response):
    """Result of `Runner.generate_image`."""

    created: int = field(default_factory=_unix_seconds)  # unix seconds
    data: list[ImageChoice]  # the generated images

    @property
    def choices(self) -> list[ImageChoice]:
        """Alias of `data` (the reference stub's and flux example's name)."""
        return self.data
