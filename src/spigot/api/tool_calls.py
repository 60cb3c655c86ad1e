"""Tool calls parsed out of a choice's streamed text (an ``OutputStage``).

The model writes calls as text (``spigot.api.tools``: ``<tool_call>\\n{"name":"f",
"arguments":{...}}\\n</tool_call>``); this stage turns them into ``ToolCallDelta``s
as the text streams, one parser per choice. What it holds back, and why:

* text that could still be the start of ``<tool_call>`` (at most its length less
  one): released as content as soon as it cannot;
* a call's head, until its name is whole (bounded: the name is at most 64
  characters and each run of whitespace in the head at most ``MAX_SPACE``). The
  first delta of the call then has its id and name; every later one a fragment of
  the arguments, released as it arrives. The arguments are the JSON value of
  ``"arguments"`` exactly as written: a string-aware scan of the value knows where
  it ends, so nothing inside it is held;
* what follows a call (``}``, whitespace, ``</tool_call>``, whitespace before the
  next call): markup, dropped once it is complete; whitespace after a call waits
  (at most ``MAX_SPACE``) to see whether another call follows.

At the end, a call whose head was still possible (cut by ``max_tokens``) is
dropped where a grammar was enforced: it was a call, with no name yet.

Where the grammar was enforced (a local engine: ``stream_arguments``) the text
is a valid call by construction. Where it was not (an engine elsewhere), a
call is held whole until ``</tool_call>`` and parsed: one that is not a JSON
object naming a declared function with object arguments is released as
content, tags and all, never lost. Either way a head that goes wrong falls back
to text the same way.

Every decision depends only on the text up to the character it is made at, and
the end, never on how the text was cut into outputs: the same text gives the
same content and calls one character at a time or all at once (a unit test
checks). Logprobs and an engine elsewhere's extra fields are held with the
text they came with and go out with the next output that releases anything.
A choice that made a call and stopped finishes with ``tool_calls``.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from typing import Any, Literal

from spigot.api.tools import CLOSE, OPEN
from spigot.engine.types import FinishReason, GenOutput, TokenLogprob, ToolCallDelta

SPACE = " \t\n\r"  # JSON whitespace
MAX_SPACE = 32  # whitespace allowed in one run of a call's head or between calls
MAX_NAME = 64
MAX_BUFFERED = 1 << 16  # a call held whole (no grammar) longer than this is text
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_ID_CHARS = string.ascii_letters + string.digits

State = Literal["text", "head", "arguments", "tail", "between"]
Match = Literal["partial", "fail", "done"]

NAME = object()  # in a pattern: the function name
VALUE = object()  # in a pattern: the first character of the arguments, "{"
_HEAD = (
    SPACE, "{", SPACE, '"name"', SPACE, ":", SPACE, '"', NAME, '"',
    SPACE, ",", SPACE, '"arguments"', SPACE, ":", SPACE, VALUE,
)  # fmt: skip
_TAIL = (SPACE, "}", SPACE, CLOSE)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def match(pattern: tuple[object, ...], text: str) -> tuple[Match, str, int]:
    """How far ``text`` follows ``pattern``: (state, name, end of the match)."""
    pos, name = 0, ""
    for item in pattern:
        if item is SPACE:
            start = pos
            while pos < len(text) and text[pos] in SPACE:
                pos += 1
            if pos - start > MAX_SPACE:
                return "fail", name, pos
        elif item is NAME:
            start = pos
            while pos < len(text) and text[pos] in _NAME_CHARS:
                pos += 1
            name = text[start:pos]
            if len(name) > MAX_NAME:
                return "fail", name, pos
            if pos == len(text):
                return "partial", name, pos
            if not name:
                return "fail", name, pos
        elif item is VALUE:
            if pos == len(text):
                return "partial", name, pos
            return ("done" if text[pos] == "{" else "fail"), name, pos
        else:
            assert isinstance(item, str)
            rest = text[pos : pos + len(item)]
            if rest != item:
                return ("partial" if item.startswith(rest) and pos + len(rest) == len(text)
                        else "fail"), name, pos  # fmt: skip
            pos += len(item)
    return "done", name, pos


def _opening_tail(text: str) -> int:
    """Length of the longest end of ``text`` that could grow into ``OPEN``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


