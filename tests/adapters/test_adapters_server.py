"""Adapters over HTTP: `POST /activate_adapters` and a request body's `adapters`, driven by the openai client."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from mistralrs import ModelDType, Runner, Which
from mistralrs.server import BackgroundServer, ServerConfig
from tests.adapters.adapter_fixtures import make_base_and_adapters, peft_greedy, peft_lora_model, write_ordering
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS

NO_SPECIAL = {str(i): -100.0 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS))}
PROMPT = "Which adapter?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters_server")
    base, adapters = make_base_and_adapters(root, ["a1", "a2"])
    preload = [{"name": "a2", "adapter_model_id": str(adapters)}]
    order = write_ordering(root / "ordering.json", base, order=["a1"], preload_adapters=preload)
    runner = Runner(Which.Lora(adapters_model_id=str(adapters), order=order, dtype=ModelDType.F32),
                    show_progress=False)
    prompt_ids = runner.llm_engine._inputs.completion_prompt_ids(PROMPT)
    banned = [int(i) for i in NO_SPECIAL]
    expected = {name: runner.detokenize_text(
        peft_greedy(peft_lora_model(base, adapters, [name]), prompt_ids, 4, banned), True) for name in ("a1", "a2")}
    with BackgroundServer(runner, ServerConfig(admin_without_key=True)) as server:
        yield server, expected
    runner.close()


def _post(server, path: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _complete(client: openai.OpenAI, **extra) -> str:
    result = client.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias=NO_SPECIAL, extra_body=extra or None)
    return result.choices[0].text


def test_request_adapters_and_activate_adapters(served):
    server, expected = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert expected["a1"] != expected["a2"]
    assert _complete(client) == expected["a1"]                      # the ordering file's order is active
    assert _complete(client, adapters=["a2"]) == expected["a2"]     # this request only
    assert _complete(client) == expected["a1"]
    status, text = _post(server, "/activate_adapters", {"adapter_names": ["a2"]})
    assert status == 200 and "a2" in text
    assert _complete(client) == expected["a2"]
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, extra_body={"adapters": ["a1"]})
    assert chat.choices[0].message is not None
    with pytest.raises(openai.BadRequestError, match="nope"):
        _complete(client, adapters=["nope"])
    status, text = _post(server, "/activate_adapters", {"adapter_names": ["nope"]})
    assert status == 400 and "nope" in text and "a1" in text
    _post(server, "/activate_adapters", {"adapter_names": ["a1"]})
