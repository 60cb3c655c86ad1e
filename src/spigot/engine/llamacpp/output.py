"""Turning generated tokens into text deltas that are safe to send.

Two problems, one class each:

* ``Utf8Assembler``: token pieces are bytes, and a character may be split
  across tokens. Incomplete trailing bytes are held until the character is
  whole, so a delta never carries U+FFFD for a split character.
* ``StopMatcher``: a stop string may arrive across several deltas. Any tail of
  the text that could still grow into a stop string is held back, so not even
  part of a stop string is ever released.

``TextAssembler`` chains them for one sequence.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


class Utf8Assembler:
    """Bytes in, whole characters out."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        # Bytes that can never become valid UTF-8 (a model can emit them) still
        # come out as U+FFFD; incomplete sequences are held, never replaced.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


@dataclass(frozen=True, slots=True)
class StopResult:
    text: str  # safe to release now
    stopped: bool  # a stop string was found; nothing after it is released


class StopMatcher:
    """Finds stop strings in a stream of text without releasing any part of one."""

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> StopResult:
        if not self._stops:
            return StopResult(text, False)
        pending = self._pending + text
        # Everything released so far could not have been the start of a stop
        # string, so a match can only begin inside ``pending``.
        cut = -1
        for stop in self._stops:
            at = pending.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self._pending = ""
            return StopResult(pending[:cut], True)
        hold = self._held_tail_length(pending)
        self._pending = pending[len(pending) - hold :]
        return StopResult(pending[: len(pending) - hold], False)

    def flush(self) -> str:
        """The sequence ended without a stop string: release what was held."""
        pending, self._pending = self._pending, ""
        return pending

    def _held_tail_length(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - k :]):
                    longest = k
                    break
        return longest


class TextAssembler:
    """Token pieces in, releasable text out, for one sequence."""

    __slots__ = ("_stop", "_utf8")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._utf8 = Utf8Assembler()
        self._stop = StopMatcher(stops)

    def push(self, piece: bytes) -> StopResult:
        return self._stop.push(self._utf8.push(piece))

    def finish(self) -> StopResult:
        """Release everything held once the sequence ended for another reason."""
        tail = self._stop.push(self._utf8.flush())
        if tail.stopped:
            return tail
        return StopResult(tail.text + self._stop.flush(), False)
