"""Guard any OpenAI-style stream of chunks, including streams spigot did not generate.

``guard_stream`` / ``aguard_stream`` wrap an iterator of chat or legacy
completion chunks (the openai SDK's objects, plain dicts from JSON, or the
0.28 SDK's dict-like objects) and yield chunks of the same type with every
choice's text passed through the policy's output rules. Chunks whose text is
all held back are skipped; the held text comes out in a later chunk, at the
latest in the one that carries ``finish_reason``. A blocked choice ends with
``finish_reason: "content_filter"`` and nothing more of it is yielded.

Token logprobs are removed from guarded chunks: their token strings would
carry the text the guard holds back.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

from spigot.guard.policy import Policy
from spigot.guard.stream import TextGuard, Trip

C = TypeVar("C")
TripCallback = Callable[[int, Trip], None]


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _set(obj: Any, key: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _clone(chunk: C) -> C:
    model_copy = getattr(chunk, "model_copy", None)
    if callable(model_copy):
        copied: C = model_copy(deep=True)  # a pydantic model's copy is of its own class
        return copied
    return copy.deepcopy(chunk)


class ChunkGuard:
    """The per-stream state: one text guard per choice index."""

    def __init__(
        self, policy: Policy, on_trip: TripCallback | None = None, choices: int = 1
    ) -> None:
        self._rules = policy.output
        self._choices = choices
        self._guards: dict[int, TextGuard] = {}
        self._on_trip = on_trip
        self._template: dict[int, Any] = {}  # a recent chunk per choice, to flush into

    def _guard(self, index: int) -> TextGuard:
        guard = self._guards.get(index)
        if guard is None:
            guard = self._guards[index] = self._rules.guard()
        return guard

    @property
    def all_blocked(self) -> bool:
        """Every choice is blocked (or has ended and one is blocked): nothing more will pass."""
        guards = self._guards.values()
        return (
            len(self._guards) >= self._choices
            and any(g.blocked for g in guards)
            and all(g.blocked or g.finished for g in guards)
        )

    def apply(self, chunk: C) -> C | None:
        """The guarded chunk, or None when nothing of it may be sent yet."""
        choices = _get(chunk, "choices")
        if not choices:
            return chunk  # the usage chunk, or anything without text
        out = _clone(chunk)
        kept = []
        for choice in _get(out, "choices"):
            index = _get(choice, "index") or 0
            guard = self._guard(index)
            if guard.blocked is not None or guard.finished:
                continue
            self._template[index] = chunk
            if self._guard_choice(index, guard, choice):
                kept.append(choice)
        if not kept:
            return None
        _set(out, "choices", kept)
        return out

    def _guard_choice(self, index: int, guard: TextGuard, choice: Any) -> bool:
        delta = _get(choice, "delta")
        holder, key = (delta, "content") if delta is not None else (choice, "text")
        text = _get(holder, key)
        reason = _get(choice, "finish_reason")
        if _get(choice, "logprobs") is not None:
            _set(choice, "logprobs", None)
        released = guard.feed(text) if text else None
        out = released.text if released is not None else ""
        trips = list(released.trips) if released is not None else []
        blocked = released.blocked if released is not None else None
        if blocked is None and reason is not None:
            last = guard.finish()
            out += last.text
            trips += last.trips
            blocked = last.blocked
        if blocked is not None:
            reason = "content_filter"
            _set(choice, "finish_reason", reason)
        for trip in trips:
            if self._on_trip is not None:
                self._on_trip(index, trip)
        if text is not None or out:
            _set(holder, key, out)
        if reason is not None or out or not text:
            return True
        # All of its text is held back: keep it only for what it carries besides text.
        return delta is not None and any(
            _get(delta, k) is not None for k in ("role", "tool_calls", "function_call", "refusal")
        )

    def flush(self) -> Iterator[Any]:
        """The upstream ended without finishing some choice: decide what it held."""
        for index, guard in self._guards.items():
            if guard.blocked is not None or guard.finished:
                continue
            released = guard.finish()
            for trip in released.trips:
                if self._on_trip is not None:
                    self._on_trip(index, trip)
            template = self._template.get(index)
            if template is None or not (released.text or released.blocked):
                continue
            chunk = _clone(template)
            choice = next(c for c in _get(chunk, "choices") if (_get(c, "index") or 0) == index)
            delta = _get(choice, "delta")
            holder, key = (delta, "content") if delta is not None else (choice, "text")
            _set(holder, key, released.text)
            if delta is not None:
                for k in ("role", "tool_calls", "function_call"):
                    if _get(delta, k) is not None:
                        _set(delta, k, None)
            _set(choice, "finish_reason", "content_filter" if released.blocked else None)
            if _get(choice, "logprobs") is not None:
                _set(choice, "logprobs", None)
            _set(chunk, "choices", [choice])
            yield chunk


def guard_stream(
    chunks: Iterable[C],
    policy: Policy,
    *,
    on_trip: TripCallback | None = None,
    close_on_block: bool = False,
    choices: int = 1,
) -> Iterator[C]:
    """Yield ``chunks`` guarded by ``policy``'s output rules.

    With ``close_on_block`` the upstream is closed once a choice is blocked and
    every other of the request's ``choices`` (its ``n``) has ended, stopping a
    hosted model from generating more; otherwise it is read to its end so that
    its usage chunk still arrives.
    """
    guard = ChunkGuard(policy, on_trip, choices)
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            guarded = guard.apply(chunk)
            if guarded is not None:
                yield guarded
            if close_on_block and guard.all_blocked:
                return
        yield from guard.flush()
    finally:
        close = getattr(chunks, "close", None) or getattr(iterator, "close", None)
        if close_on_block and callable(close):
            close()


async def aguard_stream(
    chunks: AsyncIterable[C],
    policy: Policy,
    *,
    on_trip: TripCallback | None = None,
    close_on_block: bool = False,
    choices: int = 1,
) -> AsyncIterator[C]:
    """The asynchronous ``guard_stream``."""
    guard = ChunkGuard(policy, on_trip, choices)
    try:
        async for chunk in chunks:
            guarded = guard.apply(chunk)
            if guarded is not None:
                yield guarded
            if close_on_block and guard.all_blocked:
                return
        for chunk in guard.flush():
            yield chunk
    finally:
        close = getattr(chunks, "close", None) or getattr(chunks, "aclose", None)
        if close_on_block and callable(close):
            result = close()
            if hasattr(result, "__await__"):
                await result
