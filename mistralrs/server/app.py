"""The OpenAI-compatible ASGI app over one `Runner`'s front door (`LLMEngine`, REFERENCE §2.2).

`create_app(runner, config)` returns a FastAPI app with the endpoints `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health` (and `/`), `POST /v1/images/generations`,
`POST /activate_adapters`, `POST /re_isq`, the OpenAPI document at `/api-doc/openapi.json` and, with
`ServerConfig.docs`, its viewer at `/docs`. Request work that may take long (templating and tokenizing a prompt)
runs in a worker thread; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response

from mistralrs.api.enums import ImageGenerationResponseFormat
from mistralrs.api.runner import Runner
from mistralrs.engine.llm_engine import LLMEngine, Submission
from mistralrs.server import encode, schemas
from mistralrs.server.errors import APIError, client_error, install_error_handlers, validation_error
from mistralrs.server.middleware import GuardMiddleware, GuardSettings
from mistralrs.server.streaming import AsyncOutputs, EventStreamResponse, RequestTracker, collect, sse_events
from mistralrs.vision.images import ImageSourcePolicy

logger = logging.getLogger(__name__)
request_log = logging.getLogger("mistralrs.server.requests")  # request/response bodies (`--log FILE`)

DEFAULT_MAX_BODY_BYTES = 50 * 2**20  # as the reference
DEFAULT_READ_TIMEOUT_SEC = 60.0  # for a request head, then for its body (the reference has none)
DEFAULT_MAX_CONNECTIONS = 512  # open connections (the reference has no limit)
Body = TypeVar("Body", bound=BaseModel)
_CLIENT_GONE = Response(status_code=408)  # answered (to nobody) when the client left before its response


def _default_keep_alive_sec() -> float:
    """KEEP_ALIVE_INTERVAL (milliseconds, as the reference) or 10 s."""
    value = os.environ.get("KEEP_ALIVE_INTERVAL", "")
    return int(value) / 1000 if value.isdigit() and int(value) > 0 else 10.0


@dataclass
class ServerConfig:
    """Settings of the HTTP app (the CLI's server options)."""

    api_key: str | None = None  # required as `Authorization: Bearer <key>` when set
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed by CORS ("*": any); [] off
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get a 413
    read_timeout_sec: float = DEFAULT_READ_TIMEOUT_SEC  # a request head, then its body, must arrive within this
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # requests on connections beyond this many get a 503
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback connection may use besides localhost, IPs ("*": any)
    admin_without_key: bool = False  # serve /re_isq and /activate_adapters although no api_key is set
    keep_alive_sec: float = field(default_factory=_default_keep_alive_sec)  # SSE comment after this much silence
    model_aliases: tuple[str, ...] = ()  # names accepted in `model` besides the model id and "default" (strict)
    strict_model_name: bool = False  # 404 for a `model` other than the id, its aliases or "default" (else any name)
    model_name: str | None = None  # the `model` clients see; None: `public_model_name` of the model id
    docs: bool = False  # serve the Swagger UI at /docs (it loads its scripts from a CDN)
    allowed_image_dir: str | None = None  # the one directory whose files image URLs may name (file://, local
    #                                       paths); None: clients name no server file, only http(s)/data/base64

    @property
    def image_policy(self) -> ImageSourcePolicy:
        """The image sources requests may name (mistralrs/vision/images.py)."""
        return ImageSourcePolicy.for_server(self.allowed_image_dir)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.read_timeout_sec <= 0:
            raise ValueError(f"read_timeout_sec must be > 0, got {self.read_timeout_sec}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.keep_alive_sec <= 0:
            raise ValueError(f"keep_alive_sec must be > 0, got {self.keep_alive_sec}")
        if self.allowed_image_dir is not None and not os.path.isdir(self.allowed_image_dir):
            raise ValueError(f"allowed_image_dir must be an existing directory, got {self.allowed_image_dir!r}")


def public_model_name(model_id: str) -> str:
    """How clients see a model id: as given, or its last component when it is an absolute path (the server's file
    system is nobody's business)."""
    return os.path.basename(model_id.rstrip("/")) if os.path.isabs(model_id) else model_id


class _AppState:
    """What the routes share: the front door, the settings, the in-flight requests."""

    def __init__(self, engine: LLMEngine, config: ServerConfig) -> None:
        self.engine = engine  # the served model's front door
        self.config = config
        self.tracker = RequestTracker(engine)
        self.created = int(time.time())
        self.model_name = config.model_name or public_model_name(engine.model_id)  # in /v1/models and responses
        model_id = engine.model_id
        self.accepted_models = {"default", model_id, os.path.basename(model_id.rstrip("/")),
                                *config.model_aliases}

    def check_model(self, name: str | None) -> None:
        """Any name selects the one served model (as the reference); with `strict_model_name`, only its names."""
        if name is None or not self.config.strict_model_name or name in self.accepted_models:
            return
        raise APIError(404, f"The model {name!r} does not exist: this server serves {self.model_name!r} "
                            "(also accepted: 'default')", param="model", code="model_not_found")

    def check_open(self) -> None:
        if self.tracker.shutting_down:
            raise APIError(503, "The server is shutting down", code="shutting_down")


def _logging_requests() -> bool:
    """Bodies are logged only where a handler was attached to `request_log` (the CLI's `--log FILE`)."""
    return bool(request_log.handlers) and request_log.isEnabledFor(logging.INFO)


async def _parse(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if _logging_requests():
        request_log.info("%s %s %s", request.method, request.url.path, raw.decode("utf-8", "replace"))
    return body


def _build(factory, *args):
    """Build a request dataclass from a body; its ValueError/TypeError become 4xx APIErrors."""
    try:
        return factory(*args)
    except (ValueError, TypeError) as exc:
        raise client_error(exc) from None


async def _submit(state: _AppState, submit, prompt_param: str) -> tuple[Submission, AsyncOutputs]:
    """Run `submit(outputs)` (templating, tokenizing, queueing) in a worker thread; mistakes become 4xx.

    `prompt_param` is the body field an error names when it names none (a prompt too long, for instance).
    """
    state.check_open()
    outputs = AsyncOutputs(asyncio.get_running_loop())
    try:
        submission = await run_in_threadpool(submit, outputs)
    except (ValueError, TypeError) as exc:
        exc.__traceback__ = None   # its frames hold the prompt, in a cycle: free it now, not at the next collection
        raise client_error(exc, prompt_param) from None
    submission.assembler.model_id = state.model_name   # the responses' `model`, as /v1/models shows it
    return submission, outputs


def _json(body: dict, status: int = 200) -> Response:
    if _logging_requests():
        request_log.info("response %s", encode.json_bytes(body).decode())
    return Response(encode.json_bytes(body), status_code=status, media_type="application/json")


def _body_doc(model: type[BaseModel]) -> dict:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document lists the body schemas (routes parse bodies themselves, strictly)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, definitions = models_json_schema([(m, "validation") for m in schemas.BODY_MODELS],
                                                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(runner: Runner, config: ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app serving `runner`'s front door (the caller keeps ownership of the runner)."""
    config = config or ServerConfig()
    state = _AppState(runner.llm_engine, config)
    app = FastAPI(title="mistralrs", version="0.1.0", docs_url="/docs" if config.docs else None, redoc_url=None,
                  openapi_url="/api-doc/openapi.json",
                  description="OpenAI-compatible server of the mistralrs Python engine")
    app.state.mistralrs = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, settings=GuardSettings(
        api_key=config.api_key, max_body_bytes=config.max_body_bytes, read_timeout_sec=config.read_timeout_sec,
        allowed_hosts=tuple(config.allowed_hosts), admin_without_key=config.admin_without_key))
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization"])
    _add_generation_routes(app, state)
    _add_other_routes(app, state)
    _install_openapi(app)
    return app


def _add_generation_routes(app: FastAPI, state: _AppState) -> None:
    engine = state.engine

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(schemas.ChatCompletionBody))
    async def chat_completions(request: Request) -> Response:
        """Chat completion (OpenAI shape); `stream: true` answers with server-sent events."""
        body = await _parse(request, schemas.ChatCompletionBody)
        state.check_model(body.model)
        chat = _build(schemas.chat_request, body)
        policy = state.config.image_policy
        submission, outputs = await _submit(
            state, lambda out: engine.submit_chat_completion(chat, outputs=out, image_policy=policy), "messages")
        if body.stream:
            return EventStreamResponse(sse_events(state.tracker, submission, outputs, request.receive,
                                                  encode.chat_chunk, body.include_usage(),
                                                  state.config.keep_alive_sec))
        response = await collect(state.tracker, submission, outputs, request.receive)
        if response is None:
            return _CLIENT_GONE
        return _json(encode.chat_response(response))

    @app.post("/v1/completions", openapi_extra=_body_doc(schemas.CompletionBody))
    async def completions(request: Request) -> Response:
        """Text completion (OpenAI legacy shape); `stream: true` answers with server-sent events."""
        body = await _parse(request, schemas.CompletionBody)
        state.check_model(body.model)
        completion = _build(schemas.completion_request, body)
        submission, outputs = await _submit(
            state, lambda out: engine.submit_completion(completion, logprobs=body.logprobs, outputs=out), "prompt")
        if body.stream:
            return EventStreamResponse(sse_events(state.tracker, submission, outputs, request.receive,
                                                  encode.CompletionChunkEncoder(), body.include_usage(),
                                                  state.config.keep_alive_sec))
        response = await collect(state.tracker, submission, outputs, request.receive)
        if response is None:
            return _CLIENT_GONE
        prompt_chars = len(completion.prompt) if completion.echo_prompt else 0
        return _json(encode.completion_response(response, prompt_chars))


def _image_size(body: schemas.ImageGenerationBody) -> tuple[int, int]:
    """(height, width) from `height`/`width` or OpenAI's `size` ("WIDTHxHEIGHT")."""
    height, width = body.height or 720, body.width or 1280
    if body.size is not None:
        w, _, h = body.size.partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise APIError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024'), got {body.size!r}", param="size")
        width, height = int(w), int(h)
    return height, width


def _add_other_routes(app: FastAPI, state: _AppState) -> None:
    engine = state.engine

    @app.get("/health")
    @app.get("/")
    async def health() -> PlainTextResponse:
        """Liveness: "OK"."""
        return PlainTextResponse("OK")

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "local"}

    @app.get("/v1/models")
    async def list_models() -> Response:
        """The served model (OpenAI list shape)."""
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> Response:
        """The served model, by its id or an accepted alias."""
        state.check_model(name)
        return _json(model_card())

    @app.post("/v1/images/generations", openapi_extra=_body_doc(schemas.ImageGenerationBody))
    async def images(request: Request) -> Response:
        """Image generation (diffusion models only; a text model answers 400)."""
        body = await _parse(request, schemas.ImageGenerationBody)
        state.check_model(body.model)
        height, width = _image_size(body)
        response_format = ImageGenerationResponseFormat.from_str(body.response_format or "url")
        try:
            result = await run_in_threadpool(engine.generate_image, body.prompt, response_format, height, width)
        except (ValueError, TypeError) as exc:
            raise client_error(exc) from None
        return _json(result.to_dict())

    @app.post("/activate_adapters", openapi_extra=_body_doc(schemas.AdaptersBody))
    async def activate_adapters(request: Request) -> PlainTextResponse:
        """Swap the active LoRA adapters (models loaded with adapters only)."""
        body = await _parse(request, schemas.AdaptersBody)
        try:
            await run_in_threadpool(engine.activate_adapters, body.adapter_names)
        except (ValueError, TypeError) as exc:
            raise client_error(exc) from None
        return PlainTextResponse(f"Successfully activated adapters: {', '.join(body.adapter_names)}")

    @app.post("/re_isq", openapi_extra=_body_doc(schemas.ReIsqBody))
    async def re_isq(request: Request) -> PlainTextResponse:
        """Re-quantize the model in place with another ISQ type."""
        body = await _parse(request, schemas.ReIsqBody)
        try:
            await run_in_threadpool(engine.send_re_isq, body.ggml_type)
        except (ValueError, TypeError) as exc:
            raise client_error(exc, "ggml_type") from None
        return PlainTextResponse(f"Successfully re-quantized the model to {body.ggml_type}")
