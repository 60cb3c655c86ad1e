"""Incremental matchers, one per kind of rule, over the text a guard has seen.

A scanner is fed the guard's window after every delta. It reports the matches
it has *confirmed* (no later text can change them) and ``hold_from``: the
earliest position where a match it has not yet decided could still start.
Text before every scanner's ``hold_from`` is safe to release. Positions are
absolute character offsets in the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import regex

from spigot.guard.automaton import Automaton
from spigot.guard.normalize import fold_char, is_word_char

# Characters kept before a scanner's position for lookbehind and word boundaries.
CONTEXT = 64


@dataclass(frozen=True, slots=True)
class Match:
    start: int
    end: int
    rule: int  # index of the rule in its rule set


@dataclass(slots=True)
class Window:
    """The part of the stream a guard still keeps: ``buf`` starts at ``base``."""

    buf: str = ""
    base: int = 0

    @property
    def seen(self) -> int:
        return self.base + len(self.buf)

    def char(self, at: int) -> str:
        return self.buf[at - self.base]

    def text(self, start: int, end: int) -> str:
        return self.buf[start - self.base : end - self.base]


class Scanner(Protocol):
    keep_from: int  # the earliest position this scanner may still read

    def scan(self, window: Window, final: bool, found: list[Match]) -> int:
        """Append newly confirmed matches to ``found``; return ``hold_from``."""
        ...


class PhraseScanner:
    """Many phrases through one automaton over folded text."""

    def __init__(
        self, automaton: Automaton, case_sensitive: bool, whole_word: tuple[bool, ...]
    ) -> None:
        self._ac = automaton
        self._case_sensitive = case_sensitive
        self._whole_word = whole_word
        self._state = 0
        self._done = 0  # next stream position to fold
        self._in_space = False
        # Stream position of each recent folded character (as many as the longest phrase).
        self._origins: deque[int] = deque(maxlen=max(automaton.depth))
        self._candidates: list[Match] = []  # whole-word matches waiting for the next character
        self.keep_from = 0

    def scan(self, window: Window, final: bool, found: list[Match]) -> int:
        ac, origins, state = self._ac, self._origins, self._state
        step, out, whole_word = ac.step, ac.out, self._whole_word
        buf, base = window.buf, window.base
        for at in range(self._done, window.seen):
            ch = buf[at - base]
            if ch.isspace():
                if self._in_space:
                    continue  # a run of whitespace folds to one space
                self._in_space = True
                folded = " "
            else:
                self._in_space = False
                folded = fold_char(ch, self._case_sensitive)
            for f in folded:
                state = step(state, f)
                origins.append(at)
                for label, length in out[state]:
                    match = Match(origins[-length], at + 1, label)
                    if whole_word[label]:
                        self._candidates.append(match)
                    else:
                        found.append(match)
        self._state = state
        self._done = window.seen

        waiting: list[Match] = []
        for match in self._candidates:
            if match.start > 0 and is_word_char(window.char(match.start - 1)):
                continue
            if match.end < window.seen:
                if not is_word_char(window.char(match.end)):
                    found.append(match)
            elif final:
                found.append(match)
            else:
                waiting.append(match)
        self._candidates = waiting

        depth = ac.depth[state]
        hold = window.seen if final or not depth else origins[-depth]
        for match in waiting:
            hold = min(hold, match.start)
        self.keep_from = hold - 1  # the character before a match decides a whole word
        return hold


class PatternScanner:
    """One regular expression with a known maximum match length, matched incrementally.

    ``regex``'s partial matching tells whether the text at the end of the window
    could still become a match; only that text is held back.
    """

    def __init__(
        self,
        pattern: regex.Pattern[str],
        max_len: int,
        label: int,
        validate: Callable[[str], bool] | None = None,
    ) -> None:
        self._pattern = pattern
        self._max_len = max_len
        self._label = label
        self._validate = validate
        self._pos = 0  # no match starts before this position
        self.keep_from = 0

    def scan(self, window: Window, final: bool, found: list[Match]) -> int:
        buf, base, seen = window.buf, window.base, window.seen
        pos, hold = self._pos, seen
        while pos < seen:
            m = self._pattern.search(buf, pos - base, partial=not final)
            if m is None:
                pos = seen
                break
            start, end = m.start() + base, m.end() + base
            if m.partial:
                if seen - start >= self._max_len:
                    pos = start + 1  # would only complete longer than the declared maximum
                    continue
                hold = start
                break
            if end == start:
                pos = start + 1
                continue
            if end >= seen and not final:
                # It could still grow, or a lookahead could still fail: wait for one more char.
                hold = start
                break
            if self._validate is not None and not self._validate(m.group()):
                pos = start + 1
                continue
            found.append(Match(start, end, self._label))
            pos = end
        self._pos = min(pos, hold)
        self.keep_from = self._pos - CONTEXT
        return hold


class PluginFinder(Protocol):
    """What a plug-in rule provides: spans to act on within a window of text."""

    max_len: int

    def find(self, text: str) -> Iterable[tuple[int, int]]: ...


class PluginError(Exception):
    """A plug-in failed; the guard fails closed (blocks) on the rule ``label``."""

    def __init__(self, label: int, message: str) -> None:
        super().__init__(message)
        self.label = label


class PluginScanner:
    """A plug-in sees each position once ``max_len`` characters after it are known."""

    def __init__(self, finder: PluginFinder, max_len: int, label: int) -> None:
        self._finder = finder
        self._max_len = max_len
        self._label = label
        self._pos = 0  # matches starting before this have been decided
        self.keep_from = 0

    def scan(self, window: Window, final: bool, found: list[Match]) -> int:
        seen = window.seen
        horizon = seen if final else seen - self._max_len + 1
        if horizon > self._pos:
            start_at = max(window.base, self._pos - self._max_len)
            text = window.text(start_at, seen)
            try:
                spans = list(self._finder.find(text))
            except Exception as exc:
                raise PluginError(
                    self._label, f"plug-in raised {type(exc).__name__}: {exc}"
                ) from exc
            for span in spans:
                start, end = int(span[0]) + start_at, int(span[1]) + start_at
                if not start_at <= start < end <= seen:
                    raise PluginError(self._label, f"plug-in returned {span} outside its text")
                if self._pos <= start < horizon:
                    found.append(Match(start, end, self._label))
            self._pos = horizon
        self.keep_from = self._pos - self._max_len
        return seen if final else self._pos
