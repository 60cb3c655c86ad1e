"""A tiny progress bar on stderr, so stdout stays clean for the results table.

On a terminal the bar is redrawn in place (at most ten times a second); when
stderr is a pipe or a file, only one line per finished level is written, so
logs do not fill with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24
_REDRAW_S = 0.1


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._label = ""
        self._total: int | None = None
        self._duration: float | None = None
        self._done = 0
        self._errors = 0
        self._started = 0.0
        self._drawn = 0.0

    def start(self, label: str, total: int | None = None, duration: float | None = None) -> None:
        """A level begins: ``total`` requests, or as many as fit in ``duration`` seconds."""
        self._label, self._total, self._duration = label, total, duration
        self._done = self._errors = 0
        self._started = time.perf_counter()
        self._drawn = 0.0
        self._draw(force=True)

    def advance(self, ok: bool) -> None:
        self._done += 1
        self._errors += 0 if ok else 1
        self._draw()

    def finish(self, summary: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._started
        line = (
            f"{self._label}: {self._done} requests, {self._errors} errors, {elapsed:.1f} s"
            f" - {summary}"
        )
        prefix = "\r\x1b[2K" if self.live else ""
        self.stream.write(f"{prefix}{line}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        prefix = "\r\x1b[2K" if self.live else ""
        self.stream.write(f"{prefix}{message}\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < _REDRAW_S:
            return
        self._drawn = now
        elapsed = now - self._started
        if self._total:
            fraction = self._done / self._total
            count = f"{self._done}/{self._total}"
        elif self._duration:
            fraction = elapsed / self._duration
            count = f"{self._done} req"
        else:
            fraction, count = 0.0, f"{self._done} req"
        filled = round(_WIDTH * min(fraction, 1.0))
        bar = "#" * filled + "." * (_WIDTH - filled)
        self.stream.write(
            f"\r\x1b[2K{self._label} [{bar}] {count} {self._errors} err {elapsed:.1f} s"
        )
        self.stream.flush()
