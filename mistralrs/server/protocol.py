"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for request heads and half-closes read as the end of input.

- A connection that has not sent a complete request head `read_timeout_sec` after it opened (or after the first
  byte of its next request) is closed: idle or trickling sockets cannot hold connection slots. (The body has its
  own deadline in `GuardMiddleware`, which answers 408; between requests uvicorn's keep-alive timeout applies.)
- A client that half-closes its socket (`shutdown(SHUT_WR)`) once its request arrived in full still gets its
  answer: uvicorn would read the end of input as a disconnect and cancel the request. The server cannot tell a
  half-close from a full close by reading, so while the response has not started it writes an interim
  `100 Continue` now and then, which HTTP/1.1 clients skip (RFC 9110 §15.2): a client that closed for good
  answers the first with a reset, so a later one fails, which is the disconnect the app's watcher sees (on a
  local connection at the second write, one loop turn later). A streaming response's own writes do the same.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MIN_PROBE_SEC = 0.05  # after a half-close: a probe at once, one on the next loop turn, then after this...
MAX_PROBE_SEC = 2.0  # ...doubling up to this


class HardenedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and half-close support (see the module docstring)."""

    def __init__(self, *args, read_timeout_sec: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_sec = read_timeout_sec  # most seconds to send a request head
        self._head_timer: asyncio.TimerHandle | None = None  # set while a request head is awaited
        self._probe_timer: asyncio.TimerHandle | None = None  # set while a half-closed client awaits its answer

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()   # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_probe()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        """Keep the connection open to answer a complete request (see the module docstring)."""
        cycle = self.cycle
        if (cycle is None or cycle.response_complete or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE)
                or self.scope["http_version"] != "1.1"):
            return None   # nothing being answered, a request cut short, or HTTP/1.0: the connection closes
        cycle.keep_alive = False   # no further request can come: close once answered
        if not cycle.response_started:
            self._probe(0.0)
        return True

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.read_timeout_sec, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %.0f s",
                             self.read_timeout_sec)
            self.transport.close()

    def _probe(self, delay: float) -> None:
        """Write `100 Continue` while the half-closed client's response has not started; then again later."""
        self._probe_timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_started or cycle.disconnected or self.transport.is_closing():
            return
        self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                      reason=b"Continue")))
        self._probe_timer = self.loop.call_later(delay, self._probe, min(max(2 * delay, MIN_PROBE_SEC), MAX_PROBE_SEC))

    def _cancel_probe(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
