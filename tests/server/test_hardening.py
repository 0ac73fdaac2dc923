"""Hostile and careless clients (issue 12): cheap bounds first, bounded waits, closed doors."""

from __future__ import annotations

from tests.server.conftest import request


def test_a_prompt_that_cannot_fit_is_refused_by_its_length(server, runner):
    inputs = runner.llm_engine._inputs
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "x" * (runner.max_model_len * inputs.max_token_chars + 1), "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "characters" in body["error"]["message"]
