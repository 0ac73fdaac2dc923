"""`Runner`: the entry point of the Python API (REFERENCE §1.4, §1.5).

A thin client of the engine's front door (`mistralrs.engine.llm_engine.LLMEngine`): it validates its arguments,
turns the `Which` selection into the loader's `LoadSpec` (api/load_spec.py), creates the front door, and hands
requests to it. `submit_chat_completion` / `submit_completion` return a `Submission` (the engine request and the
assembler of its responses); the blocking `send_*` methods wait on it or stream it.
"""

from __future__ import annotations

from mistralrs.api.load_spec import draft_load_spec, load_spec
from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest
from mistralrs.engine.builder import EngineConfig
from mistralrs.engine.llm_engine import LLMEngine, Submission
from mistralrs.worker.options import ExecutionOptions


class Runner:
    """Loads a model selected by `Which` and serves requests on a background engine thread.

    Thread-safe: several threads may send requests at once; they are batched together by the engine.
    `which_draft` (any `Which` sharing the target's vocabulary) turns on speculative decoding with
    `speculative_gamma` draft tokens per step (mistralrs/worker/speculative.py); `in_situ_quant` applies to the draft
    too when it is a full-precision model.
    Additions to the reference signature (keyword-only): `prompt_batchsize` (the stub's name of
    `prompt_chunksize`), `show_progress`, `truncate_sequence` (keep the tail of a prompt that does not fit
    the context instead of rejecting it, as the reference server's `--truncate-sequence`),
    `allow_special_tokens_in_messages` (special-token text typed in a chat message becomes a control token, as in
    the reference; by default it stays text, so a user cannot forge a turn), and `execution` (the fast/plain paths
    and CPU thread policy, `mistralrs.worker.options.ExecutionOptions`; default `ExecutionOptions.from_env()`).
    """

    def __init__(self, which, max_seqs: int = 16, no_kv_cache: bool = False, prefix_cache_n: int = 16,
                 token_source: str = "cache", speculative_gamma: int = 32, which_draft=None,
                 chat_template: str | None = None, jinja_explicit: str | None = None,
                 num_device_layers: list[str] | None = None, in_situ_quant: str | None = None,
                 anymoe_config=None, pa_gpu_mem: int | None = None, pa_gpu_mem_usage: float | None = None,
                 pa_ctxt_len: int | None = None, pa_blk_size: int | None = None, no_paged_attn: bool = False,
                 paged_attn: bool = False, prompt_chunksize: int | None = None, seed: int | None = None,
                 *, prompt_batchsize: int | None = None, show_progress: bool | None = None,
                 truncate_sequence: bool = False, allow_special_tokens_in_messages: bool = False,
                 execution: ExecutionOptions | None = None) -> None:
        if num_device_layers is not None and (isinstance(num_device_layers, str) or not all(
                isinstance(v, str) for v in num_device_layers)):
            raise ValueError(f"num_device_layers must be a list of strings such as ['16'] or ['0:16', '1:16'], "
                             f"got {num_device_layers!r}")
        if prompt_chunksize is not None and prompt_batchsize is not None and prompt_chunksize != prompt_batchsize:
            raise ValueError("prompt_chunksize and prompt_batchsize are the same setting; give only one")
        chunksize = prompt_chunksize if prompt_chunksize is not None else prompt_batchsize
        if chunksize is not None and chunksize <= 0:
            raise ValueError(f"prompt_chunksize must be >= 1, got {chunksize}")
        del no_paged_attn, paged_attn   # the paged KV cache is always on here
        config = EngineConfig(
            max_seqs=max_seqs, no_kv_cache=no_kv_cache, prefix_cache_n=prefix_cache_n,
            prompt_chunksize=chunksize or 512, block_size=pa_blk_size or 32, pa_ctxt_len=pa_ctxt_len,
            pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage, seed=seed,
            allow_special_tokens_in_messages=bool(allow_special_tokens_in_messages),
            speculative_gamma=speculative_gamma)
        spec = load_spec(which, token_source=token_source, chat_template=chat_template,
                         jinja_explicit=jinja_explicit, show_progress=show_progress, in_situ_quant=in_situ_quant,
                         num_device_layers=num_device_layers, execution=execution, anymoe_config=anymoe_config)
        draft = None if which_draft is None else draft_load_spec(
            which_draft, token_source=token_source, show_progress=show_progress, in_situ_quant=in_situ_quant,
            execution=execution)
        self._llm_engine = LLMEngine(spec, config, truncate_sequence=bool(truncate_sequence), draft=draft)
        self.model_id = self._llm_engine.model_id

    @property
    def llm_engine(self) -> LLMEngine:
        """The front door this runner is a client of (the HTTP server serves it)."""
        return self._llm_engine

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + generated) of one sequence: the model's context capped by the KV capacity."""
        return self._llm_engine.max_model_len

    @property
    def truncate_sequence(self) -> bool:
        """A prompt that does not fit the context keeps its tail instead of being rejected."""
        return self._llm_engine.truncate_sequence

    # ---- submitting ---------------------------------------------------------------------------
    def submit_chat_completion(self, request: ChatCompletionRequest, *, outputs=None) -> Submission:
        """Render, tokenize and queue a chat request without waiting for it.

        `outputs` (anything with a thread-safe `put(message)`) replaces the request's queue; the engine thread
        puts `SeqDelta` lists, then a `RequestFinished` (or an exception) on it. Raises ValueError for a bad
        request (prompt too long, no chat template, unsupported option).
        """
        return self._llm_engine.submit_chat_completion(request, outputs=outputs)

    def submit_completion(self, request: CompletionRequest, *, logprobs: int | None = None,
                          outputs=None) -> Submission:
        """Tokenize and queue a completion request without waiting for it (see `submit_chat_completion`).

        `logprobs` (an addition; 0..20) reports the chosen token's logprob and that many alternatives.
        """
        return self._llm_engine.submit_completion(request, logprobs=logprobs, outputs=outputs)

    def abort(self, request_id: str) -> None:
        """Cancel a submitted request: it stops within one engine step and frees its KV blocks."""
        self._llm_engine.abort(request_id)

    # ---- waiting ------------------------------------------------------------------------------
    def _answer(self, submission: Submission, stream: bool):
        return self._llm_engine.stream(submission) if stream else self._llm_engine.wait(submission)

    def send_chat_completion_request(self, request: ChatCompletionRequest):
        """Generate a chat reply: a `ChatCompletionResponse`, or an iterator of chunks when `request.stream`."""
        return self._answer(self.submit_chat_completion(request), request.stream)

    def send_completion_request(self, request: CompletionRequest):
        """Continue a raw prompt: a `CompletionResponse`, or an iterator of chunks when `request.stream`."""
        return self._answer(self.submit_completion(request), request.stream)

    # ---- other methods -----------------------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize raw text (no chat template)."""
        return self._llm_engine.tokenize_text(text, add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool) -> str:
        """Turn token ids back into text."""
        return self._llm_engine.detokenize_text(tokens, skip_special_tokens)

    def send_re_isq(self, dtype: str) -> None:
        """Re-quantizes the live model to ISQ type `dtype` between two engine steps and returns at once (requests
        submitted afterwards see the new weights; a failure while quantizing is logged). ValueError for an
        unknown type; ignored for GGUF/GGML models (REFERENCE §3)."""
        self._llm_engine.send_re_isq(dtype)

    def activate_adapters(self, adapter_names: list[str]) -> None:
        """Replaces the active set of preloaded LoRA adapters; ValueError naming an unknown adapter, or when the
        model has no preloaded adapters."""
        self._llm_engine.activate_adapters(adapter_names)

    def generate_image(self, prompt: str, response_format, height: int = 720, width: int = 1280):
        """Generate one image with a diffusion model (`Which.DiffusionPlain`): an `ImageGenerationResponse` whose
        `data[0]` holds the path of a PNG saved in the working directory (`Url`) or a base64 data URL
        (`B64Json`). ValueError naming the field for an empty prompt, a height/width that is not a positive
        multiple of 16 up to 2048, or an unknown format; ValueError for a text model."""
        return self._llm_engine.generate_image(prompt, response_format, height, width)

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are canceled)."""
        self._llm_engine.close()

    def __del__(self) -> None:
        llm_engine = getattr(self, "_llm_engine", None)
        if llm_engine is not None:
            llm_engine.close()
