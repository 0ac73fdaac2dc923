"""Fixtures of the HTTP server tests: one tiny random model, a Runner over it, the real server on a local port."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import openai
import pytest

from mistralrs import ModelDType, Runner, Which
from mistralrs.server import BackgroundServer, ServerConfig
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS, make_tiny_model_dir

# Bans the special tokens (EOS included), so that the random model generates exactly max_tokens tokens.
NO_EOS = {str(i): -100.0 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))}
MAX_BODY_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, make_tiny_model_dir(path, "llama")


def make_runner(path: Path, **kwargs) -> Runner:
    return Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32), **kwargs)


@pytest.fixture(scope="session")
def runner(tiny_model):
    runner = make_runner(tiny_model[0])
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def server(runner):
    with BackgroundServer(runner, ServerConfig(max_body_bytes=MAX_BODY_BYTES, admin_without_key=True)) as server:
        yield server


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def request(server, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict | str]:
    """One plain HTTP request (the openai client cannot send malformed bodies); returns (status, JSON or text)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read().decode()
    finally:
        conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def open_stream(server, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a streaming request and return once the response headers arrived (nothing of the body read)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def read_events(response: http.client.HTTPResponse, limit: int | None = None) -> list[str]:
    """The `data:` payloads of a server-sent event stream (up to `limit` of them)."""
    events = []
    while limit is None or len(events) < limit:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append(line[len(b"data: "):].decode().strip())
            if events[-1] == "[DONE]":
                break
    return events


def engine_is_idle(runner: Runner) -> bool:
    """No sequence waiting or running, and every KV block free (cached prefixes count as free)."""
    scheduler = runner.llm_engine._engine.scheduler
    manager = scheduler.kv_cache_manager
    return not scheduler.has_unfinished() and manager.num_free_blocks == manager.pool.num_blocks


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
