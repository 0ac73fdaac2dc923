"""ASGI middleware run before any route: the optional API key and the request body size limit."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralrs.server.errors import APIError

OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/api-doc/openapi.json"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class GuardMiddleware:
    """Refuses requests without the API key (401) and bodies over `max_body_bytes` (413).

    The key is read from `Authorization: Bearer <key>` or `X-API-Key: <key>`; health and documentation paths
    stay open. The body is read here in full (up to the limit) and replayed to the app; after it, `receive`
    passes through, so routes still see the client's `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key  # None: no key needed
        self.max_body_bytes = max_body_bytes  # largest accepted request body

    def _authorized(self, scope: Scope) -> bool:
        authorization = _header(scope, b"authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            token = _header(scope, b"x-api-key") or ""
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (self.api_key is not None and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS
                and not self._authorized(scope)):
            error = APIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        body = bytearray()
        more_body = scope["method"] in ("POST", "PUT", "PATCH")
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return   # the client left before sending its body
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._too_large().response()(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that returns the already-read body once, then defers to the client's `receive`."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
