"""`Runner`: the entry point of the Python API (REFERENCE §1.4, §1.5).

A request goes through `submit_chat_completion` / `submit_completion`, which hand it to the engine and return a
`Submission`: the engine request (whose `outputs` queue receives the engine's messages) and an assembler that
turns those messages into response objects. The blocking `send_*` methods wait on the queue; the HTTP server
passes its own non-blocking `outputs` sink and uses the same assemblers.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from mistralrs.adapters.lora import activate_adapters
from mistralrs.api.load_spec import load_spec
from mistralrs.adapters.runtime import request_adapter_set
from mistralrs.api.enums import ToolChoice
from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest
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
from mistralrs.engine.builder import EngineConfig, build_engine, on_short_lived_thread
from mistralrs.engine.input_processor import GenerationOptions
from mistralrs.engine.request import (
    EngineRequest,
    RequestFinished,
    SeqDelta,
    SeqResult,
    TokenLogprob,
)
from mistralrs.engine.tool_calls import (
    ParsedToolCall,
    ToolCallStream,
    forced_call_schema,
    parse_tool_calls,
)
from mistralrs.loader.pipeline import load
from mistralrs.quant.isq import re_isq_config
from mistralrs.sample.grammar import json_schema_source

logger = logging.getLogger(__name__)

_request_ids = itertools.count()
TRUNCATION_RESERVE = 10  # tokens left for generation when a truncated prompt's request has no max_tokens

EngineMessage = list[SeqDelta] | RequestFinished  # what the engine puts on a request's `outputs` queue


def _not_built(name: str, value, default, what: str) -> None:
    if value != default:
        raise ValueError(f"{name}={value!r} is not supported yet: {what} is not built in this version")


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


def _options(request, logprobs: bool, top_logprobs: int | None) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        min_p=request.min_p, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, logit_bias=request.logit_bias, stop_seqs=request.stop_seqs,
        logprobs=logprobs, top_logprobs=top_logprobs,
        dry_multiplier=request.dry_multiplier, dry_base=request.dry_base,
        dry_allowed_length=request.dry_allowed_length, dry_sequence_breakers=request.dry_sequence_breakers,
        seed=request.seed)


def _template_message(message: dict) -> dict:
    """An assistant message's OpenAI tool calls with their JSON `arguments` as dicts, as chat templates expect."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass   # templates that print the arguments get the string as it was sent
        converted.append({**call, "type": call.get("type", "function"), "function": function})
    return {**message, "tool_calls": converted}


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

    def __init__(self, request_id: str, model_id: str, want_logprobs: bool, parse_tools: bool = False) -> None:
        self.request_id = request_id  # the response `id`
        self.model_id = model_id  # the response `model`
        self.want_logprobs = want_logprobs  # the request asked for logprobs
        self.parse_tools = parse_tools  # tools were given and tool_choice is not "none"
        self._trim = _LeadingSpaceTrimmer()  # leading whitespace of each choice's stream
        self._tool_streams: dict[int, ToolCallStream] = {}  # choice index -> held-back text

    def chunks(self, message: EngineMessage) -> list[ChatCompletionChunkResponse]:
        """The chunks one engine message gives: deltas of text (and logprobs), or the final usage chunk."""
        if isinstance(message, RequestFinished):
            return [ChatCompletionChunkResponse(id=self.request_id, choices=[], model=self.model_id,
                                                usage=_usage(message))]
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
        return [ChatCompletionChunkResponse(id=self.request_id, choices=choices, model=self.model_id)]

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

    def chunks(self, message: EngineMessage) -> list[CompletionChunkResponse]:
        """The chunks one engine message gives: deltas of text (and logprobs), or the final usage chunk."""
        if isinstance(message, RequestFinished):
            return [CompletionChunkResponse(id=self.request_id, choices=[], model=self.model_id,
                                            usage=_usage(message))]
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
        return [CompletionChunkResponse(id=self.request_id, choices=choices, model=self.model_id)]

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


@dataclass
class Submission:
    """A request handed to the engine: its engine request and the assembler of its responses."""

    engine_request: EngineRequest  # its `outputs` receives SeqDelta lists, then RequestFinished (or an exception)
    assembler: ChatAssembler | CompletionAssembler  # engine messages -> response objects

    @property
    def request_id(self) -> str:
        """The engine's id of the request (also the response `id`)."""
        return self.engine_request.request_id


