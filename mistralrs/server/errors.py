"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every client mistake is a 4xx; a 500 (`server_error`) means a bug in this server, never bad input.
`ValueError`/`TypeError` raised while building or submitting a request are client errors: 400, or the
status named by an `http_status` attribute on the exception (for instance 422 for a grammar that does not
compile). The `param` is recovered from the message when it names a request field.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException
from starlette.responses import Response

from mistralrs.api.requests import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

# Request dataclass field -> the HTTP body field it comes from (for `param`).
_HTTP_NAMES = {"n_choices": "n", "stop_seqs": "stop", "echo_prompt": "echo", "tool_schemas": "tools"}
_FIELD_IN_MESSAGE = re.compile(r"\b(?:ChatCompletionRequest|CompletionRequest)\.([a-z_]+)((?:\[\d+\])*(?:\.[a-z_]+)*)")
_LEADING_FIELD = re.compile(r"^([a-z_]+): ")
_REQUEST_FIELDS = frozenset(f.name for cls in (ChatCompletionRequest, CompletionRequest) for f in fields(cls))
# pydantic puts the member of a union (`str`, `list[...]`, a model name) into an error's location: not a field
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|literal)\[.*\]|[A-Z]\w*)$")
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status code
        self.message = message  # human-readable reason, naming the field and the accepted values
        self.param = param  # the request field at fault, if any
        self.code = code  # machine-readable code (e.g. "model_not_found"), if any
        self.error_type = error_type or ("server_error" if status >= 500 else
                                         _STATUS_TYPES.get(status, "invalid_request_error"))

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        """The error as an HTTP response."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return Response(to_json(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


def _param_of(message: str) -> str | None:
    match = _FIELD_IN_MESSAGE.search(message)
    if match:
        return _HTTP_NAMES.get(match.group(1), match.group(1)) + match.group(2)
    match = _LEADING_FIELD.match(message)
    if match is None or match.group(1) not in _REQUEST_FIELDS:
        return None
    return _HTTP_NAMES.get(match.group(1), match.group(1))


def client_error(exc: Exception, default_param: str | None = None) -> APIError:
    """A ValueError/TypeError from building or submitting a request, as a 4xx APIError.

    `default_param` names the field at fault when the message names none (the prompt, for submit errors).
    """
    message = str(exc)
    status = getattr(exc, "http_status", 400)
    code = getattr(exc, "error_code", None)
    if code is None and message.startswith("Prompt sequence length is greater than"):
        code = "context_length_exceeded"
    param = getattr(exc, "param", None) or _param_of(message) or default_param
    return APIError(status, message, param=param, code=code)


def _param_from_loc(loc: tuple) -> str | None:
    """`("messages", "list[...]", 0, "role")` -> `"messages[0].role"`."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part != "body" and not _UNION_TAG.match(part):
            param += f".{part}" if param else part
    return param or None


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A body that does not match its schema (malformed JSON, wrong types, missing fields) as a 400."""
    problems: list[str] = []
    first_param = None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            return APIError(400, f"The request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
        param = _param_from_loc(tuple(error.get("loc", ())))
        first_param = first_param or param
        problem = f"{param}: {error.get('msg')}" if param else str(error.get("msg"))
        if problem not in problems:
            problems.append(problem)
    return APIError(400, "Invalid request body: " + "; ".join(problems), param=first_param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the OpenAI shape (unknown routes and methods included)."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http_exception(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"Unknown path {request.url.path!r}"
        elif exc.status_code == 405:
            detail = f"Method {request.method} is not allowed on {request.url.path!r}"
        return APIError(exc.status_code, detail).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        logger.exception("internal error while serving a request")
        return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}").response()
