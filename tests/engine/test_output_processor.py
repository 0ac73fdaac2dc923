"""Stop strings while streaming: text that may be the start of a stop string is held back until it is known."""

from __future__ import annotations

import pytest

from mistralrs.engine.output_processor import SeqOutputState
from mistralrs.engine.request import StopConditions
from mistralrs.sample import SampledToken
from tests.tiny_models import char_tokenizer


def stream(text: str, stop_strings: tuple[str, ...], max_tokens: int = 100) -> tuple[list[str], SeqOutputState]:
    """Feed `text` one character token at a time; the streamed deltas (until the sequence finishes) and the state."""
    tokenizer = char_tokenizer()
    state = SeqOutputState(0, tokenizer, [], StopConditions(max_tokens=max_tokens, stop_strings=stop_strings),
                           want_logprobs=False, skip_special_tokens=True)
    deltas = []
    for ch in text:
        delta = state.process(SampledToken(tokenizer.token_to_id(ch), 0.0))
        deltas.append(delta.text)
        if delta.finish_reason is not None:
            break
    return deltas, state


def test_partial_stop_string_is_never_streamed():
    deltas, state = stream("Hello ENDworld", ("END",))
    assert deltas == ["H", "e", "l", "l", "o", " ", "", "", ""]
    assert "".join(deltas) == state.result().text == "Hello "
    assert state.finish_reason == "stop"


def test_held_text_is_released_when_the_match_breaks():
    deltas, state = stream("an ENought", ("END", "ought"))   # "o" may start the second one: still held
    assert deltas == ["a", "n", " ", "", "", "EN", "", "", "", ""]
    assert "".join(deltas) == state.result().text == "an EN"
    assert state.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens,finish_reason", [(4, "length"), (100, None)])
def test_held_text_comes_out_when_the_sequence_ends_without_a_stop(max_tokens, finish_reason):
    deltas, state = stream("x EN", ("END",), max_tokens=max_tokens)
    assert state.finish_reason == finish_reason
    assert "".join(deltas) == ("x EN" if finish_reason == "length" else "x ")
