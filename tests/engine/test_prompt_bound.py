"""A prompt that cannot fit the context is refused by its length in characters, before it is tokenized; prompts
are tokenized by a call that releases the GIL."""

from __future__ import annotations

import pytest

from mistralrs import ChatCompletionRequest, CompletionRequest, ModelDType, Runner, Which
from tests.tiny_models import make_tiny_model_dir


class CountingTokenizer:
    """The model's tokenizer, recording the length of every prompt it encodes; prompts must not go through
    `encode`, which holds the GIL for as long as it works (seconds for a long prompt)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.encoded_lengths: list[int] = []

    def encode_batch(self, texts, *args, **kwargs):
        self.encoded_lengths.extend(len(text) for text in texts)
        return self._tokenizer.encode_batch(texts, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        raise AssertionError("a prompt was tokenized with `encode`, which holds the GIL")

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bound")
    make_tiny_model_dir(path, "llama")
    return path


def _runner(model_dir, monkeypatch, **kwargs) -> tuple[Runner, CountingTokenizer, int]:
    runner = Runner(Which.Plain(model_id=str(model_dir), dtype=ModelDType.F32), **kwargs)
    inputs = runner.llm_engine._inputs
    spy = CountingTokenizer(inputs.tokenizer)
    monkeypatch.setattr(inputs, "tokenizer", spy)
    return runner, spy, runner.max_model_len * inputs.max_token_chars


def test_too_many_characters_are_refused_untokenized(model_dir, monkeypatch):
    runner, spy, limit = _runner(model_dir, monkeypatch)
    try:
        assert runner.llm_engine._inputs.max_token_chars == len("<|endoftext|>")   # the longest vocabulary entry
        with pytest.raises(ValueError, match=rf"Prompt sequence length is greater than .*{limit + 1} characters"):
            runner.send_completion_request(CompletionRequest(prompt="x" * (limit + 1), model="m", max_tokens=1))
        with pytest.raises(ValueError, match="Prompt sequence length is greater than"):
            runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "x" * limit}], model="m", max_tokens=1))
        assert spy.encoded_lengths == []
        with pytest.raises(ValueError, match=r"prompt has \d+ tokens"):   # within the bound: tokens are counted
            runner.send_completion_request(CompletionRequest(prompt="x" * limit, model="m", max_tokens=1))
        assert spy.encoded_lengths == [limit]
        chat = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Hi"}], model="m", max_tokens=1))
        template = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert chat.usage.prompt_tokens == len(spy._tokenizer.encode(template, add_special_tokens=False).ids)
    finally:
        runner.close()


def test_truncation_tokenizes_only_a_tail_that_can_fit(model_dir, monkeypatch):
    runner, spy, limit = _runner(model_dir, monkeypatch, truncate_sequence=True)
    try:
        reply = runner.send_completion_request(CompletionRequest(prompt="ab" * (5 * limit), model="m",
                                                                 max_tokens=4, temperature=0))
        assert spy.encoded_lengths == [limit]
        assert reply.usage.prompt_tokens == runner.max_model_len - 4
    finally:
        runner.close()
