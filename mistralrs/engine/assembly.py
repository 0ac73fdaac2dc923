"""Turns the engine messages of one request into the API's response objects (chat and completion, streaming or
not, with tool calls parsed from chat output).

A stream ends with the chunk in which the last choice finishes, carrying the request's `usage` (REFERENCE §1.8,
§1.9): the engine puts the deltas that finish the last choice right before `RequestFinished`, so that chunk is
held back until the usage is known. There is no chunk without choices (the HTTP server makes OpenAI's separate
usage chunk when a client asks for it).
"""

from __future__ import annotations

from mistralrs.api.requests import CompletionRequest
from mistralrs.api.responses import (
    CalledFunction,
    ChatCompletionChunkResponse,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionChunkChoice,
    CompletionChunkResponse,
    CompletionResponse,
    Delta,
    Logprobs,
    ResponseLogprob,
    ResponseMessage,
    ToolCallResponse,
    TopLogprob,
    Usage,
)
from mistralrs.engine.request import RequestFinished, SeqDelta, SeqResult, TokenLogprob
from mistralrs.engine.tool_calls import ParsedToolCall, ToolCallStream, parse_tool_calls

EngineMessage = list[SeqDelta] | RequestFinished  # what the engine puts on a request's `outputs` queue


def _usage(done: RequestFinished) -> Usage:
    total_tokens = done.num_prompt_tokens + done.num_completion_tokens

    def rate(count: int, seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    return Usage(
        completion_tokens=done.num_completion_tokens, prompt_tokens=done.num_prompt_tokens,
        total_tokens=total_tokens,
        avg_tok_per_sec=rate(total_tokens, done.total_time_sec),
        avg_prompt_tok_per_sec=rate(done.num_prompt_tokens - done.num_cached_prompt_tokens, done.prompt_time_sec),
        avg_compl_tok_per_sec=rate(done.num_completion_tokens, done.completion_time_sec),
        total_time_sec=done.total_time_sec, total_prompt_time_sec=done.prompt_time_sec,
        total_completion_time_sec=done.completion_time_sec,
        cached_prompt_tokens=done.num_cached_prompt_tokens,
    )


def _response_logprob(entry: TokenLogprob) -> ResponseLogprob:
    return ResponseLogprob(
        token=entry.text, logprob=entry.logprob, bytes=list(entry.text.encode("utf-8")),
        top_logprobs=[TopLogprob(token=tid, logprob=lp, bytes=text) for tid, text, lp in entry.top])


class _FinalChunk:
    """Holds back the chunk in which the last of a request's choices finishes, until `usage` is known."""

    def __init__(self, num_choices: int) -> None:
        self.num_choices = num_choices  # choices the request streams
        self.finished: set[int] = set()  # indices of the choices that finished so far
        self.held = None  # the last chunk, waiting for the usage

    def pass_on(self, chunk, finished: list[int]) -> list:
        """`[chunk]`, or [] while it is held back because it finishes the last choice."""
        self.finished.update(finished)
        if len(self.finished) < self.num_choices:
            return [chunk]
        self.held = chunk
        return []

    def release(self, done: RequestFinished) -> list:
        """The held chunk with the request's usage (the engine sent every choice's finish before `done`)."""
        chunk, self.held = self.held, None
        chunk.usage = _usage(done)
        return [chunk]


class _LeadingSpaceTrimmer:
    """Chat output starts at its first non-whitespace character (REFERENCE §1.8), per choice."""

    def __init__(self) -> None:
        self.started: set[int] = set()

    def __call__(self, index: int, text: str) -> str:
        if index in self.started:
            return text
        text = text.lstrip()
        if text:
            self.started.add(index)
        return text


def _tool_calls(calls: list[ParsedToolCall]) -> list[ToolCallResponse]:
    return [ToolCallResponse(function=CalledFunction(name=c.name, arguments=c.arguments)) for c in calls]


class ChatAssembler:
    """Turns the engine messages of one chat request into chunks (streaming) or the final response.

    With `parse_tools`, a choice whose whole text is tool calls (engine/tool_calls.py) gets `tool_calls`,
    content None and finish_reason "tool_calls"; while streaming, its text is held back as long as it may
    still become a call.
    """

    def __init__(self, request_id: str, model_id: str, num_choices: int, want_logprobs: bool,
                 parse_tools: bool = False) -> None:
        self.request_id = request_id  # the response `id`
        self.model_id = model_id  # the response `model`
        self.want_logprobs = want_logprobs  # the request asked for logprobs
        self.parse_tools = parse_tools  # tools were given and tool_choice is not "none"
        self._trim = _LeadingSpaceTrimmer()  # leading whitespace of each choice's stream
        self._tool_streams: dict[int, ToolCallStream] = {}  # choice index -> held-back text
        self._final = _FinalChunk(num_choices)  # the last chunk, completed with the usage

    def chunks(self, message: EngineMessage) -> list[ChatCompletionChunkResponse]:
        """The chunks one engine message gives: deltas of text (and logprobs); the chunk that finishes the last
        choice comes with `RequestFinished`, carrying the usage."""
        if isinstance(message, RequestFinished):
            return self._final.release(message)
        choices = []
        for delta in message:
            text = self._trim(delta.index, delta.text)
            calls = None
            if self.parse_tools:
                stream = self._tool_streams.setdefault(delta.index, ToolCallStream())
                text, calls = stream.feed(text, delta.finish_reason is not None)
            # a token whose text is held back (stop-string prefix, leading space) still reports its logprob
            logprob = _response_logprob(delta.logprobs[0]) if self.want_logprobs and delta.logprobs else None
            if not text and delta.finish_reason is None and logprob is None:
                continue
            if calls:
                choices.append(ChunkChoice(finish_reason="tool_calls", index=delta.index, logprobs=logprob,
                                           delta=Delta(content=None, tool_calls=_tool_calls(calls))))
                continue
            choices.append(ChunkChoice(finish_reason=delta.finish_reason, index=delta.index,
                                       delta=Delta(content=text), logprobs=logprob))
        if not choices:
            return []
        chunk = ChatCompletionChunkResponse(id=self.request_id, choices=choices, model=self.model_id)
        return self._final.pass_on(chunk, [c.index for c in choices if c.finish_reason is not None])

    def response(self, done: RequestFinished) -> ChatCompletionResponse:
        """The non-streaming response once every choice finished."""
        trim = _LeadingSpaceTrimmer()
        choices = []
        for result in done.results:
            content = trim(result.index, result.text)
            calls = parse_tool_calls(content) if self.parse_tools else None
            message = ResponseMessage(content=None, tool_calls=_tool_calls(calls)) if calls else \
                ResponseMessage(content=content)
            choices.append(Choice(finish_reason="tool_calls" if calls else result.finish_reason, index=result.index,
                                  message=message, logprobs=self._logprobs(result)))
        return ChatCompletionResponse(id=self.request_id, choices=choices, model=self.model_id,
                                      usage=_usage(done))

    def _logprobs(self, result: SeqResult) -> Logprobs | None:
        if not self.want_logprobs:
            return None
        return Logprobs(content=[_response_logprob(e) for e in result.logprobs])


class CompletionAssembler:
    """Turns the engine messages of one completion request into chunks (streaming) or the final response."""

    def __init__(self, request_id: str, model_id: str, request: CompletionRequest, want_logprobs: bool) -> None:
        self.request_id = request_id  # the response `id`
        self.model_id = model_id  # the response `model`
        self.request = request  # for n_choices, echo_prompt and suffix
        self.want_logprobs = want_logprobs  # fill `logprobs` (an addition: the Python API never asks)
        self._final = _FinalChunk(request.n_choices)  # the last chunk, completed with the usage (streaming only)

    def chunks(self, message: EngineMessage) -> list[CompletionChunkResponse]:
        """The chunks one engine message gives: deltas of text (and logprobs); the chunk that finishes the last
        choice comes with `RequestFinished`, carrying the usage."""
        if isinstance(message, RequestFinished):
            return self._final.release(message)
        choices = []
        for delta in message:
            logprobs = None
            if self.want_logprobs and delta.logprobs:
                logprobs = Logprobs(content=[_response_logprob(e) for e in delta.logprobs])
            if delta.text or delta.finish_reason is not None or logprobs is not None:
                choices.append(CompletionChunkChoice(finish_reason=delta.finish_reason, index=delta.index,
                                                     text=delta.text, logprobs=logprobs))
        if not choices:
            return []
        chunk = CompletionChunkResponse(id=self.request_id, choices=choices, model=self.model_id)
        return self._final.pass_on(chunk, [c.index for c in choices if c.finish_reason is not None])

    def response(self, done: RequestFinished) -> CompletionResponse:
        """The non-streaming response: the `n_choices` most likely of the generated sequences."""
        request = self.request
        # OpenAI best_of: generate best_of sequences, return the n_choices most likely (the reference reverses it)
        best = sorted(done.results, key=lambda r: r.cumulative_logprob, reverse=True)[:request.n_choices]
        prefix = request.prompt if request.echo_prompt else ""
        choices = []
        for i, result in enumerate(sorted(best, key=lambda r: r.index)):
            logprobs = None
            if self.want_logprobs:
                logprobs = Logprobs(content=[_response_logprob(e) for e in result.logprobs])
            choices.append(CompletionChoice(finish_reason=result.finish_reason, index=i,
                                            text=prefix + result.text + (request.suffix or ""), logprobs=logprobs))
        return CompletionResponse(id=self.request_id, choices=choices, model=self.model_id, usage=_usage(done))
