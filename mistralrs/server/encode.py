"""Response objects → HTTP JSON: `to_dict()`, with logprobs in the OpenAI shapes.

The Python API keeps the reference's logprob objects (a top alternative's `token` is its id, `bytes` its
text). Over HTTP the OpenAI shapes are used, so that the `openai` client parses them:
- chat: `choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}]}` where every `token` is text and `bytes` its UTF-8 bytes; a stream chunk carries the
  same `{"content": [...]}` form for the token(s) of that chunk;
- a chat stream chunk's `delta.tool_calls` entries carry their `index` (the OpenAI streaming shape);
- completions (legacy): `choices[i].logprobs = {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}],
  "text_offset"}`.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

from mistralrs.api.responses import (
    ChatCompletionChunkResponse, ChatCompletionResponse, CompletionChunkResponse, CompletionResponse, Logprobs,
    ResponseLogprob,
)


def json_bytes(value: Any) -> bytes:
    """Compact JSON (non-finite floats become null, as JSON has no infinity)."""
    return to_json(value, inf_nan_mode="null")


def _openai_logprob(entry: ResponseLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes,
            "top_logprobs": [{"token": top.bytes or "", "logprob": top.logprob,
                              "bytes": list((top.bytes or "").encode("utf-8"))} for top in entry.top_logprobs]}


def _legacy_logprobs(logprobs: Logprobs, text_offset: int) -> dict[str, Any]:
    """OpenAI completions form; `text_offset` is where the first token's text starts in the choice text."""
    entries = logprobs.content or []
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{top.bytes or "": top.logprob for top in e.top_logprobs} for e in entries],
            "text_offset": offsets}


def chat_response(response: ChatCompletionResponse) -> dict[str, Any]:
    """JSON body of a chat completion."""
    body = response.to_dict()
    for choice, out in zip(response.choices, body["choices"]):
        if choice.logprobs is not None:
            out["logprobs"] = {"content": [_openai_logprob(e) for e in choice.logprobs.content or []]}
    return body


def chat_chunk(chunk: ChatCompletionChunkResponse) -> dict[str, Any]:
    """JSON of one chat stream chunk."""
    body = chunk.to_dict()
    for choice, out in zip(chunk.choices, body["choices"]):
        if choice.logprobs is not None:
            out["logprobs"] = {"content": [_openai_logprob(choice.logprobs)]}
        for index, call in enumerate(out["delta"].get("tool_calls") or []):
            call["index"] = index   # OpenAI streaming shape: each tool-call delta names its position
    return body


def completion_response(response: CompletionResponse, prompt_chars: int) -> dict[str, Any]:
    """JSON body of a completion; `prompt_chars` is the length of the echoed prompt (0 without echo)."""
    body = response.to_dict()
    for choice, out in zip(response.choices, body["choices"]):
        if choice.logprobs is not None:
            out["logprobs"] = _legacy_logprobs(choice.logprobs, prompt_chars)
    return body


class CompletionChunkEncoder:
    """JSON of completion stream chunks; keeps each choice's text offset for the legacy logprobs."""

    def __init__(self) -> None:
        self.text_offsets: dict[int, int] = {}  # choice index -> characters streamed so far

    def __call__(self, chunk: CompletionChunkResponse) -> dict[str, Any]:
        body = chunk.to_dict()
        for choice, out in zip(chunk.choices, body["choices"]):
            offset = self.text_offsets.get(choice.index, 0)
            if choice.logprobs is not None:
                out["logprobs"] = _legacy_logprobs(choice.logprobs, offset)
            self.text_offsets[choice.index] = offset + len(choice.text)
        return body
