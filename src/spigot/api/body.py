"""Reading a request body: its size, its media type, its JSON, its wire model.

The body is read with a cap (413 beyond it, before the rest is read) and then
decoded and validated off the event loop (``decode_body`` runs in the prep
pool): a large valid body costs its sender time, never other tenants'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from spigot.api.unsupported import Unsupported, refuse_unsupported
from spigot.api.validation import validation_error
from spigot.errors import InvalidRequest, RequestTooLarge

log = logging.getLogger("spigot.requests")

M = TypeVar("M", bound=BaseModel)

# Unknown parameter names are logged once each; the set is bounded so that a
# client inventing names cannot grow it.
_MAX_REMEMBERED_UNKNOWN = 256
_unknown_logged: set[str] = set()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it is known to be larger than ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than this server accepts ({max_bytes} bytes)."
    )


def decode_body(
    raw: bytes,
    model: type[M],
    *,
    max_messages: int,
    unsupported: Mapping[str, Unsupported] | None = None,
) -> M:
    """JSON to the route's wire model, with OpenAI-shaped errors. CPU work: off the loop."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise InvalidRequest(
            f"Invalid 'messages': at most {max_messages} messages are accepted, "
            f"got {len(messages)}.",
            param="messages",
        )
    if unsupported:
        refuse_unsupported(data, unsupported)
    _log_unknown(data, model, known=unsupported.keys() if unsupported else ())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _log_unknown(data: dict[str, Any], model: type[BaseModel], known: Iterable[str]) -> None:
    """Unknown parameters are accepted and ignored, as OpenAI-compatible servers do, but
    an operator can see which ones clients send."""
    for name in data.keys() - model.model_fields.keys() - set(known):
        if name in _unknown_logged or len(_unknown_logged) >= _MAX_REMEMBERED_UNKNOWN:
            continue
        _unknown_logged.add(name)
        log.info("ignoring unknown parameter %r (logged once per name)", name[:64])
