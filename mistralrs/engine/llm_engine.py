"""`LLMEngine`: the engine's front door, the one owner of a served model.

It loads the model a `LoadSpec` describes (on a short-lived thread: see `builder.on_short_lived_thread`), sizes
the KV cache and starts the engine thread (`builder.build_engine`). A request goes through
`submit_chat_completion` / `submit_completion`, which render and tokenize it (the input processor), queue it and
return a `Submission`: the engine request (whose `outputs` queue receives the engine's messages) and an assembler
that turns those messages into response objects (engine/assembly.py). `wait` and `stream` consume a submission
on the caller's thread; the HTTP server passes its own non-blocking `outputs` sink and uses the same assemblers.
Changes to the model (re-ISQ, adapter activation) are typed commands (engine/commands.py) run on the engine
thread between two steps. A diffusion model (FLUX) is served by the same class: its engine thread runs only
`GenerateImage` commands, and token requests are refused. `Runner`, the HTTP server and the CLI are clients of
this class.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mistralrs.adapters.lora import activate_adapters
from mistralrs.adapters.runtime import request_adapter_set
from mistralrs.api.enums import ToolChoice
from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest
from mistralrs.engine.assembly import ChatAssembler, CompletionAssembler, EngineMessage
from mistralrs.engine.builder import EngineConfig, build_command_engine, build_engine, on_short_lived_thread
from mistralrs.engine.chat_messages import template_messages
from mistralrs.engine.commands import ActivateAdapters, GenerateImage, ReIsq
from mistralrs.engine.input_processor import GenerationOptions
from mistralrs.engine.request import EngineRequest, RequestFinished
from mistralrs.engine.tensor_parallel import TPRuntime, apply_re_isq, check_supported, run_node
from mistralrs.engine.tool_calls import forced_call_schema
from mistralrs.distributed.launch import tp_plan
from mistralrs.loader.pipeline import LoadedModel, load
from mistralrs.loader.spec import LoadKind, LoadSpec
from mistralrs.quant.isq_types import parse_isq_type
from mistralrs.sample.grammar import json_schema_source
from mistralrs.vision.images import ImageSourcePolicy
from mistralrs.worker.host_memory import bound_heap_retention
from mistralrs.worker.speculative import SpeculationStats, SpeculativeRunner

if TYPE_CHECKING:  # the image and diffusion sides are imported by the models that have them (PIL among them)
    from mistralrs.loader.diffusion_loader import LoadedDiffusion
    from mistralrs.vision.base import ImageInputs

logger = logging.getLogger(__name__)

_request_ids = itertools.count()
TRUNCATION_RESERVE = 10  # tokens left for generation when a truncated prompt's request has no max_tokens


@dataclass
class Submission:
    """A request handed to the engine: its engine request and the assembler of its responses."""

    engine_request: EngineRequest  # its `outputs` receives SeqDelta lists, then RequestFinished (or an exception)
    assembler: ChatAssembler | CompletionAssembler  # engine messages -> response objects

    @property
    def request_id(self) -> str:
        """The engine's id of the request (also the response `id`)."""
        return self.engine_request.request_id


def _options(request, logprobs: bool, top_logprobs: int | None) -> GenerationOptions:
    return GenerationOptions(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        min_p=request.min_p, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, logit_bias=request.logit_bias, stop_seqs=request.stop_seqs,
        logprobs=logprobs, top_logprobs=top_logprobs,
        dry_multiplier=request.dry_multiplier, dry_base=request.dry_base,
        dry_allowed_length=request.dry_allowed_length, dry_sequence_breakers=request.dry_sequence_breakers,
        seed=request.seed)


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """ValueError naming both models unless the draft's tokenizer and logits cover the target's vocabulary exactly
    (speculative decoding compares their distributions token by token)."""
    target_vocab, draft_vocab = target.tokenizer.tokenizer.get_vocab(), draft.tokenizer.tokenizer.get_vocab()
    target_size, draft_size = target.model.config.vocab_size, draft.model.config.vocab_size
    if target_vocab == draft_vocab and target_size == draft_size:
        return
    differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])[:3]
    raise ValueError(
        f"which_draft: the draft model {draft.model_id!r} does not share the vocabulary of the target model "
        f"{target.model_id!r} (tokenizers of {len(target_vocab)} and {len(draft_vocab)} tokens, logits of "
        f"{target_size} and {draft_size}; differing entries such as {differing})")


