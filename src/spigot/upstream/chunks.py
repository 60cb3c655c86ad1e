"""An upstream's streamed chunks, one sequence at a time, as ``GenOutput``s.

Upstreams differ from OpenAI and from each other; what is normalised here:

* ``role`` in every delta, or role-only deltas: they produce nothing;
* usage on every chunk, in the finishing chunk, or in a chunk of its own
  after it: the last one counts;
* the finishing chunk comes before the usage chunk: the finishing output is
  held (``take_final``) until the stream ends or the usage arrives;
* a data event that is an error object (OpenAI's ``{"error": {...}}`` or
  vLLM's ``{"object": "error", "message": ...}``): ``UpstreamEventError``;
* fields spigot does not know: the chunk's (``system_fingerprint``,
  ``service_tier``) go to ``chunk_extra``, the chat delta's
  (``reasoning_content``) or the completions choice's to ``delta_extra``, on
  the outputs that carry them; null and empty values are dropped. A chat choice's own
  unknown fields (vLLM's ``stop_reason``) have no place on the wire and are dropped.

Framing (comment pings, ``event:`` fields, CRLF, a missing ``[DONE]``) is
``spigot.sse_parser``'s; this module sees data payloads only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import orjson

from spigot.engine.types import FinishReason, GenOutput, TokenLogprob, Usage, UsageSource

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    # An upstream's own tool calls ride in ``delta_extra`` (its ``tool_calls`` deltas).
    "tool_calls": FinishReason.TOOL_CALLS,
}
CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage"})
CHAT_DELTA_FIELDS = frozenset({"role", "content"})
COMPLETION_CHOICE_FIELDS = frozenset({"index", "text", "logprobs", "finish_reason"})
# Finish details some servers add (vLLM, SGLang): not OpenAI's, and they would
# make an otherwise empty chunk.
DROPPED_CHOICE_FIELDS = frozenset({"stop_reason", "matched_stop"})


class MalformedEvent(Exception):
    """A data event that is not a JSON object."""


class UpstreamEventError(Exception):
    """A data event that is an error object; ``body`` is it in OpenAI's shape."""

    def __init__(self, message: str, body: dict[str, Any]) -> None:
        super().__init__(message)
        self.body = body

    @property
    def status(self) -> int | None:
        """The HTTP status the error names, if any (llama-server puts it in ``code``)."""
        code = self.body["error"].get("code")
        return code if isinstance(code, int) and 400 <= code < 600 else None


def error_body(message: str, *, type_: str = "upstream_error", code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def openai_error(body: Any, fallback: str) -> dict[str, Any] | None:
    """``body`` as an OpenAI error body: unchanged when it is one, wrapped when it is
    another server's error shape; None when it is no error at all."""
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping) and "choices" not in body:
        return dict(body)
    if isinstance(error, str) and "choices" not in body:
        return error_body(error)
    if body.get("object") == "error":  # vLLM's ErrorResponse
        message = body.get("message")
        return {
            "error": {
                "message": message if isinstance(message, str) else fallback,
                "type": body.get("type") or "upstream_error",
                "param": body.get("param"),
                "code": body.get("code"),
            }
        }
    return None


def error_from_response(status: int, raw: bytes) -> dict[str, Any]:
    """An upstream's HTTP error body, as the client should get it."""
    fallback = f"The upstream server answered {status}."
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    body = openai_error(parsed, fallback)
    if body is not None:
        return body
    if isinstance(parsed, Mapping) and isinstance(parsed.get("detail"), str):
        return error_body(parsed["detail"])  # FastAPI's own errors
    text = raw.decode("utf-8", errors="replace").strip()[:2000]
    return error_body(text or fallback)


def parse_usage(value: Any) -> Usage | None:
    if not isinstance(value, Mapping):
        return None
    prompt = value.get("prompt_tokens")
    completion = value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached if isinstance(cached, int) else 0,
        source=UsageSource.UPSTREAM,
    )


def chat_logprobs(value: Any) -> list[TokenLogprob]:
    """``choice.logprobs`` of a chat chunk: ``{"content": [{token, logprob, bytes,
    top_logprobs}]}``."""
    content = value.get("content") if isinstance(value, Mapping) else None
    out: list[TokenLogprob] = []
    for entry in content if isinstance(content, list) else []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("token"), str):
            continue
        top = tuple(
            (t["token"], _bytes(t.get("bytes"), t["token"]), float(t.get("logprob", 0.0)))
            for t in entry.get("top_logprobs") or ()
            if isinstance(t, Mapping) and isinstance(t.get("token"), str)
        )
        token = entry["token"]
        out.append(
            TokenLogprob(token, _bytes(entry.get("bytes"), token), _float(entry["logprob"]), top)
        )
    return out


