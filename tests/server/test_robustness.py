"""Disconnects, load, slow readers and shutdown: the engine cancels what nobody reads and keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mistralrs import CompletionRequest
from mistralrs.server import BackgroundServer, ServerConfig
from tests.server.conftest import NO_EOS, engine_is_idle, make_runner, open_stream, read_events, wait_until

LONG = dict(temperature=0, max_tokens=400, logit_bias=NO_EOS)


def spy_on_abort(monkeypatch, runner) -> list[str]:
    """Record the request ids the server aborts through the runner's front door (and still abort them)."""
    aborted: list[str] = []
    real_abort = runner.llm_engine.abort

    def abort(request_id: str) -> None:
        aborted.append(request_id)
        real_abort(request_id)

    monkeypatch.setattr(runner.llm_engine, "abort", abort)
    return aborted


def served_again(client) -> bool:
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Still there?"}],
                                           max_tokens=4, temperature=0, extra_body={"logit_bias": NO_EOS})
    return reply.usage.completion_tokens == 4


def test_disconnect_mid_stream_cancels_and_frees_the_blocks(server, runner, client, monkeypatch):
    aborted = spy_on_abort(monkeypatch, runner)
    tracker = server.app.state.mistralrs.tracker
    before = tracker.num_client_disconnects
    conn, response = open_stream(server, "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "Talk for long"}], **LONG})
    events = read_events(response, limit=3)
    assert len(events) == 3 and "[DONE]" not in events
    conn.close()
    assert wait_until(lambda: tracker.num_client_disconnects == before + 1)
    assert wait_until(lambda: aborted == [json.loads(events[0])["id"]])
    assert wait_until(lambda: engine_is_idle(runner))
    assert not tracker.active
    assert served_again(client)


@pytest.fixture(scope="module")
def slow_prefill(tiny_model):
    """A server whose runner prefills 4 tokens per step: a 400-token prompt takes 100 engine steps."""
    runner = make_runner(tiny_model[0], prompt_chunksize=4)
    with BackgroundServer(runner, ServerConfig(keep_alive_sec=0.005)) as server:
        yield server, runner
    runner.close()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_prefill_cancels(slow_prefill, stream, monkeypatch):
    server, runner = slow_prefill
    aborted = spy_on_abort(monkeypatch, runner)
    tracker = server.app.state.mistralrs.tracker
    before = tracker.num_client_disconnects
    body = {"prompt": "p" * 400, "stream": stream, **LONG}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    if stream:
        assert conn.getresponse().status == 200   # headers come at once, before any token
    else:
        assert wait_until(lambda: len(tracker.active) == 1)
    conn.close()
    assert wait_until(lambda: tracker.num_client_disconnects == before + 1)
    assert wait_until(lambda: len(aborted) == 1)
    assert wait_until(lambda: engine_is_idle(runner))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert served_again(client)


def test_keep_alive_comments_while_waiting(slow_prefill):
    server, _runner = slow_prefill
    # a prompt of its own: the cancelled requests above may have left "p" * 400 in the prefix cache
    conn, response = open_stream(server, "/v1/completions", {"prompt": "q" * 400, "max_tokens": 2})
    lines = response.read().split(b"\n\n")
    conn.close()
    assert lines[0] == b": keep-alive"   # sent during the prefill, before the first token
    assert b"data: [DONE]" in lines


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_failure_fails_only_that_request(runner, client, server, monkeypatch, stream):
    model_runner = runner.llm_engine._engine.model_runner
    real_execute = model_runner.execute
    calls = []

    def execute_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(model_runner, "execute", execute_failing_once)
    body = {"messages": [{"role": "user", "content": "Fail me"}], "max_tokens": 4}
    if stream:
        conn, response = open_stream(server, "/v1/chat/completions", body)
        events = read_events(response)
        conn.close()
        assert events[-1] == "[DONE]"
        assert "injected failure" in json.loads(events[-2])["error"]["message"]
    else:
        with pytest.raises(openai.InternalServerError, match="injected failure"):
            client.chat.completions.create(model="default", **body)
    assert wait_until(lambda: engine_is_idle(runner))
    assert served_again(client)


def test_32_concurrent_streams_complete_with_their_own_text(client, runner):
    prompts = [f"Client {i}: " + "abcdefghij"[i % 10] * (1 + i % 7) for i in range(32)]
    expected = [runner.send_completion_request(CompletionRequest(
        prompt=p, model="x", temperature=0, max_tokens=16, logit_bias=NO_EOS)).choices[0].text for p in prompts]

    def stream(prompt: str) -> tuple[str, set[str], str | None]:
        chunks = list(client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=16,
                                                stream=True, extra_body={"logit_bias": NO_EOS}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, {c.id for c in chunks}, chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = [future.result(timeout=120) for future in [pool.submit(stream, p) for p in prompts]]
    assert [text for text, _, _ in results] == expected
    assert all(len(ids) == 1 and finish == "length" for _, ids, finish in results)
    assert len({next(iter(ids)) for _, ids, _ in results}) == 32
    assert wait_until(lambda: engine_is_idle(runner))


def test_slow_reader_does_not_stall_the_others(server, client):
    body = {"prompt": "Slow reader", "temperature": 0, "max_tokens": 64, "logit_bias": NO_EOS}
    conn, response = open_stream(server, "/v1/completions", body)   # not read until the others are done
    others = [client.completions.create(model="default", prompt=f"Fast reader {i}", temperature=0, max_tokens=32,
                                        extra_body={"logit_bias": NO_EOS}) for i in range(4)]
    assert all(o.usage.completion_tokens == 32 for o in others)
    events = read_events(response)
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = client.completions.create(model="default", prompt="Slow reader", temperature=0, max_tokens=64,
                                      extra_body={"logit_bias": NO_EOS})
    assert text == whole.choices[0].text


def test_shutdown_cancels_in_flight_streams(runner, client):
    second = BackgroundServer(runner).start()
    conn, response = open_stream(second, "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "Until shutdown"}], **LONG})
    assert len(read_events(response, limit=2)) == 2
    stopper = threading.Thread(target=second.stop)
    stopper.start()
    events = read_events(response)
    conn.close()
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "canceled"
    assert wait_until(lambda: engine_is_idle(runner))
    assert served_again(client)   # the runner (and the main server) still serve
