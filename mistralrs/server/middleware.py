"""ASGI middleware run before any route: the optional API key, the request body size limit and read timeout."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralrs.server.errors import APIError

OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/api-doc/openapi.json"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


@dataclass(frozen=True)
class GuardSettings:
    """What `GuardMiddleware` enforces (from the ServerConfig)."""

    api_key: str | None  # None: no key needed
    max_body_bytes: int  # largest accepted request body (413 beyond)
    read_timeout_sec: float  # the body must arrive in full within this after the request head (408 beyond)


class GuardMiddleware:
    """Refuses a request without the API key (401), a body over `max_body_bytes` (413) or one slower than
    `read_timeout_sec` (408).

    The key is read from `Authorization: Bearer <key>` or `X-API-Key: <key>`; health and documentation paths
    stay open. The body is read here in full (up to the limit) and replayed to the app; after it, `receive`
    passes through, so routes still see the client's `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings

    def _authorized(self, scope: Scope) -> bool:
        authorization = _header(scope, b"authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            token = _header(scope, b"x-api-key") or ""
        return hmac.compare_digest(token.strip().encode(), self.settings.api_key.encode())

    def _refusal(self, scope: Scope) -> APIError | None:
        """The error a request gets before its body is read, or None."""
        settings = self.settings
        if (settings.api_key is not None and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS
                and not self._authorized(scope)):
            return APIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.settings.max_body_bytes} bytes",
                        code="request_too_large")

    async def _read_body(self, receive: Receive) -> bytes | APIError | None:
        """The whole body; an APIError when it is too large or too slow; None when the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.read_timeout_sec
        body = bytearray()
        more_body = True
        while more_body:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return APIError(408, f"The request body did not arrive within {self.settings.read_timeout_sec:g} "
                                     "seconds", code="request_timeout")
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
            if len(body) > self.settings.max_body_bytes:
                return self._too_large()
        return bytes(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        result = self._refusal(scope)
        if result is None and scope["method"] in ("POST", "PUT", "PATCH"):
            result = await self._read_body(receive)
            if result is None:
                return   # the client left before sending its body
        if isinstance(result, APIError):
            response = result.response()
            if result.status in (408, 413):
                response.headers["Connection"] = "close"   # the rest of the body is not read
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(result or b"", receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that returns the already-read body once, then defers to the client's `receive`."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
