"""Stop strings: the per-request bound, the Aho-Corasick matcher against a brute-force search, and the output
processor's cut and hold-back with it."""

from __future__ import annotations

import random

import pytest

from mistralrs.engine.output_processor import SeqOutputState
from mistralrs.engine.request import StopConditions
from mistralrs.engine.stop_strings import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, StopStringMatcher
from mistralrs.sample import SampledToken
from tests.tiny_models import char_tokenizer


def brute_force(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(where the earliest stop string starts in `text` or None, longest suffix that is a proper prefix of one)."""
    hits = [pos for s in stops if (pos := text.find(s)) >= 0]
    held = max((size for s in stops for size in range(1, len(s)) if text.endswith(s[:size])), default=0)
    return (min(hits) if hits else None), held


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("seed", range(40))
def test_matcher_agrees_with_a_brute_force_search(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abcé"
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 8))})
    matcher = StopStringMatcher(stops)
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        state, fed, found = 0, "", None
        for chunk in random_chunks(rng, text):
            state, start = matcher.feed(state, chunk)
            if start is not None:   # stops at the first chunk that completes a stop string, as the engine does
                found = len(fed) + start
                fed += chunk
                break
            fed += chunk
            assert brute_force(fed, stops) == (None, matcher.held_back(state)), (stops, fed)
        expected_cut, _ = brute_force(fed, stops)
        assert found == expected_cut, (stops, fed)


def sampled(token_id: int) -> SampledToken:
    return SampledToken(token_id=token_id, logprob=0.0, top_logprobs=[])


def run(tokenizer, text: str, stops: tuple[str, ...], max_tokens: int = 100) -> tuple[list[str], SeqOutputState]:
    state = SeqOutputState(0, tokenizer, [], StopConditions(max_tokens=max_tokens, stop_strings=stops),
                           want_logprobs=False, skip_special_tokens=True)
    deltas = []
    for token_id in tokenizer.encode(text, add_special_tokens=False).ids:
        deltas.append(state.process(sampled(token_id)).text)
        if state.finish_reason is not None:
            break
    return deltas, state


def test_output_is_cut_where_the_earliest_stop_string_starts_and_prefixes_are_held_back():
    tokenizer = char_tokenizer()
    deltas, state = run(tokenizer, "say abXcd then more", ("cd", "bXc", "zzz"))
    assert state.text == "".join(deltas) == "say a" and state.finish_reason == "stop"
    assert deltas[:6] == ["s", "a", "y", " ", "a", ""]   # "b" may start "bXc"
    deltas, state = run(tokenizer, "no stop here", ("here!",), max_tokens=12)
    assert "".join(deltas) == state.text == "no stop here" and state.finish_reason == "length"
    assert deltas[-5:] == [" ", "", "", "", "here"]   # held while it could become "here!", released at the end


def test_stop_strings_are_bounded_by_number_and_length():
    StopConditions(max_tokens=1, stop_strings=tuple(f"{i:03d}" + "x" * (MAX_STOP_STRING_CHARS - 3)
                                                    for i in range(MAX_STOP_STRINGS)))
    with pytest.raises(ValueError, match=f"stop: at most {MAX_STOP_STRINGS}"):
        StopConditions(max_tokens=1, stop_strings=tuple(str(i) for i in range(MAX_STOP_STRINGS + 1)))
    with pytest.raises(ValueError, match=f"stop: a stop sequence may have at most {MAX_STOP_STRING_CHARS}"):
        StopConditions(max_tokens=1, stop_strings=("x" * (MAX_STOP_STRING_CHARS + 1),))
    with pytest.raises(ValueError, match="stop: stop sequences must not be empty"):
        StopConditions(max_tokens=1, stop_strings=("",))
