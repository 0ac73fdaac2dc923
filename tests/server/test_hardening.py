"""Hostile and careless clients (issue 12): cheap bounds first, bounded waits, closed doors."""

from __future__ import annotations

import gc
import http.client
import json
import os
import socket
import types

import pytest

from mistralrs.engine.input_processor import InputProcessor
from mistralrs.server import BackgroundServer, ServerConfig
from tests.server.conftest import NO_EOS, open_stream, read_events, request, wait_until


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


@pytest.fixture(scope="module")
def closed(runner):
    """A server with the defaults: no API key, no CORS, admin endpoints off."""
    with BackgroundServer(runner) as server:
        yield server


@pytest.mark.parametrize("path, body", [("/re_isq", {"ggml_type": "Q4K"}),
                                        ("/activate_adapters", {"adapter_names": ["a"]})])
def test_admin_endpoints_need_a_key_or_the_flag(closed, runner, path, body):
    status, reply = request(closed, "POST", path, body)
    assert status == 403 and reply["error"]["code"] == "admin_disabled"
    with BackgroundServer(runner, ServerConfig(api_key="k")) as server:
        assert request(server, "POST", path, body)[0] == 401
        bad = {"ggml_type": "../../x"} if path == "/re_isq" else {"adapter_names": ["nope"]}
        status, reply = request(server, "POST", path, bad, headers={"Authorization": "Bearer k"})
        assert status == 400   # the route answered (this model has neither ISQ weights nor adapters to swap)


def test_re_isq_names_a_bad_type(server):
    status, reply = request(server, "POST", "/re_isq", {"ggml_type": "../../x"})
    assert status == 400 and "ISQ type ../../x unknown" in reply["error"]["message"]
    assert reply["error"]["param"] == "ggml_type"


def test_cors_is_off_unless_configured(closed):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    conn = http.client.HTTPConnection(closed.host, closed.port, timeout=30)
    try:
        conn.request("OPTIONS", "/v1/chat/completions", headers=headers)
        preflight = conn.getresponse()
        preflight.read()
        conn.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
        simple = conn.getresponse()
        simple.read()
    finally:
        conn.close()
    assert preflight.status == 405 and preflight.getheader("Access-Control-Allow-Origin") is None
    assert simple.status == 200 and simple.getheader("Access-Control-Allow-Origin") is None


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_must_be_sent_as_json(closed, content_type):
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    conn = http.client.HTTPConnection(closed.host, closed.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/completions")
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        reply = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 415 and reply["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_json(closed):
    status, _ = request(closed, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1},
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


@pytest.mark.parametrize("host, allowed", [("localhost:1234", True), ("LOCALHOST", True), ("127.0.0.1", True),
                                           ("[::1]:1234", True), ("10.1.2.3:80", True), ("app.localhost", True),
                                           ("evil.example:1234", False), ("evil.example", False),
                                           ("localhost.evil.example", False)])
def test_loopback_connections_check_the_host(closed, host, allowed):
    status, reply = request(closed, "GET", "/v1/models", headers={"Host": host})
    assert status == (200 if allowed else 403)
    if not allowed:
        assert reply["error"]["code"] == "host_not_allowed"


def test_allowed_hosts_are_accepted(runner):
    with BackgroundServer(runner, ServerConfig(allowed_hosts=("api.example",))) as server:
        assert request(server, "GET", "/v1/models", headers={"Host": "api.example:8080"})[0] == 200
        assert request(server, "GET", "/v1/models", headers={"Host": "evil.example"})[0] == 403


def test_no_answer_shows_where_the_model_lives(server, runner):
    directory = runner.model_id
    assert os.path.isabs(directory)
    hello = [{"role": "user", "content": "Hi"}]
    answers = [request(server, "GET", "/v1/models"), request(server, "GET", "/v1/models/default"),
               request(server, "POST", "/v1/chat/completions", {"messages": hello, "max_tokens": 2}),
               request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
               request(server, "POST", "/v1/chat/completions", {"messages": hello, "model": "another-model"}),
               request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})]
    conn, response = open_stream(server, "/v1/chat/completions", {"messages": hello, "max_tokens": 2})
    answers.append((200, read_events(response)))
    conn.close()
    for status, body in answers:
        assert directory not in json.dumps(body), (status, body)
    assert answers[0][1]["data"][0]["id"] == os.path.basename(directory)
    assert answers[2][1]["model"] == os.path.basename(directory)


def test_docs_are_off_unless_asked_for(closed, runner):
    assert request(closed, "GET", "/docs")[0] == 404
    assert request(closed, "GET", "/api-doc/openapi.json")[0] == 200   # the document itself is local
    with BackgroundServer(runner, ServerConfig(docs=True)) as server:
        status, page = request(server, "GET", "/docs")
    assert status == 200 and "swagger" in page.lower()


ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # no finite value matches


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ENDLESS}}}, "grammar"),
    ({"tools": [{"type": "function", "function": {"name": "nest", "parameters": ENDLESS}}], "tool_choice": "required"},
     "tools")])
def test_an_endless_schema_is_a_400_naming_it(server, extra, param):
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Nest"}], "max_tokens": 8, **extra})
    assert status == 400, body
    assert "no finite JSON value matches this schema" in body["error"]["message"]
    assert body["error"]["param"] == param
