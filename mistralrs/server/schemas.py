"""HTTP request bodies (OpenAI shapes plus the reference's extras) and their mapping onto the request dataclasses.

Bodies are parsed strictly from JSON (`"0.5"` is not a number, `1.0` is not an int) and unknown fields are
ignored, as OpenAI clients send fields this server has no use for (`user`, `store`, `metadata`, ...). Values
are then checked by `ChatCompletionRequest` / `CompletionRequest` themselves, whose errors name the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest
from mistralrs.server.errors import APIError

GrammarType = Literal["regex", "lark", "json_schema", "llguidance"]
MAX_CHOICES = 128  # most sequences one request may ask for (n, best_of), as OpenAI
MAX_SEED = 2**32 - 1  # seeds are 32-bit here (larger ones would overflow the per-sequence generator seed)
# The OpenAI API's ranges (the Python API accepts any float32 value, as the reference).
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2]
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Grammar(_Body):
    """A generation constraint (reference extra): `{"type": "regex"|"lark"|"json_schema"|"llguidance", "value"}`."""

    type: GrammarType
    value: str | dict[str, Any] | list[Any] = Field(description="regex/Lark text, or a JSON schema / llguidance "
                                                                "object (as an object or a JSON string)")


class StreamOptions(_Body):
    """OpenAI `stream_options`."""

    include_usage: bool | None = Field(None, description="send a last chunk with `usage` and no choices")


class ResponseFormat(_Body):
    """OpenAI `response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(None, description='{"name", "schema", "strict"?} for json_schema')


class _SamplingBody(_Body):
    """Fields shared by chat and completion bodies (None means the default)."""

    model: str | None = Field(None, description="any name selects the served model (with --strict-model-name: "
                                                  "its id, file name or 'default')")
    max_tokens: int | None = Field(None, description="most generated tokens; clamped to the room left in the "
                                                     "context")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="number of choices")
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description="0 is greedy; unset means 1.0")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, description="extra: keep the k most likely tokens")
    min_p: float | None = Field(None, description="extra: drop tokens below min_p times the top probability")
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, description='token id (as a string) -> bias in [-100, 100], e.g. {"42": -100}')
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    grammar: Grammar | None = Field(None, description="extra: constrain the output (not with response_format)")
    adapters: list[str] | None = Field(None, description="extra: LoRA adapters to activate for this request")
    dry_multiplier: float | None = Field(None, description="extra: DRY repetition penalty strength")
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI tools, passed to the chat template")
    tool_choice: str | dict[str, Any] | None = Field(None, description="'none', 'auto' or a named function")

    def include_usage(self) -> bool:
        """True when the stream should end with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def shared_fields(self) -> dict[str, Any]:
        """The request-dataclass keywords both bodies map the same way."""
        return dict(
            model=self.model or "default", n_choices=1 if self.n is None else self.n, logit_bias=self.logit_bias,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop_seqs=self.stop, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stream=bool(self.stream), adapters=self.adapters, min_p=self.min_p, tool_schemas=self.tools,
            tool_choice=self.tool_choice, dry_multiplier=self.dry_multiplier, dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length, dry_sequence_breakers=self.dry_sequence_breakers,
            seed=self.seed)


class ChatCompletionBody(_SamplingBody):
    """Body of `POST /v1/chat/completions`."""

    messages: list[dict[str, Any]] | str = Field(description="OpenAI messages, or one string (a user message)")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, description="alternatives per token, 0..20 (1 when logprobs and unset)")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name of max_tokens")
    response_format: ResponseFormat | None = None


class CompletionBody(_SamplingBody):
    """Body of `POST /v1/completions`."""

    prompt: str | list[str] = Field(description="the text to continue (a list must hold exactly one string)")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description="generate this many, return the n most likely")
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, description="report token logprobs and this many alternatives (0..20)")


class ImageGenerationBody(_Body):
    """Body of `POST /v1/images/generations` (diffusion models only)."""

    prompt: str
    model: str | None = None
    n: int | None = Field(None, description="ignored: one image per request, as in the reference")
    response_format: Literal["url", "b64_json", "Url", "B64Json"] | None = None
    height: int | None = None
    width: int | None = None
    size: str | None = Field(None, description="OpenAI spelling of the size, 'WIDTHxHEIGHT'")


class AdaptersBody(_Body):
    """Body of `POST /activate_adapters`."""

    adapter_names: list[str]


class ReIsqBody(_Body):
    """Body of `POST /re_isq`."""

    ggml_type: str


BODY_MODELS = (ChatCompletionBody, CompletionBody, ImageGenerationBody, AdaptersBody, ReIsqBody)


def _grammar(body: ChatCompletionBody | CompletionBody) -> tuple[Any, str | None]:
    """(grammar, grammar_type) from `grammar` or `response_format`, which cannot be combined."""
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        if body.grammar is not None:
            raise APIError(400, "grammar and response_format cannot be combined; give only one",
                           param="response_format")
        if response_format.type == "json_object":
            return {"type": "object"}, "json_schema"
        schema = (response_format.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema")
        return schema, "json_schema"
    if body.grammar is None:
        return None, None
    return body.grammar.value, body.grammar.type


def _max_tokens(body: ChatCompletionBody) -> int | None:
    if body.max_completion_tokens is None:
        return body.max_tokens
    if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give only one",
                       param="max_completion_tokens")
    return body.max_completion_tokens


def chat_request(body: ChatCompletionBody) -> ChatCompletionRequest:
    """The `ChatCompletionRequest` a chat body asks for (raises ValueError/TypeError/APIError when it is bad)."""
    grammar, grammar_type = _grammar(body)
    return ChatCompletionRequest(
        messages=body.messages, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs,
        max_tokens=_max_tokens(body), grammar=grammar, grammar_type=grammar_type, **body.shared_fields())


def completion_request(body: CompletionBody) -> CompletionRequest:
    """The `CompletionRequest` a completion body asks for (raises ValueError/TypeError/APIError when it is bad)."""
    prompt = body.prompt
    if body.best_of is not None and body.best_of < (body.n or 1):
        raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n}): the n choices are the best of "
                            "best_of generated ones", param="best_of")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: exactly one prompt per request is supported, got a list of {len(prompt)}",
                           param="prompt")
        prompt = prompt[0]
    grammar, grammar_type = _grammar(body)
    return CompletionRequest(
        prompt=prompt, best_of=1 if body.best_of is None else body.best_of, echo_prompt=bool(body.echo),
        max_tokens=body.max_tokens, suffix=body.suffix, grammar=grammar, grammar_type=grammar_type,
        **body.shared_fields())
