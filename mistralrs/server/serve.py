"""Running the app with uvicorn: in the foreground (`serve`, the CLI) or on a background thread.

Shutdown (Ctrl-C, SIGTERM, `BackgroundServer.stop`) first cancels every in-flight request, so streams end at
once with `finish_reason: "canceled"` and `data: [DONE]`; uvicorn then closes the connections, and `serve`
closes the runner (its engine thread stops).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from mistralrs.api.runner import Runner
from mistralrs.server.app import ServerConfig, create_app
from mistralrs.server.protocol import HardenedH11Protocol

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SEC = 5.0  # after in-flight requests were canceled, how long uvicorn waits for connections


class _Server(uvicorn.Server):
    """uvicorn's server, cancelling the app's in-flight requests when shutdown begins."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.tracker = app.state.mistralrs.tracker  # the app's in-flight requests

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.tracker.cancel_all()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM start the graceful shutdown (a second Ctrl-C forces it). Unlike uvicorn, the
        signal is not raised again afterwards, so the command exits with status 0 once it shut down."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def _uvicorn_config(app, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn's settings: the hardened h11 protocol, the connection limit of the app's ServerConfig."""
    config = app.state.mistralrs.config
    protocol = functools.partial(HardenedH11Protocol, read_timeout_sec=config.read_timeout_sec)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_SEC, http=protocol,
                          limit_concurrency=config.max_connections + 1)   # uvicorn counts the new one too


def serve(runner: Runner, config: ServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 1234,
          log_level: str = "info") -> None:
    """Serve `runner` over HTTP until interrupted, then close it (blocking; call from the main thread)."""
    app = create_app(runner, config)
    server = _Server(_uvicorn_config(app, host, port, log_level), app)
    try:
        server.run()
    finally:
        runner.close()


class BackgroundServer:
    """The app served by uvicorn on a background thread, on a free local port (tests, notebooks).

    `with BackgroundServer(runner) as server: OpenAI(base_url=server.url + "/v1", api_key="x")`. The runner
    stays open when the server stops.
    """

    def __init__(self, runner: Runner, config: ServerConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.app = create_app(runner, config)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = _Server(_uvicorn_config(self.app, self.host, self.port, "warning"), self.app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="mistralrs-http", daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:40123 (the OpenAI base URL is this plus /v1)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel in-flight requests, close the connections and stop the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
