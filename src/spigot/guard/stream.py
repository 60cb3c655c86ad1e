"""A guard over one stream of text: feed deltas, get back what may be released.

The release rule: a character leaves the guard once no rule can still match
a span that contains it. Confirmed matches are then acted on in stream order:
``redact`` replaces the span with the rule's mask, ``block`` ends the stream
just before the span, ``flag`` only records. Nothing of a blocked or redacted
span is ever part of what ``feed`` or ``finish`` return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spigot.guard.scanners import Match, PluginError, Scanner, Window

if TYPE_CHECKING:
    from spigot.guard.policy import RuleSet

log = logging.getLogger("spigot.guard")

_ACTION_ORDER = {"block": 0, "redact": 1, "flag": 2}


@dataclass(frozen=True, slots=True)
class Trip:
    """A rule that matched: where, never what."""

    rule_id: str
    action: str
    start: int
    end: int


@dataclass(slots=True)
class Released:
    text: str = ""
    trips: list[Trip] = field(default_factory=list)
    blocked: Trip | None = None
    held: int = 0  # characters seen but not yet released


class TextGuard:
    def __init__(self, ruleset: RuleSet) -> None:
        self._rules = ruleset.rules
        self._scanners: list[Scanner] = ruleset.new_scanners()
        self._window = Window()
        self._released = 0  # stream position up to which output is decided
        self._pending: list[Match] = []  # confirmed, not yet acted on
        self.blocked: Trip | None = None
        self.finished = False

    @property
    def held(self) -> int:
        return self._window.seen - self._released if self.blocked is None else 0

    def feed(self, text: str) -> Released:
        if self.blocked is not None or self.finished:
            return Released(blocked=self.blocked)
        self._window.buf += text
        return self._step(final=False)

    def finish(self) -> Released:
        """The stream ended: decide everything still held."""
        if self.blocked is not None or self.finished:
            return Released(blocked=self.blocked)
        self.finished = True
        return self._step(final=True)

    def check(self, text: str) -> Released:
        """A whole text at once (a prompt, a finished reply)."""
        first = self.feed(text)
        if first.blocked is not None:
            return first
        last = self.finish()
        return Released(first.text + last.text, first.trips + last.trips, last.blocked, 0)

    def _step(self, final: bool) -> Released:
        window = self._window
        found = self._pending
        limit = window.seen
        for scanner in list(self._scanners):
            try:
                limit = min(limit, scanner.scan(window, final, found))
            except PluginError as exc:
                rule = self._rules[exc.label]
                if rule.action == "flag":  # it could only have recorded: go on without it
                    log.error("guard rule %s failed, dropped for this stream: %s", rule.id, exc)
                    self._scanners.remove(scanner)
                    continue
                # Fail closed: a rule that cannot decide must not let text through.
                log.error("guard rule %s failed, blocking: %s", rule.id, exc)
                self.blocked = Trip(rule.id, "block", self._released, window.seen)
                self._pending = []
                return Released("", [self.blocked], self.blocked, 0)
        found.sort(key=lambda m: (m.start, _ACTION_ORDER[self._rules[m.rule].action], -m.end))

        out: list[str] = []
        trips: list[Trip] = []
        released = self._released
        decided = 0
        for match in found:
            if match.start >= limit:
                break
            decided += 1
            rule = self._rules[match.rule]
            trip = Trip(rule.id, rule.action, match.start, match.end)
            trips.append(trip)
            if rule.action == "flag":
                continue
            start = max(match.start, released)
            if start > released:
                out.append(window.text(released, start))
                released = start
            if rule.action == "block":
                self.blocked = trip
                self._pending = []
                self._released = released
                return Released("".join(out), trips, trip, 0)
            if match.end > released:  # not already inside an earlier mask
                out.append(rule.mask)
                released = match.end
        del found[:decided]
        if limit > released:
            out.append(window.text(released, limit))
            released = limit
        self._released = released

        keep = min([released, *(s.keep_from for s in self._scanners)])
        if keep > window.base:
            window.buf = window.buf[keep - window.base :]
            window.base = keep
        return Released("".join(out), trips, None, window.seen - released)
