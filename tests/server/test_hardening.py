"""Hostile and careless clients (issue 12): cheap bounds first, bounded waits, closed doors."""

from __future__ import annotations

import gc
import json
import socket
import types

import pytest

from mistralrs.engine.input_processor import InputProcessor
from mistralrs.server import BackgroundServer, ServerConfig
from tests.server.conftest import NO_EOS, request, wait_until


def test_a_prompt_that_cannot_fit_is_refused_by_its_length(server, runner):
    inputs = runner.llm_engine._inputs
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "x" * (runner.max_model_len * inputs.max_token_chars + 1), "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "characters" in body["error"]["message"]


def test_a_refused_prompt_is_freed_at_once(server, runner):
    """The frames that held a refused prompt are gone with the response, not kept in a cycle until a collection."""
    limit = runner.max_model_len * runner.llm_engine._inputs.max_token_chars
    gc.collect()
    gc.disable()
    try:
        status, _ = request(server, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "x" * limit}], "max_tokens": 1})
        bounded = InputProcessor._bounded.__code__
        kept = [o for o in gc.get_objects() if type(o) is types.FrameType and o.f_code is bounded]
    finally:
        gc.enable()
    assert status == 400 and kept == []


@pytest.fixture(scope="module")
def impatient(runner):
    """A server that gives clients half a second to send a request head, then its body."""
    with BackgroundServer(runner, ServerConfig(read_timeout_sec=0.5)) as server:
        yield server


def _connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=30)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _head(server, body_length: int, path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def test_a_slow_body_gets_a_408_and_the_connection_closes(impatient):
    with _connect(impatient) as sock:
        sock.sendall(_head(impatient, 1000) + b'{"prompt": ')
        reply = _read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: loc"])
def test_a_connection_without_a_whole_request_head_is_closed(impatient, sent):
    with _connect(impatient) as sock:
        sock.sendall(sent)
        assert _read_until_closed(sock) == b""


def test_connections_beyond_the_limit_get_a_503(runner):
    with BackgroundServer(runner, ServerConfig(max_connections=2)) as server:
        idle = [_connect(server) for _ in range(2)]
        try:
            assert wait_until(lambda: len(server._server.server_state.connections) == 2)
            assert request(server, "GET", "/health")[0] == 503
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: not server._server.server_state.connections)
        assert request(server, "GET", "/health") == (200, "OK")


@pytest.mark.parametrize("stream, connection", [(False, "keep-alive"), (True, "keep-alive"), (False, "close")])
def test_a_half_closed_client_gets_its_answer(server, stream, connection):
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "stream": stream, "logit_bias": NO_EOS}).encode()
    with _connect(server) as sock:
        sock.sendall(_head(server, len(body)).replace(b"\r\n\r\n", f"\r\nConnection: {connection}\r\n\r\n".encode())
                     + body)
        sock.shutdown(socket.SHUT_WR)
        reply = _read_until_closed(sock)
    while reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):   # interim answers a client skips
        reply = reply[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if stream:
        assert b"data: [DONE]" in body
    else:
        assert json.loads(body)["usage"]["completion_tokens"] == 3
