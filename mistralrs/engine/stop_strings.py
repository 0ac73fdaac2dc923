"""Stop strings: a bound per request, and an Aho-Corasick automaton that finds them in streamed text.

The engine thread checks every generated character of every sequence against its request's stop strings, so that
work must not grow with what a client sends: a request has at most `MAX_STOP_STRINGS` of at most
`MAX_STOP_STRING_CHARS` characters each (the OpenAI API allows 4), and the automaton, built once per request on the
caller's thread, advances over a character in amortized constant time, whatever the number of strings. Each
sequence keeps only its state (an int): the longest suffix of its text that is a prefix of some stop string, which
is also how much text must be held back from the stream while the next tokens may complete a stop string.
"""

from __future__ import annotations

import collections

MAX_STOP_STRINGS = 32          # most stop strings of one request
MAX_STOP_STRING_CHARS = 256    # most characters of one stop string


def check_stop_strings(stop_strings) -> None:
    """ValueError naming `stop` when a request has more or longer stop strings than the documented bound."""
    if len(stop_strings) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stop_strings)}")
    longest = max((len(s) for s in stop_strings), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise ValueError(f"stop: a stop sequence may have at most {MAX_STOP_STRING_CHARS} characters, got one "
                         f"of {longest}")


class StopStringMatcher:
    """Aho-Corasick automaton over one request's stop strings; immutable, shared by the request's sequences.

    State 0 is the empty match; `feed(state, text)` returns the state after `text` and where the earliest stop
    string completed in `text` starts; `held_back(state)` is the length of the text's suffix that may still
    become a stop string.
    """

    def __init__(self, stop_strings: tuple[str, ...]) -> None:
        self.stop_strings = stop_strings
        self._goto: list[dict[str, int]] = [{}]   # trie edges: state -> {character: next state}
        self._depth: list[int] = [0]               # length of the prefix a state stands for
        self._fail: list[int] = [0]                # longest proper suffix of the state's prefix that is a state
        self._match: list[int] = [0]               # longest stop string ending at this state (0: none)
        for stop in stop_strings:
            self._insert(stop)
        self._link()

    def _insert(self, stop: str) -> None:
        state = 0
        for char in stop:
            child = self._goto[state].get(char)
            if child is None:
                child = len(self._goto)
                self._goto[state][char] = child
                self._goto.append({})
                self._depth.append(self._depth[state] + 1)
                self._fail.append(0)
                self._match.append(0)
            state = child
        self._match[state] = len(stop)

    def _link(self) -> None:
        """Failure links breadth first; a state's match is its own stop string, else its failure state's."""
        queue = collections.deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self._goto[state].items():
                queue.append(child)
                fallback = self._fail[state]
                while fallback and char not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                target = self._goto[fallback].get(char, 0)
                self._fail[child] = target if target != child else 0
                if not self._match[child]:
                    self._match[child] = self._match[self._fail[child]]

    def feed(self, state: int, text: str) -> tuple[int, int | None]:
        """Advance from `state` over `text`; return the new state and the start (an index into `text`, negative
        when the stop string began in earlier text) of the earliest-starting stop string that ends in `text`."""
        goto, fail, match = self._goto, self._fail, self._match
        earliest = None
        for index, char in enumerate(text):
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            if match[state]:
                start = index + 1 - match[state]
                earliest = start if earliest is None else min(earliest, start)
        return state, earliest

    def held_back(self, state: int) -> int:
        """Characters at the end of the text fed so far that are a proper prefix of some stop string."""
        return self._depth[state]
