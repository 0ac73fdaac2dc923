"""`Runner`: the entry point of the Python API (REFERENCE §1.4, §1.5)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator

from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest
from mistralrs.api.responses import (
    ChatCompletionChunkResponse, ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice,
    CompletionChunkChoice, CompletionChunkResponse, CompletionResponse, Delta, Logprobs, ResponseLogprob,
    ResponseMessage, TopLogprob, Usage,
)
from mistralrs.engine.builder import EngineConfig, build_engine
from mistralrs.engine.input_processor import GenerationOptions
from mistralrs.engine.request import EngineRequest, RequestFinished, SeqDelta, SeqResult, TokenLogprob
from mistralrs.loader.pipeline import load_pipeline

logger = logging.getLogger(__name__)

_request_ids = itertools.count()


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


def _options(request) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        min_p=request.min_p, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, logit_bias=request.logit_bias, stop_seqs=request.stop_seqs,
        logprobs=getattr(request, "logprobs", False), top_logprobs=getattr(request, "top_logprobs", None),
        dry_multiplier=request.dry_multiplier, dry_base=request.dry_base,
        dry_allowed_length=request.dry_allowed_length, dry_sequence_breakers=request.dry_sequence_breakers,
        seed=request.seed)


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


class Runner:
    """Loads a model selected by `Which` and serves requests on a background engine thread.

    Thread-safe: several threads may send requests at once; they are batched together by the engine.
    """

    def __init__(self, which, max_seqs: int = 16, no_kv_cache: bool = False, prefix_cache_n: int = 16,
                 token_source: str = "cache", speculative_gamma: int = 32, which_draft=None,
                 chat_template: str | None = None, jinja_explicit: str | None = None,
                 num_device_layers: list[str] | None = None, in_situ_quant: str | None = None,
                 anymoe_config=None, pa_gpu_mem: int | None = None, pa_gpu_mem_usage: float | None = None,
                 pa_ctxt_len: int | None = None, pa_blk_size: int | None = None, no_paged_attn: bool = False,
                 paged_attn: bool = False, prompt_chunksize: int | None = None, seed: int | None = None,
                 *, prompt_batchsize: int | None = None, show_progress: bool | None = None) -> None:
        _not_built("which_draft", which_draft, None, "speculative decoding")
        _not_built("in_situ_quant", in_situ_quant, None, "in-situ quantization (ISQ)")
        _not_built("anymoe_config", anymoe_config, None, "AnyMoE")
        _not_built("num_device_layers", num_device_layers, None, "device mapping")
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
        self._loaded = load_pipeline(which, token_source=token_source, chat_template=chat_template,
                                     jinja_explicit=jinja_explicit, show_progress=show_progress)
        self._engine, self._inputs = build_engine(self._loaded, config)
        self.model_id = self._loaded.model_id

    # ---- requests ----------------------------------------------------------------------------
    def _submit(self, prompt_ids: list[int], request, num_seqs: int) -> EngineRequest:
        if request.grammar is not None:
            raise ValueError("grammar: constrained decoding is not supported yet")
        if request.adapters:
            raise ValueError("adapters: this model has no LoRA adapters")
        engine_request = self._inputs.build(str(next(_request_ids)), prompt_ids, _options(request), num_seqs)
        self._engine.submit(engine_request)
        return engine_request

    def _messages(self, request: ChatCompletionRequest) -> list[dict]:
        if isinstance(request.messages, str):
            return [{"role": "user", "content": request.messages}]
        return request.messages

    def _tools(self, request) -> list[dict] | None:
        if not request.tool_schemas:
            return None
        return [json.loads(t) if isinstance(t, str) else t for t in request.tool_schemas]

    def _events(self, engine_request: EngineRequest) -> Iterator[list[SeqDelta] | RequestFinished]:
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

    def _wait(self, engine_request: EngineRequest) -> RequestFinished:
        for message in self._events(engine_request):
            if isinstance(message, RequestFinished):
                return message
        raise RuntimeError("engine stream ended without a result")

    def send_chat_completion_request(self, request: ChatCompletionRequest):
        """Generate a chat reply: a `ChatCompletionResponse`, or an iterator of chunks when `request.stream`."""
        prompt_ids = self._inputs.chat_prompt_ids(self._messages(request), self._tools(request))
        engine_request = self._submit(prompt_ids, request, request.n_choices)
        if request.stream:
            return self._stream_chat(engine_request)
        done = self._wait(engine_request)
        trim = _LeadingSpaceTrimmer()
        choices = [Choice(finish_reason=r.finish_reason, index=r.index,
                          message=ResponseMessage(content=trim(r.index, r.text)),
                          logprobs=self._logprobs(request, r)) for r in done.results]
        return ChatCompletionResponse(id=engine_request.request_id, choices=choices, model=self.model_id,
                                      usage=_usage(done))

    @staticmethod
    def _logprobs(request, result: SeqResult) -> Logprobs | None:
        if not request.logprobs:
            return None
        return Logprobs(content=[_response_logprob(e) for e in result.logprobs])

    def _stream_chat(self, engine_request: EngineRequest) -> Iterator[ChatCompletionChunkResponse]:
        trim = _LeadingSpaceTrimmer()
        for message in self._events(engine_request):
            if isinstance(message, RequestFinished):
                yield ChatCompletionChunkResponse(id=engine_request.request_id, choices=[], model=self.model_id,
                                                  usage=_usage(message))
                continue
            choices = []
            for delta in message:
                text = trim(delta.index, delta.text)
                if not text and delta.finish_reason is None:
                    continue
                logprob = _response_logprob(delta.logprobs[0]) if delta.logprobs else None
                choices.append(ChunkChoice(finish_reason=delta.finish_reason, index=delta.index,
                                           delta=Delta(content=text), logprobs=logprob))
            if choices:
                yield ChatCompletionChunkResponse(id=engine_request.request_id, choices=choices,
                                                  model=self.model_id)

    def send_completion_request(self, request: CompletionRequest):
        """Continue a raw prompt: a `CompletionResponse`, or an iterator of chunks when `request.stream`."""
        prompt_ids = self._inputs.completion_prompt_ids(request.prompt)
        num_seqs = max(request.n_choices, request.best_of)
        if request.stream and num_seqs != request.n_choices:
            raise ValueError("best_of: cannot be larger than n_choices when streaming")
        engine_request = self._submit(prompt_ids, request, num_seqs)
        if request.stream:
            return self._stream_completion(engine_request)
        done = self._wait(engine_request)
        # OpenAI best_of: generate best_of sequences, return the n_choices most likely (the reference reverses it)
        best = sorted(done.results, key=lambda r: r.cumulative_logprob, reverse=True)[:request.n_choices]
        prefix = request.prompt if request.echo_prompt else ""
        choices = [CompletionChoice(finish_reason=r.finish_reason, index=i,
                                    text=prefix + r.text + (request.suffix or ""))
                   for i, r in enumerate(sorted(best, key=lambda r: r.index))]
        return CompletionResponse(id=engine_request.request_id, choices=choices, model=self.model_id,
                                  usage=_usage(done))

    def _stream_completion(self, engine_request: EngineRequest) -> Iterator[CompletionChunkResponse]:
        for message in self._events(engine_request):
            if isinstance(message, RequestFinished):
                yield CompletionChunkResponse(id=engine_request.request_id, choices=[], model=self.model_id,
                                              usage=_usage(message))
                continue
            choices = [CompletionChunkChoice(finish_reason=d.finish_reason, index=d.index, text=d.text)
                       for d in message if d.text or d.finish_reason is not None]
            if choices:
                yield CompletionChunkResponse(id=engine_request.request_id, choices=choices, model=self.model_id)

    # ---- other methods -----------------------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize raw text (no chat template)."""
        return self._inputs.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool) -> str:
        """Turn token ids back into text."""
        return self._inputs.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def send_re_isq(self, dtype: str) -> None:
        raise ValueError(f"send_re_isq({dtype!r}): in-situ quantization (ISQ) is not built in this version")

    def activate_adapters(self, adapter_names: list[str]) -> None:
        raise ValueError(f"activate_adapters({adapter_names!r}): this model has no LoRA adapters")

    def generate_image(self, prompt: str, response_format, height: int = 720, width: int = 1280):
        raise ValueError("generate_image: this is a text model; diffusion models are not built in this version")

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are canceled)."""
        self._engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
