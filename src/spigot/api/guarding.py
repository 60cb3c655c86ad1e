"""Guardrails in the request path: prompts checked before generation, replies as they stream.

Input rules run over each prompt text before it is tokenized: ``block``
refuses the request (400, code ``content_filter``), ``redact`` rewrites the
text the model sees. Output rules get one ``TextGuard`` per choice between
the engine and the wire: a blocked choice is cut where the match starts,
ends with ``finish_reason: "content_filter"`` and stops generating at once.
Trips are logged and counted by rule id and action, never with the text.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from spigot.engine.protocol import OutputStream
from spigot.engine.types import FinishReason, GenOutput
from spigot.errors import ContentFiltered, InvalidRequest
from spigot.guard import Policy, Released, TextGuard, Trip

log = logging.getLogger("spigot.guard")


@dataclass
class GuardCounters:
    """Trips since start-up, by (direction, rule id, action): shown on /health."""

    trips: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def count(self, request_id: str, direction: str, trips: list[Trip]) -> None:
        for trip in trips:
            self.trips[(direction, trip.rule_id, trip.action)] += 1
            log.info(
                "%s guard %s rule=%s action=%s", request_id, direction, trip.rule_id, trip.action
            )

    def snapshot(self) -> list[dict[str, object]]:
        return [
            {"direction": d, "rule": r, "action": a, "count": n}
            for (d, r, a), n in sorted(self.trips.items())
        ]


def guard_inputs(
    policy: Policy | None,
    counters: GuardCounters,
    request_id: str,
    texts: list[str],
    *,
    param: str,
) -> list[str]:
    """The prompt texts as the model may see them; raises ContentFiltered on a block."""
    if policy is None or not policy.input:
        return texts
    checked: list[str] = []
    for text in texts:
        result = policy.input.guard().check(text)
        counters.count(request_id, "input", result.trips)
        if result.blocked is not None:
            raise ContentFiltered(
                "Your request was rejected by this server's content policy "
                f"(rule '{result.blocked.rule_id}').",
                param=param,
            )
        checked.append(result.text)
    return checked


def guard_messages(
    policy: Policy | None,
    counters: GuardCounters,
    request_id: str,
    messages: list[dict[str, Any]],
    *,
    param: str,
) -> None:
    """Input rules over every text of a conversation the model will read, rewritten in
    place: each message's content and the arguments of earlier tool calls (a tool
    call in the history can carry what a rule blocks as well as any content)."""
    if policy is None or not policy.input:
        return
    texts: list[str] = []
    for message in messages:
        texts.append(message["content"])
        texts += [call["function"]["arguments"] for call in message.get("tool_calls") or ()]
    checked = iter(guard_inputs(policy, counters, request_id, texts, param=param))
    for message in messages:
        message["content"] = next(checked)
        for call in message.get("tool_calls") or ():
            call["function"]["arguments"] = next(checked)


def check_logprobs(policy: Policy | None, requested: bool, *, param: str) -> None:
    """Token logprobs would carry the text an output guard holds back or redacts."""
    if requested and policy is not None and policy.output:
        raise InvalidRequest(
            f"'{param}' is not available on this server: its output guard may hold back or "
            "redact text, and token logprobs would reveal it.",
            param=param,
        )


def output_guard(
    policy: Policy | None,
    counters: GuardCounters,
    request_id: str,
    stream: OutputStream,
    choices: int,
) -> OutputGuard | None:
    if policy is None or not policy.output:
        return None
    return OutputGuard(policy, counters, request_id, stream, choices)


class OutputGuard:
    """One text guard per choice of one request, between the engine and the client."""

    def __init__(
        self,
        policy: Policy,
        counters: GuardCounters,
        request_id: str,
        stream: OutputStream,
        choices: int,
    ) -> None:
        self._guards: list[TextGuard] = [policy.output.guard() for _ in range(choices)]
        self._counters = counters
        self._request_id = request_id
        self._stream = stream

    def apply(self, output: GenOutput) -> GenOutput | None:
        """What of ``output`` may reach the client; None when nothing of it may."""
        guard = self._guards[output.choice_index]
        if guard.blocked is not None or output.finish_reason in (
            FinishReason.ABORT,
            FinishReason.ERROR,
        ):
            return None  # a blocked choice's remains, or an ending the caller handles
        released = guard.feed(output.text) if output.text else Released()
        if released.blocked is None and output.finished:
            last = guard.finish()
            released = Released(
                released.text + last.text, released.trips + last.trips, last.blocked
            )
        self._counters.count(self._request_id, "output", released.trips)
        if released.blocked is not None:
            if not output.finished:
                self._stream.abort_choice(output.choice_index)
            return GenOutput(
                output.choice_index, released.text, finish_reason=FinishReason.CONTENT_FILTER
            )
        return GenOutput(output.choice_index, released.text, [], output.finish_reason, output.usage)