def completion_logprobs(value: Any) -> list[TokenLogprob]:
    """``choice.logprobs`` of a completions chunk: parallel ``tokens``,
    ``token_logprobs`` and ``top_logprobs`` ({token: logprob})."""
    if not isinstance(value, Mapping):
        return []
    tokens = value.get("tokens") or []
    logprobs = value.get("token_logprobs") or []
    tops = value.get("top_logprobs") or []
    out: list[TokenLogprob] = []
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            continue
        logprob = _float(logprobs[i]) if i < len(logprobs) else 0.0
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        top = tuple(
            (t, t.encode("utf-8"), _float(lp))
            for t, lp in sorted(alternatives.items(), key=lambda kv: -_float(kv[1]))
        )
        out.append(TokenLogprob(token, token.encode("utf-8"), logprob, top))
    return out


def _bytes(value: Any, token: str) -> bytes:
    if isinstance(value, list):
        try:
            return bytes(value)
        except (TypeError, ValueError):
            pass
    return token.encode("utf-8")


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("-inf")


def _extras(fields: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any] | None:
    # Null and empty values carry nothing, and would make otherwise empty chunks.
    extra = {k: v for k, v in fields.items() if k not in known and v not in (None, "", [], {})}
    return extra or None


@functools.cache
def _unknown_finish(value: str) -> None:
    log.warning("upstream finish reason %r is not OpenAI's; sent as 'stop'", value)


def finish_reason(value: Any) -> FinishReason | None:
    if value is None:
        return None
    mapped = FINISH_REASONS.get(value) if isinstance(value, str) else None
    if mapped is None:
        _unknown_finish(str(value))
        return FinishReason.STOP
    return mapped


class ChoiceAssembler:
    """One sequence's data payloads in, its outputs out.

    ``feed`` returns the output a payload makes (None: nothing to send yet);
    the finishing output is held back until ``take_final``, after the usage.
    """

    def __init__(self, choice_index: int, *, chat: bool) -> None:
        self.choice_index = choice_index
        self.chat = chat
        self.data_events = 0
        self.content_events = 0
        self.usage: Usage | None = None
        self.finish: FinishReason | None = None
        # A usage-only chunk came after the finish: nothing more is to come.
        self.complete = False
        self._parts: list[str] = []
        self._held: GenOutput | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, payload: str) -> GenOutput | None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise MalformedEvent(f"not JSON: {payload[:200]!r}") from None
        if not isinstance(chunk, Mapping):
            raise MalformedEvent(f"not a JSON object: {payload[:200]!r}")
        error = openai_error(chunk, "The upstream server reported an error.")
        if error is not None:
            message = error["error"].get("message")
            raise UpstreamEventError(str(message or "upstream error"), error)
        self.data_events += 1
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        choice = _first_choice(choices)
        if self.finish is not None:
            if choice is None and usage is not None:
                self.complete = True
            return None
        if choice is None:
            return None
        return self._choice(chunk, choice)

    def _choice(self, chunk: Mapping[str, Any], choice: Mapping[str, Any]) -> GenOutput | None:
        if self.chat:
            delta = choice.get("delta")
            delta = delta if isinstance(delta, Mapping) else {}
            text = delta.get("content")
            delta_extra = _extras(delta, CHAT_DELTA_FIELDS)
            logprobs = chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text")
            delta_extra = _extras(choice, COMPLETION_CHOICE_FIELDS | DROPPED_CHOICE_FIELDS)
            logprobs = completion_logprobs(choice.get("logprobs"))
        text = text if isinstance(text, str) else ""
        finish = finish_reason(choice.get("finish_reason"))
        if not text and not delta_extra and not logprobs and finish is None:
            return None  # role-only, or empty
        output = GenOutput(
            self.choice_index,
            text,
            logprobs,
            chunk_extra=_extras(chunk, CHUNK_FIELDS),
            delta_extra=delta_extra,
        )
        if text:
            self._parts.append(text)
            self.content_events += 1
        if finish is not None:
            self.finish = finish
            output.finish_reason = finish
            self._held = output
            return None
        return output

    def take_final(self) -> GenOutput | None:
        """The held finishing output (its ``usage`` is the caller's to set), once."""
        held, self._held = self._held, None
        return held


def _first_choice(choices: Any) -> Mapping[str, Any] | None:
    if not isinstance(choices, list):
        return None
    entries = [c for c in choices if isinstance(c, Mapping)]
    for entry in entries:
        if entry.get("index", 0) == 0:
            return entry
    return entries[0] if entries else None