class ChoiceParser:
    """One choice's text in, (content, call deltas) out; see the module docstring."""

    def __init__(self, names: frozenset[str], *, stream_arguments: bool) -> None:
        self._names = names
        self._stream_arguments = stream_arguments
        self._state: State = "text"
        self._buf = ""  # undecided text
        self.calls = 0  # calls begun (their first delta sent)
        # The value of "arguments" being scanned: nesting depth, inside a string, escaped.
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._gap = ""  # whitespace between a call and the next opening tag
        self._text: list[str] = []
        self._deltas: list[ToolCallDelta] = []

    def feed(self, text: str, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        while self._step(final):
            pass
        if final:
            self._end()
        out, deltas = "".join(self._text), self._deltas
        self._text, self._deltas = [], []
        return out, deltas

    def _release(self, text: str) -> None:
        if text:
            self._text.append(text)

    def _step(self, final: bool) -> bool:
        """Decide what can be decided at the start of the buffer; True to go on."""
        buf = self._buf
        if not buf:
            return False
        if self._state == "text":
            at = buf.find(OPEN)
            if at >= 0:
                self._release(buf[:at])
                self._buf = buf[at + len(OPEN) :]
                self._state = "head"
                return True
            keep = 0 if final else _opening_tail(buf)
            self._release(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        if self._state == "head":
            return self._head(final) if self._stream_arguments else self._whole_call(final)
        if self._state == "arguments":
            return self._arguments()
        if self._state == "tail":
            state, _, end = match(_TAIL, buf)
            if state == "partial":
                return False
            # Done: markup, dropped. Failed: the call is whole anyway, the rest is text.
            self._buf = buf[end:] if state == "done" else buf
            self._state = "between" if state == "done" else "text"
            return True
        # Between calls: whitespace waits to see whether another call follows.
        space = len(buf) - len(buf.lstrip(SPACE))
        rest = buf[space : space + len(OPEN)]
        if space > MAX_SPACE or (rest and not OPEN.startswith(rest)):
            self._state = "text"
            return True
        if buf[space:].startswith(OPEN):
            self._gap = buf[:space]  # markup if a call follows, text if not
            self._buf = buf[space + len(OPEN) :]
            self._state = "head"
            return True
        return False

    def _fall_back(self) -> bool:
        """The held call is not one: its opening tag is text, and the rest is read again."""
        self._release(self._gap + OPEN)
        self._gap = ""
        self._state = "text"
        return True

    def _head(self, final: bool) -> bool:
        state, name, end = match(_HEAD, self._buf)
        if state == "partial":
            return False
        if state == "fail" or name not in self._names:
            return self._fall_back()
        self._deltas.append(ToolCallDelta(self.calls, new_call_id(), name, ""))
        self.calls += 1
        self._gap = ""
        self._buf = self._buf[end:]
        self._state = "arguments"
        self._depth, self._in_string, self._escaped = 0, False, False
        return True

    def _arguments(self) -> bool:
        buf = self._buf
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        end = len(buf)
        for i, ch in enumerate(buf):
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        self._deltas.append(ToolCallDelta(self.calls - 1, arguments=buf[:end]))
        self._buf = buf[end:]
        if depth == 0:
            self._state = "tail"
            return True
        return False

    def _whole_call(self, final: bool) -> bool:
        """No grammar: the call is held until it closes, then checked."""
        # Searched within the bound only, so that where the text was cut cannot matter.
        close = self._buf.find(CLOSE, 0, MAX_BUFFERED)
        if close < 0:
            if len(self._buf) >= MAX_BUFFERED:
                return self._fall_back()
            return False
        call = _parse_call(self._buf[:close], self._names)
        if call is None:
            return self._fall_back()
        name, arguments = call
        self._gap = ""
        self._deltas.append(ToolCallDelta(self.calls, new_call_id(), name, ""))
        self._deltas.append(ToolCallDelta(self.calls, arguments=arguments))
        self.calls += 1
        self._buf = self._buf[close + len(CLOSE) :]
        self._state = "between"
        return True

    def _end(self) -> None:
        """The last output: what is still held is decided as it stands. Arguments cut
        short (``length``, a stop string) were sent as they are."""
        while True:
            while self._step(True):
                pass
            if not self._buf:
                return
            if self._state == "head" and self._stream_arguments:
                # Still a possible head under an enforced grammar: a call cut short
                # (``length``) before its name was whole. Markup, like a cut tag.
                self._buf = self._gap = ""
            elif self._state == "head":
                self._fall_back()  # no grammar: a call never closed is text
            elif self._state == "between" and not OPEN.startswith(self._buf.lstrip(SPACE)):
                self._state = "text"
            else:
                # Markup and whitespace after a call, or the next call's tag cut short.
                self._buf = ""


def _parse_call(text: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, compact arguments) of a call's JSON, or None if it is not a call."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    name, arguments = value["name"], value["arguments"]
    if name not in names or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class ToolCallStage:
    """The request's ``OutputStage``: one ``ChoiceParser`` per choice."""

    def __init__(self, choices: int, names: frozenset[str], *, stream_arguments: bool) -> None:
        self._parsers = [
            ChoiceParser(names, stream_arguments=stream_arguments) for _ in range(choices)
        ]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        self._chunk_extra: list[dict[str, Any]] = [{} for _ in range(choices)]
        self._delta_extra: list[dict[str, Any]] = [{} for _ in range(choices)]
        # Argument fragments read in the same output as their call's name: sent with
        # the next output, so that a call's first delta has "arguments": "" as OpenAI's.
        self._deferred: list[list[ToolCallDelta]] = [[] for _ in range(choices)]

    def apply(self, output: GenOutput) -> GenOutput | None:
        i = output.choice_index
        parser = self._parsers[i]
        text, deltas = parser.feed(output.text, final=output.finished)
        self._logprobs[i].extend(output.logprobs)
        _merge(self._chunk_extra[i], output.chunk_extra)
        _merge(self._delta_extra[i], output.delta_extra)
        calls = [*self._deferred[i], *output.tool_calls, *deltas]
        self._deferred[i] = []
        if not output.finished and any(d.name is not None for d in deltas):
            named = {d.index for d in deltas if d.name is not None}
            self._deferred[i] = [d for d in calls if d.name is None and d.index in named]
            calls = [d for d in calls if d.name is not None or d.index not in named]
        finish = output.finish_reason
        if finish is FinishReason.STOP and parser.calls:
            finish = FinishReason.TOOL_CALLS
        if not (text or calls or output.finished or self._delta_extra[i]):
            return None
        released = GenOutput(
            i,
            text,
            self._logprobs[i],
            finish,
            output.usage,
            output.error,
            self._chunk_extra[i] or None,
            self._delta_extra[i] or None,
            calls,
        )
        self._logprobs[i], self._chunk_extra[i], self._delta_extra[i] = [], {}, {}
        return released


def _merge(into: dict[str, Any], extra: Mapping[str, Any] | None) -> None:
    for name, value in (extra or {}).items():
        into.setdefault(name, value)
