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
    """Many phrases through one automaton over folded text.

    A match is decided one character after it ends: combining marks that follow
    belong to it (they fold to nothing), and a whole-word match needs to see
    that the next character is not part of a word.
    """

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
        # Whether each of those folded characters is the first of its character's folding.
        self._starts_char: deque[bool] = deque(maxlen=max(automaton.depth))
        self._open: list[Match] = []  # matches that end at the last folded character
        self.keep_from = 0

    def scan(self, window: Window, final: bool, found: list[Match]) -> int:
        ac, origins, starts, state = self._ac, self._origins, self._starts_char, self._state
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
                if not folded:  # a combining mark: part of what it follows
                    self._open = [Match(m.start, at + 1, m.rule) for m in self._open]
                    continue
            if self._open:
                self._decide(window, at, found)
            last = len(folded) - 1
            for k, f in enumerate(folded):
                state = step(state, f)
                origins.append(at)
                starts.append(k == 0)
                for label, length in out[state]:
                    # A whole word neither starts nor ends inside one character's
                    # folding ("mas" is not a word of "Maß", which folds to "mass").
                    if not whole_word[label] or (k == last and starts[-length]):
                        self._open.append(Match(origins[-length], at + 1, label))
        self._state = state
        self._done = window.seen
        if final and self._open:
            self._decide(window, None, found)

        depth = ac.depth[state]
        hold = window.seen if final or not depth else origins[-depth]
        for match in self._open:
            hold = min(hold, match.start)
        self.keep_from = hold - 1  # the character before a match decides a whole word
        return hold

    def _decide(self, window: Window, next_at: int | None, found: list[Match]) -> None:
        """Settle the open matches, now that the character at ``next_at`` (or the end) is known."""
        for match in self._open:
            if self._whole_word[match.rule] and (
                (match.start > 0 and is_word_char(window.char(match.start - 1)))
                or (next_at is not None and is_word_char(window.char(next_at)))
            ):
                continue
            found.append(match)
        self._open = []


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
        pattern, max_len = self._pattern, self._max_len
        pos, hold = self._pos, seen
        while pos < seen:
            m = pattern.search(buf, pos - base, partial=not final)
            if m is None:
                pos = seen
                break
            start, end = m.start() + base, m.end() + base
            if not final and not m.partial:
                # ``regex`` prefers a complete match anywhere to an earlier partial one.
                earlier = self._earliest_partial(window, max(pos, seen - max_len), start)
                if earlier is not None:
                    pos = hold = earlier
                    break
            # One character more than max_len: a lookahead may need to see past the match.
            settled = final or seen - start > max_len
            if m.partial:
                if settled:
                    pos = start + 1  # it could only complete longer than the declared maximum
                    continue
                pos = hold = start
                break
            if end == start:
                pos = start + 1
                continue
            if not settled and (end >= seen or self._could_grow(window, start)):
                # More text could still make this a longer match, or fail a lookahead.
                pos = hold = start
                break
            if self._validate is not None and not self._validate(m.group()):
                pos = start + 1
                continue
            found.append(Match(start, end, self._label))
            pos = end
        self._pos = min(pos, hold)
        self.keep_from = self._pos - CONTEXT
        return hold

    def _earliest_partial(self, window: Window, lo: int, hi: int) -> int | None:
        """The first position in [lo, hi) where the text so far is the start of a match."""
        match, buf, base = self._pattern.match, window.buf, window.base
        for at in range(max(lo, base), hi):
            m = match(buf, at - base, partial=True)
            if m is not None and m.partial:
                return at
        return None

    def _could_grow(self, window: Window, start: int) -> bool:
        """Whether the text from ``start`` to the end could still begin a (longer) match."""
        return self._pattern.fullmatch(window.buf, start - window.base, partial=True) is not None


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