class Runner:
    """Loads a model selected by `Which` and serves requests on a background engine thread.

    Thread-safe: several threads may send requests at once; they are batched together by the engine.
    Additions to the reference signature (keyword-only): `prompt_batchsize` (the stub's name of
    `prompt_chunksize`), `show_progress`, and `truncate_sequence` (keep the tail of a prompt that does not fit
    the context instead of rejecting it, as the reference server's `--truncate-sequence`).
    """

    def __init__(self, which, max_seqs: int = 16, no_kv_cache: bool = False, prefix_cache_n: int = 16,
                 token_source: str = "cache", speculative_gamma: int = 32, which_draft=None,
                 chat_template: str | None = None, jinja_explicit: str | None = None,
                 num_device_layers: list[str] | None = None, in_situ_quant: str | None = None,
                 anymoe_config=None, pa_gpu_mem: int | None = None, pa_gpu_mem_usage: float | None = None,
                 pa_ctxt_len: int | None = None, pa_blk_size: int | None = None, no_paged_attn: bool = False,
                 paged_attn: bool = False, prompt_chunksize: int | None = None, seed: int | None = None,
                 *, prompt_batchsize: int | None = None, show_progress: bool | None = None,
                 truncate_sequence: bool = False) -> None:
        _not_built("which_draft", which_draft, None, "speculative decoding")
        _not_built("anymoe_config", anymoe_config, None, "AnyMoE")
        if num_device_layers is not None and (isinstance(num_device_layers, str) or not all(
                isinstance(v, str) for v in num_device_layers)):
            raise ValueError(f"num_device_layers must be a list of strings such as ['16'] or ['0:16', '1:16'], "
                             f"got {num_device_layers!r}")
        if prompt_chunksize is not None and prompt_batchsize is not None and prompt_chunksize != prompt_batchsize:
            raise ValueError("prompt_chunksize and prompt_batchsize are the same setting; give only one")
        chunksize = prompt_chunksize if prompt_chunksize is not None else prompt_batchsize
        if chunksize is not None and chunksize <= 0:
            raise ValueError(f"prompt_chunksize must be >= 1, got {chunksize}")
        del speculative_gamma, no_paged_attn, paged_attn   # the paged KV cache is always on here
        config = EngineConfig(
            max_seqs=max_seqs, no_kv_cache=no_kv_cache, prefix_cache_n=prefix_cache_n,
            prompt_chunksize=chunksize or 512, block_size=pa_blk_size or 32, pa_ctxt_len=pa_ctxt_len,
            pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage, seed=seed)
        self.truncate_sequence = bool(truncate_sequence)
        spec = load_spec(which, token_source=token_source, chat_template=chat_template, jinja_explicit=jinja_explicit,
                         show_progress=show_progress, in_situ_quant=in_situ_quant, num_device_layers=num_device_layers)
        self._loaded = on_short_lived_thread(lambda: load(spec))
        self._engine, self._inputs = build_engine(self._loaded, config)
        self.model_id = self._loaded.model_id

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + generated) of one sequence: the model's context capped by the KV capacity."""
        return self._inputs.max_model_len

    # ---- submitting ---------------------------------------------------------------------------
    def _fit_prompt(self, prompt_ids: list[int], max_tokens: int | None) -> list[int]:
        """With `truncate_sequence`, keep the tail of a prompt that does not fit, leaving room to generate."""
        limit = self._inputs.max_model_len
        if not self.truncate_sequence or len(prompt_ids) < limit:
            return prompt_ids
        reserve = min(max_tokens or TRUNCATION_RESERVE, limit - 1)
        keep = limit - reserve
        logger.info("truncate_sequence: prompt of %d tokens cut to its last %d", len(prompt_ids), keep)
        return prompt_ids[len(prompt_ids) - keep:]

    def _grammar(self, request):
        """The compiled grammar of a request: its own, or the JSON of a forced tool call; None when free."""
        forced = None
        if request.tool_schemas and request.tool_choice is not None:
            forced = forced_call_schema(request.tool_schemas, request.tool_choice)
        if forced is not None:
            if request.grammar is not None:
                raise ValueError("grammar: cannot be combined with a forced tool_choice (it constrains the output "
                                 "to the tool call already)")
            return self._inputs.grammars.compile_source(json_schema_source(forced))
        if request.grammar is None:
            return None
        return self._inputs.grammars.compile(request.grammar_type, request.grammar)

    def _submit(self, prompt_ids: list[int], request, num_seqs: int, logprobs: bool, top_logprobs: int | None,
                outputs) -> EngineRequest:
        grammar = self._grammar(request)
        adapters = request_adapter_set(self._loaded.model, request.adapters)
        prompt_ids = self._fit_prompt(prompt_ids, request.max_tokens)
        options = _options(request, logprobs, top_logprobs)
        engine_request = self._inputs.build(str(next(_request_ids)), prompt_ids, options, num_seqs, grammar)
        engine_request.adapters = adapters
        if outputs is not None:
            engine_request.outputs = outputs
        self._engine.submit(engine_request)
        return engine_request

    def _messages(self, request: ChatCompletionRequest) -> list[dict]:
        if isinstance(request.messages, str):
            return [{"role": "user", "content": request.messages}]
        return [_template_message(message) for message in request.messages]

    @staticmethod
    def _tools(request) -> list[dict] | None:
        return list(request.tool_schemas) if request.tool_schemas else None

    def submit_chat_completion(self, request: ChatCompletionRequest, *, outputs=None) -> Submission:
        """Render, tokenize and queue a chat request without waiting for it.

        `outputs` (anything with a thread-safe `put(message)`) replaces the request's queue; the engine thread
        puts `SeqDelta` lists, then a `RequestFinished` (or an exception) on it. Raises ValueError for a bad
        request (prompt too long, no chat template, unsupported option).
        """
        prompt_ids = self._inputs.chat_prompt_ids(self._messages(request), self._tools(request))
        engine_request = self._submit(prompt_ids, request, request.n_choices, request.logprobs,
                                      request.top_logprobs, outputs)
        parse_tools = bool(request.tool_schemas) and request.tool_choice not in (None, ToolChoice.NoTools)
        assembler = ChatAssembler(engine_request.request_id, self.model_id, request.logprobs, parse_tools)
        return Submission(engine_request, assembler)

    def submit_completion(self, request: CompletionRequest, *, logprobs: int | None = None,
                          outputs=None) -> Submission:
        """Tokenize and queue a completion request without waiting for it (see `submit_chat_completion`).

        `logprobs` (an addition; 0..20) reports the chosen token's logprob and that many alternatives.
        """
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs: must be an int in [0, 20] or None, got {logprobs!r}")
        prompt_ids = self._inputs.completion_prompt_ids(request.prompt)
        num_seqs = max(request.n_choices, request.best_of)
        if request.stream and num_seqs != request.n_choices:
            raise ValueError("best_of: cannot be larger than n_choices when streaming")
        engine_request = self._submit(prompt_ids, request, num_seqs, logprobs is not None, logprobs, outputs)
        assembler = CompletionAssembler(engine_request.request_id, self.model_id, request, logprobs is not None)
        return Submission(engine_request, assembler)

    def abort(self, request_id: str) -> None:
        """Cancel a submitted request: it stops within one engine step and frees its KV blocks."""
        self._engine.abort(request_id)

    # ---- waiting ------------------------------------------------------------------------------
    def _events(self, engine_request: EngineRequest) -> Iterator[EngineMessage]:
        """Messages of one request until it finishes; closing early cancels it in the engine."""
        finished = False
        try:
            while True:
                message = engine_request.outputs.get()
                if isinstance(message, Exception):
                    finished = True
                    raise ValueError(str(message)) from message
                if isinstance(message, RequestFinished):
                    finished = True
                    yield message
                    return
                yield message
        finally:
            if not finished:
                self._engine.abort(engine_request.request_id)

    def _wait(self, submission: Submission):
        for message in self._events(submission.engine_request):
            if isinstance(message, RequestFinished):
                return submission.assembler.response(message)
        raise RuntimeError("engine stream ended without a result")

    def _stream(self, submission: Submission) -> Iterator:
        for message in self._events(submission.engine_request):
            yield from submission.assembler.chunks(message)

    def send_chat_completion_request(self, request: ChatCompletionRequest):
        """Generate a chat reply: a `ChatCompletionResponse`, or an iterator of chunks when `request.stream`."""
        submission = self.submit_chat_completion(request)
        return self._stream(submission) if request.stream else self._wait(submission)

    def send_completion_request(self, request: CompletionRequest):
        """Continue a raw prompt: a `CompletionResponse`, or an iterator of chunks when `request.stream`."""
        submission = self.submit_completion(request)
        return self._stream(submission) if request.stream else self._wait(submission)

    # ---- other methods -----------------------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize raw text (no chat template)."""
        return self._inputs.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool) -> str:
        """Turn token ids back into text."""
        return self._inputs.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def send_re_isq(self, dtype: str) -> None:
        """Re-quantizes the live model to ISQ type `dtype` between two engine steps and returns at once (requests
        submitted afterwards see the new weights; a failure while quantizing is logged). ValueError for an
        unknown type; ignored for GGUF/GGML models (REFERENCE §3)."""
        if self._loaded.quantized_file:
            logger.info("send_re_isq(%r): ignored, the model was loaded from quantized GGUF/GGML weights", dtype)
            return
        config = re_isq_config(self._loaded.isq, dtype)

        def requantize() -> None:
            config.quantize_loaded(self._loaded.model)
            self._loaded.isq = config
            self._engine.scheduler.reset_prefix_cache()   # K/V cached under the old weights must not be reused
        self._engine.post(requantize)

    def activate_adapters(self, adapter_names: list[str]) -> None:
        """Replaces the active set of preloaded LoRA adapters; ValueError naming an unknown adapter, or when the
        model has no preloaded adapters."""
        self._engine.call(lambda: activate_adapters(self._loaded.model, adapter_names))

    def generate_image(self, prompt: str, response_format, height: int = 720, width: int = 1280):
        raise ValueError("generate_image: this is a text model; diffusion models are not built in this version")

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are canceled)."""
        self._engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
