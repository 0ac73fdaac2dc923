"""ASGI middleware run before any route: Host check, API key, admin endpoints, JSON content type, body limits."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistralrs.server.errors import APIError

OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/api-doc/openapi.json"})
ADMIN_PATHS = frozenset({"/re_isq", "/activate_adapters"})  # change the served model for every client
JSON_TYPES = ("application/json",)  # besides any `application/...+json`


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (address.ipv4_mapped or address) if address.version == 6 else address


def _host_name(host_header: str) -> str:
    """The name in a Host header, without port or brackets, lower-case: `[::1]:80` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def host_allowed(host_header: str | None, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether a loopback connection may name this host: an IP address (DNS rebinding needs a name), `localhost`
    or a `*.localhost` name, or one of `allowed_hosts` ("*" allows any)."""
    if host_header is None or "*" in allowed_hosts:
        return True
    name = _host_name(host_header).rstrip(".")
    return (_ip(name) is not None or name == "localhost" or name.endswith(".localhost")
            or name in {h.lower() for h in allowed_hosts})


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type in JSON_TYPES or (media_type.startswith("application/") and media_type.endswith("+json"))


@dataclass(frozen=True)
class GuardSettings:
    """What `GuardMiddleware` enforces (from the ServerConfig)."""

    api_key: str | None  # None: no key needed
    max_body_bytes: int  # largest accepted request body (413 beyond)
    read_timeout_sec: float  # the body must arrive in full within this after the request head (408 beyond)
    allowed_hosts: tuple[str, ...]  # Host names accepted on loopback connections besides localhost and IPs
    admin_without_key: bool  # admin endpoints open although no API key is set


class GuardMiddleware:
    """Refuses, in this order: a loopback connection's request for a foreign Host (403, against DNS rebinding);
    a request without the API key (401); an admin endpoint when no key is set (403, unless allowed); a POST
    whose Content-Type is not JSON (415, so that a cross-site form or `text/plain` POST cannot reach the routes
    without a CORS preflight); a body over `max_body_bytes` (413) or slower than `read_timeout_sec` (408).

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
        local = _ip(str((scope.get("server") or ("",))[0]))
        host = _header(scope, b"host")
        if local is not None and local.is_loopback and not host_allowed(host, settings.allowed_hosts):
            return APIError(403, f"Host {host!r} is not a name of this server: start it with --allowed-host NAME "
                                 "to accept it", code="host_not_allowed")
        path, method = scope["path"], scope["method"]
        if settings.api_key is not None:
            if method != "OPTIONS" and path not in OPEN_PATHS and not self._authorized(scope):
                return APIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        elif path in ADMIN_PATHS and not settings.admin_without_key:
            return APIError(403, f"{path} changes the model for every client: it needs an API key (--api-key) "
                                 "or --enable-admin-endpoints", code="admin_disabled")
        if method == "POST" and not _is_json(_header(scope, b"content-type")):
            return APIError(415, "The request body must be JSON sent with 'Content-Type: application/json'",
                            code="unsupported_media_type")
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
            if result.status in (408, 413, 415):
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