class LLMEngine:
    """Loads one model and serves it: requests in, response objects out, control commands between steps. A text
    model serves chat and completion requests (a vision model with its image front door); a diffusion model serves
    `generate_image` only.

    Thread-safe: several threads may submit at once; their requests are batched together by the engine thread.
    With `truncate_sequence`, a prompt that does not fit the context keeps its tail instead of being rejected.
    With `draft`, that model is loaded too and drafts `config.speculative_gamma` tokens per step for the target
    to verify (speculative decoding, mistralrs/worker/speculative.py); it must share the target's vocabulary.
    """

    def __init__(self, spec: LoadSpec, config: EngineConfig, *, truncate_sequence: bool = False,
                 draft: LoadSpec | None = None) -> None:
        self.truncate_sequence = truncate_sequence  # keep the tail of a prompt that does not fit the context
        self.execution = spec.execution  # how the model runs: chosen at load, fixed for the engine's life
        if draft is not None and config.no_kv_cache:
            raise ValueError("which_draft: speculative decoding needs the KV cache (no_kv_cache=True)")
        if draft is not None and spec.kind in (LoadKind.VISION, LoadKind.DIFFUSION):
            raise ValueError(f"which_draft: speculative decoding applies to text models, not {spec.label}")
        self._tp: TPRuntime | None = None  # the tensor-parallel runtime when the model is sharded over ranks
        self.image_policy = ImageSourcePolicy.for_library()  # image sources a request may name (the Python API's)
        self._diffusion: LoadedDiffusion | None = None  # the image pipeline of a diffusion model, else None
        bound_heap_retention()  # freed activations and load temporaries go back to the system (worker/host_memory.py)
        plan = tp_plan(spec.execution, os.environ, torch.cuda.device_count())
        if plan is not None:
            check_supported(spec, draft is not None)
            if not plan.is_head:
                run_node(plan, spec)   # serves as a rank until the head shuts down, then exits the process
            self._tp = TPRuntime(plan, spec)
            self._tp.close_at_exit(self.close)
            try:
                self._start(self._tp.load(), config, None)
            except BaseException:
                self._tp.close()
                raise
            return
        loaded = on_short_lived_thread(lambda: load(spec))
        if not isinstance(loaded, LoadedModel):  # a diffusion model's LoadedDiffusion
            self.model_id = loaded.model_id
            self._diffusion = loaded
            self._image_generator = (torch.Generator(loaded.device).manual_seed(config.seed)
                                     if config.seed is not None else None)   # seeded once: the device RNG
            self._engine = build_command_engine({GenerateImage: self._generate_image}, config.seed)
            return
        draft_model = None if draft is None else on_short_lived_thread(lambda: load(draft))
        if draft_model is not None:
            check_same_vocabulary(loaded, draft_model)
        self._start(loaded, config, draft_model)

    def _start(self, loaded: LoadedModel, config: EngineConfig, draft_model: LoadedModel | None) -> None:
        """Size the KV cache and start the engine thread for a loaded text or vision model."""
        self.model_id = loaded.model_id  # the `model` of every response
        self._loaded = loaded
        handlers = {ReIsq: self._re_isq, ActivateAdapters: self._activate_adapters}
        self._engine, self._inputs = build_engine(self._loaded, config, handlers, self.execution, draft_model,
                                                  peers=self._tp)
        processor = self._loaded.vision_processor
        # a vision model's image side of the front door (engine/image_prompt.py); None for a text model
        self._images = None
        if processor is not None:
            from mistralrs.engine.image_prompt import ImagePrompter

            self._images = ImagePrompter(processor, self._inputs, self._loaded.model.image_token_id)

    def _text_model(self, what: str) -> None:
        """ValueError for a token request (`what`) to a diffusion model."""
        if self._diffusion is not None:
            raise ValueError(f"{what}: this is a diffusion model (FLUX), which only generates images "
                             "(generate_image, POST /v1/images/generations); load a text model for this request")

    @property
    def speculation_stats(self) -> SpeculationStats | None:
        """Draft tokens proposed and accepted so far (None without a draft model)."""
        runner = self._engine.model_runner
        return runner.stats if isinstance(runner, SpeculativeRunner) else None

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + generated) of one sequence: the model's context capped by the KV capacity (0 for a
        diffusion model)."""
        return 0 if self._diffusion is not None else self._inputs.max_model_len

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
            try:
                return self._inputs.grammars.compile_source(json_schema_source(forced))
            except ValueError as err:
                raise ValueError(f"tool_schemas: no call can be generated for tool_choice {request.tool_choice!r}: "
                                 f"{err}") from None
        if request.grammar is None:
            return None
        return self._inputs.grammars.compile(request.grammar_type, request.grammar)

    def _submit(self, prompt_ids: list[int], request, num_seqs: int, logprobs: bool, top_logprobs: int | None,
                outputs, images: ImageInputs | None = None, *, rank_by_logprob: bool = False) -> EngineRequest:
        grammar = self._grammar(request)
        adapters = request_adapter_set(self._loaded.model, request.adapters)
        prompt_ids = self._fit_prompt(prompt_ids, request.max_tokens)
        if images is not None:
            self._images.check_prompt(prompt_ids, images)
        options = _options(request, logprobs, top_logprobs)
        engine_request = self._inputs.build(str(next(_request_ids)), prompt_ids, options, num_seqs, grammar,
                                            rank_by_logprob=rank_by_logprob)
        engine_request.adapters = adapters
        engine_request.images = images
        if outputs is not None:
            engine_request.outputs = outputs
        self._engine.submit(engine_request)
        return engine_request

    def _prints_tool_calls(self, tools: list[dict] | None) -> bool:
        """Whether the request's chat template prints `tool_calls` itself."""
        template = self._inputs.tool_chat_template if tools else self._inputs.chat_template
        return template is not None and "tool_calls" in template.source

    def _messages(self, request: ChatCompletionRequest, tools: list[dict] | None) -> list[dict]:
        """The request's messages as its chat template expects them (engine/chat_messages.py)."""
        return template_messages(request.messages, self._prints_tool_calls(tools))

    @staticmethod
    def _tools(request) -> list[dict] | None:
        return list(request.tool_schemas) if request.tool_schemas else None

    def submit_chat_completion(self, request: ChatCompletionRequest, *, outputs=None,
                               image_policy: ImageSourcePolicy | None = None) -> Submission:
        """Render, tokenize and queue a chat request without waiting for it.

        `outputs` (anything with a thread-safe `put(message)`) replaces the request's queue; the engine thread
        puts `SeqDelta` lists, then a `RequestFinished` (or an exception) on it. `image_policy`: the image sources
        the request may name (None: `self.image_policy`; the server passes its own). Raises ValueError for a bad
        request (prompt too long, no chat template, an image part to a text model or an unusable image,
        unsupported option).
        """
        self._text_model("chat completion")
        tools = self._tools(request)
        images = None
        if self._images is not None:
            images = self._images.load_images(request.messages, image_policy or self.image_policy)
        if images is None:
            prompt_ids = self._inputs.chat_prompt_ids(self._messages(request, tools), tools,
                                                      keep_tail=self.truncate_sequence)
        else:
            prompt_ids = self._images.chat_prompt_ids(request.messages, tools, self._prints_tool_calls(tools),
                                                      self.truncate_sequence, images)
        engine_request = self._submit(prompt_ids, request, request.n_choices, request.logprobs,
                                      request.top_logprobs, outputs, images)
        parse_tools = bool(request.tool_schemas) and request.tool_choice not in (None, ToolChoice.NoTools)
        assembler = ChatAssembler(engine_request.request_id, self.model_id, request.n_choices, request.logprobs,
                                  parse_tools)
        return Submission(engine_request, assembler)

    def submit_completion(self, request: CompletionRequest, *, logprobs: int | None = None,
                          outputs=None) -> Submission:
        """Tokenize and queue a completion request without waiting for it (see `submit_chat_completion`).

        `logprobs` (0..20) reports the chosen token's logprob and that many alternatives.
        """
        self._text_model("completion")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs: must be an int in [0, 20] or None, got {logprobs!r}")
        prompt_ids = self._inputs.completion_prompt_ids(request.prompt, keep_tail=self.truncate_sequence)
        num_seqs = max(request.n_choices, request.best_of)
        if request.stream and num_seqs != request.n_choices:
            raise ValueError("best_of: cannot be larger than n_choices when streaming")
        # best_of > n_choices: the response keeps the n_choices sequences of the highest summed logprob
        engine_request = self._submit(prompt_ids, request, num_seqs, logprobs is not None, logprobs, outputs,
                                      rank_by_logprob=num_seqs > request.n_choices)
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

    def wait(self, submission: Submission):
        """The response of a submission made without `outputs`, once it finished (ValueError if it failed)."""
        for message in self._events(submission.engine_request):
            if isinstance(message, RequestFinished):
                return submission.assembler.response(message)
        raise RuntimeError("engine stream ended without a result")

    def stream(self, submission: Submission) -> Iterator:
        """The chunks of a submission made without `outputs`; closing the iterator early cancels the request."""
        for message in self._events(submission.engine_request):
            yield from submission.assembler.chunks(message)

    # ---- tokens -------------------------------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize raw text (no chat template)."""
        self._text_model("tokenize_text")
        return self._inputs.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool) -> str:
        """Turn token ids back into text."""
        self._text_model("detokenize_text")
        return self._inputs.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- control commands ---------------------------------------------------------------------
    def send_re_isq(self, isq_type: str) -> None:
        """Re-quantizes the live model to ISQ type `isq_type` between two engine steps and returns at once
        (requests submitted afterwards see the new weights; a failure while quantizing is logged). ValueError for
        an unknown type, also for GGUF/GGML models, where a known type is ignored (REFERENCE §3)."""
        self._text_model("send_re_isq")
        parsed = parse_isq_type(isq_type)
        if self._loaded.quantized_file:
            logger.info("send_re_isq(%r): ignored, the model was loaded from quantized GGUF/GGML weights", isq_type)
            return
        self._engine.post(ReIsq(parsed))

    def _re_isq(self, command: ReIsq) -> None:
        """Engine thread: the new type with the load's topology, MoQE and imatrix; the prefix cache is dropped."""
        self._on_every_rank(command, lambda: apply_re_isq(self._loaded, command, self.execution.fast_kernels))
        self._engine.scheduler.reset_prefix_cache()   # K/V cached under the old weights must not be reused

    def activate_adapters(self, adapter_names: list[str]) -> None:
        """Replaces the active set of preloaded LoRA adapters; ValueError naming an unknown adapter, or when the
        model has no preloaded adapters."""
        self._text_model("activate_adapters")
        self._engine.call(ActivateAdapters(tuple(adapter_names)))

    def _activate_adapters(self, command: ActivateAdapters) -> None:
        self._on_every_rank(command, lambda: activate_adapters(self._loaded.model, list(command.names)))

    def _on_every_rank(self, command, apply) -> None:
        """Engine thread: `apply()` a command that changes the model, on every rank under tensor parallelism."""
        if self._tp is None:
            apply()
        else:
            self._tp.run_command(command, apply)

    def generate_image(self, prompt: str, response_format, height: int = 720, width: int = 1280):
        """One image for `prompt` (diffusion models only): an `ImageGenerationResponse` holding a saved PNG's path
        (`Url`) or a base64 data URL (`B64Json`). ValueError naming the field for an empty prompt, a size that is
        not a positive multiple of 16 up to the limit, or an unknown format; ValueError for a text model."""
        if self._diffusion is None:
            raise ValueError("generate_image: this is a text model; image generation needs a diffusion model "
                             "(Which.DiffusionPlain)")
        from mistralrs.diffusion.pipeline import check_image_size, check_prompt
        from mistralrs.engine.images import image_response, parse_response_format

        response_format = parse_response_format(response_format)
        check_prompt(prompt)
        check_image_size(height, width)
        image = self._engine.call(GenerateImage(prompt, height, width), timeout=None)
        return image_response(image, response_format)

    def _generate_image(self, command: GenerateImage):
        """Engine thread: the pipeline's image, latents drawn from the seeded generator when there is one."""
        return self._diffusion.pipeline.generate(command.prompt, command.height, command.width,
                                                 generator=self._image_generator)

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are canceled) and, under tensor parallelism, the other ranks
        and the process group. Idempotent."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
        tp, self._tp = getattr(self, "_tp", None), None
        if tp is not None:
            tp.close()
