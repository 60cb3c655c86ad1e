"""Aho-Corasick: many literal phrases matched in one pass over the text.

Each character costs amortised O(1) whatever the number of phrases, and the
automaton's state tells how many of the last characters could still be the
start of a match: exactly what a streaming guard may hold back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class Automaton:
    """Phrases tagged with a label (the rule they belong to), compiled once, shared by streams."""

    def __init__(self, phrases: Iterable[tuple[str, int]]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        # Matches that end at a state: (label, phrase length), fail chain merged in.
        self.out: list[tuple[tuple[int, int], ...]] = [()]
        own: list[list[tuple[int, int]]] = [[]]
        for phrase, label in phrases:
            if not phrase:
                raise ValueError("an empty phrase cannot be matched")
            state = 0
            for ch in phrase:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    own.append([])
                    self.out.append(())
                state = nxt
            own[state].append((label, len(phrase)))
        self.fail = [0] * len(self.goto)
        queue: deque[int] = deque()
        for child in self.goto[0].values():
            queue.append(child)
        self.out[0] = ()
        order: list[int] = []
        while queue:
            state = queue.popleft()
            order.append(state)
            for ch, child in self.goto[state].items():
                fallback = self.fail[state]
                while fallback and ch not in self.goto[fallback]:
                    fallback = self.fail[fallback]
                target = self.goto[fallback].get(ch, 0)
                self.fail[child] = target if target != child else 0
                queue.append(child)
        for state in order:  # breadth-first: a state's fail target is already merged
            self.out[state] = tuple(own[state]) + self.out[self.fail[state]]

    def step(self, state: int, ch: str) -> int:
        goto = self.goto
        while state and ch not in goto[state]:
            state = self.fail[state]
        return goto[state].get(ch, 0)
