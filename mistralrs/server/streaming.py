"""Bridging the engine thread to the event loop, server-sent events, and client disconnects.

The engine thread puts each request's messages on its `outputs`; here that is an `AsyncOutputs`, whose
`put` only appends and wakes the event loop (never blocks the engine), so a slow reader delays nobody but
itself. A watcher task per request waits for the client's `http.disconnect`; it closes the outputs, the
waiting coroutine wakes up and aborts the request in the engine, which stops it within one step and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mistralrs.engine.llm_engine import LLMEngine, Submission
from mistralrs.engine.request import RequestFinished
from mistralrs.server.encode import json_bytes
from mistralrs.server.errors import APIError

logger = logging.getLogger(__name__)

DONE_EVENT = b"data: [DONE]\n\n"
KEEP_ALIVE_EVENT = b": keep-alive\n\n"


class ClientDisconnected(Exception):
    """The client went away before its request finished."""


class AsyncOutputs:
    """One request's engine messages, handed from the engine thread to a coroutine on the event loop.

    `put` is called by the engine thread (it is the engine request's `outputs`); `get_batch` by one
    coroutine. Wake-ups are coalesced: many puts between two reads cost one loop wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # the event loop the reader runs on
        self._items: collections.deque = collections.deque()  # messages not read yet (deque ops are atomic)
        self._waiter: asyncio.Future | None = None  # set while the reader waits
        self._wake_scheduled = False  # a wake-up is queued on the loop already
        self._closed = False  # the client disconnected

    def put(self, message: Any) -> None:
        """Engine thread: queue a message and wake the reader."""
        self._items.append(message)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:   # the loop is closed (server gone): nobody will read this request
                self._wake_scheduled = False

    def close(self) -> None:
        """Event loop: the client disconnected; the reader gets ClientDisconnected."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._wake_scheduled = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get_batch(self, timeout: float | None = None) -> list[Any]:
        """Every queued message (waiting for at least one); [] after `timeout` seconds without any."""
        if not self._items and not self._closed:
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, self._wake) if timeout else None
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        if self._closed:
            raise ClientDisconnected()
        batch = []
        while self._items:
            batch.append(self._items.popleft())
        return batch


async def _watch_disconnect(receive: Receive, outputs: AsyncOutputs) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            outputs.close()
            return


class RequestTracker:
    """The app's in-flight engine requests, so that a shutdown can cancel them; counts client disconnects."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine  # the front door the app serves
        self.active: set[str] = set()  # engine request ids being served
        self.shutting_down = False  # set once shutdown began: new requests get a 503
        self.num_client_disconnects = 0  # requests canceled because their client went away

    def cancel_all(self) -> None:
        """Cancel every in-flight request (they end with finish_reason "canceled") and refuse new ones."""
        self.shutting_down = True
        for request_id in list(self.active):
            self.engine.abort(request_id)


class _Serving:
    """Context of one submitted request: tracks it, watches the client, aborts it unless it finished."""

    def __init__(self, tracker: RequestTracker, submission: Submission, outputs: AsyncOutputs,
                 receive: Receive) -> None:
        self.tracker = tracker
        self.request_id = submission.request_id
        self.outputs = outputs
        self.receive = receive
        self.finished = False
        self.watcher: asyncio.Task | None = None

    def __enter__(self) -> _Serving:
        self.tracker.active.add(self.request_id)
        self.watcher = asyncio.ensure_future(_watch_disconnect(self.receive, self.outputs))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.watcher.cancel()
        self.tracker.active.discard(self.request_id)
        if exc_type is ClientDisconnected:
            self.tracker.num_client_disconnects += 1
            logger.info("client of request %s disconnected; request canceled", self.request_id)
        if not self.finished:
            self.tracker.engine.abort(self.request_id)


def _engine_error(exc: Exception) -> APIError:
    return APIError(500, f"The engine failed while generating: {exc}", code="engine_error")


async def collect(tracker: RequestTracker, submission: Submission, outputs: AsyncOutputs,
                  receive: Receive) -> Any:
    """Wait for a non-streaming request's response; None when the client disconnected first."""
    try:
        with _Serving(tracker, submission, outputs, receive) as serving:
            while True:
                for message in await outputs.get_batch():
                    if isinstance(message, Exception):
                        serving.finished = True
                        raise _engine_error(message)
                    if isinstance(message, RequestFinished):
                        serving.finished = True
                        return submission.assembler.response(message)
    except ClientDisconnected:
        return None


def _chunk_events(chunk: Any, encode: Callable[[Any], dict], include_usage: bool) -> list[bytes]:
    """The `data:` events of one chunk, usage as OpenAI sends it: the last chunk's `usage` moves to a chunk of
    its own with no choices when the client asked for it (`stream_options.include_usage`), else it is left out."""
    usage, chunk.usage = chunk.usage, None
    events = [b"data: " + json_bytes(encode(chunk)) + b"\n\n"]
    if usage is not None and include_usage:
        events.append(b"data: " + json_bytes(encode(dataclasses.replace(chunk, choices=[], usage=usage))) + b"\n\n")
    return events


async def sse_events(tracker: RequestTracker, submission: Submission, outputs: AsyncOutputs, receive: Receive,
                     encode: Callable[[Any], dict], include_usage: bool, keep_alive_sec: float) -> AsyncIterator[bytes]:
    """Server-sent events of a streaming request: `data: <chunk>` events, then `data: [DONE]`.

    Messages that piled up while the client was slow are sent in one write. An engine failure is sent as a
    `data: {"error": ...}` event before `[DONE]`.
    """
    try:
        with _Serving(tracker, submission, outputs, receive) as serving:
            while not serving.finished:
                batch = await outputs.get_batch(keep_alive_sec)
                if not batch:
                    yield KEEP_ALIVE_EVENT
                    continue
                events = []
                for message in batch:
                    if isinstance(message, Exception):
                        serving.finished = True
                        events.append(b"data: " + json_bytes(_engine_error(message).body()) + b"\n\n")
                        break
                    if isinstance(message, RequestFinished):
                        serving.finished = True
                    for chunk in submission.assembler.chunks(message):
                        events.extend(_chunk_events(chunk, encode, include_usage))
                if serving.finished:
                    events.append(DONE_EVENT)
                yield b"".join(events)
    except ClientDisconnected:
        return


class EventStreamResponse(Response):
    """A `text/event-stream` response over an async iterator of byte chunks.

    Unlike Starlette's StreamingResponse it does not listen for the disconnect itself (the events iterator
    does), and it always closes the iterator, so that its clean-up (aborting the request) runs at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events  # the body, chunk by chunk
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:   # the connection broke while writing: the events' clean-up cancels the request
            logger.info("stream interrupted by a connection error")
        finally:
            await self.events.aclose()
