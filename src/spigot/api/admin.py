"""/admin: API keys and usage over HTTP, for admin keys; what ``spigot keys`` and ``spigot usage``
do on the database.

    GET    /admin/keys[?all=true]     list (revoked ones with all=true)
    POST   /admin/keys                create: the record plus "secret", once (201)
    GET    /admin/keys/{id_or_name}
    PATCH  /admin/keys/{id_or_name}   change what the body names; null lifts a limit
    DELETE /admin/keys/{id_or_name}   revoke
    GET    /admin/usage?key=&since=&by=

The router checks the caller itself (a live key with ``admin``), so it does not depend on how
the generation routes authenticate; admin calls are not rate-limited or billed. With metering
off there are no keys to manage: every /admin URL is a 404. The store is synchronous, so each
call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response

from spigot.api.responses import json_response
from spigot.api.state import parse_body
from spigot.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    SpigotError,
)
from spigot.metering import (
    MAX_BIGINT,
    ApiKey,
    DuplicateKeyName,
    KeyNotFound,
    Store,
    StoreError,
    StoreUnavailable,
    check_key_name,
    parse_usd,
)
from spigot.metering.durations import parse_duration, parse_instant, parse_since
from spigot.metering.records import UsageBy, utcnow
from spigot.metering.views import key_dict, usage_dict

router = APIRouter(prefix="/admin")
log = logging.getLogger(__name__)

T = TypeVar("T")

USAGE_BY: dict[str, UsageBy] = {"key": "key", "model": "model", "day": "day"}

# Limits are BIGINT columns: a larger number is a 400 naming the field, not a database error.
Count = Annotated[int, Field(ge=1, le=MAX_BIGINT)]
ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# A JSON number is a double by the time it is parsed; its shortest repr ("12.5") is what the
# client wrote, so it is read through str() and kept exact. Strings are preferred. parse_usd
# refuses what a BIGINT of pico-USD cannot hold (about USD 9.2 million).
Money = str | int | float


class _KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    budget_usd: Money | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    max_concurrent: Count | None = None
    models: Annotated[list[ModelName], Field(min_length=1)] | None = None
    expires_at: str | None = None
    expires_in: str | None = None


class KeyCreate(_KeyFields):
    name: str
    admin: bool = False


class KeyUpdate(_KeyFields):
    name: str | None = None
    admin: bool | None = None


# -- the caller ------------------------------------------------------------------------------


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A store call in a worker thread, its refusals told as API errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except KeyNotFound as exc:
        raise NotFound(f"No API key {exc.id_or_name!r}.", param="id_or_name") from None
    except DuplicateKeyName as exc:
        raise InvalidRequest(
            f"An API key named {exc.name!r} already exists.", param="name", code="duplicate_name"
        ) from None
    except ValueError as exc:
        # The store's own checks, should a value get past the ones made here: a refusal,
        # never a 500.
        raise InvalidRequest(f"Invalid request: {exc}.") from None
    except StoreUnavailable:
        raise Overloaded(
            "The key store is unavailable; try again shortly.",
            code="store_unavailable",
            retry_after=5,
        ) from None
    except StoreError:
        # The detail is for the operator's log, not for the client.
        log.exception("the metering store failed")
        raise SpigotError("The key store failed; see the server log.") from None


def _store(request: Request) -> Store:
    metering = getattr(request.app.state.spigot, "metering", None)
    if metering is None:
        # Metering off: /admin does not exist, as for any unknown URL.
        raise NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    store: Store = metering.store
    return store


def _bearer(request: Request) -> str:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise AuthenticationFailed(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    return secret


async def admin_store(request: Request) -> Store:
    """The store, once the caller has shown a live admin key: 404 with metering off, 401 for
    a missing, unknown, revoked or expired key, 403 for a key that is not admin."""
    store = _store(request)
    secret = _bearer(request)
    key = await call(store.authenticate, secret)
    if key is None:
        # Like OpenAI: the start and end of what was sent, never all of it.
        shown = f"{secret[:8]}{'*' * 4}{secret[-4:]}" if len(secret) > 12 else "****"
        raise AuthenticationFailed(f"Incorrect API key provided: {shown}.")
    if key.revoked:
        raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
    if key.expired():
        raise AuthenticationFailed("This API key has expired.", code="key_expired")
    if not key.admin:
        raise PermissionDenied("This API key may not use the admin API.", code="not_admin")
    return store


# -- bodies ----------------------------------------------------------------------------------


def _budget(value: Money | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_usd(str(value) if isinstance(value, float) else value)
    except ValueError as exc:
        raise InvalidRequest(
            f"Invalid value for 'budget_usd': {exc}.", param="budget_usd"
        ) from None


def _expiry(body: _KeyFields) -> datetime | None:
    if body.expires_at is not None and body.expires_in is not None:
        raise InvalidRequest("Give 'expires_at' or 'expires_in', not both.", param="expires_in")
    param = "expires_in" if body.expires_in is not None else "expires_at"
    try:
        if body.expires_in is not None:
            return utcnow().replace(microsecond=0) + parse_duration(body.expires_in)
        if body.expires_at is not None:
            # A moment only: a span such as "30d" belongs in expires_in.
            moment = parse_instant(body.expires_at)
            if moment <= utcnow():
                raise ValueError(f"{body.expires_at!r} is already past")
            return moment
    except ValueError as exc:
        raise InvalidRequest(f"Invalid value for '{param}': {exc}.", param=param) from None
    return None


def _limits(body: _KeyFields, given: set[str]) -> dict[str, Any]:
    """The store's keyword arguments for the fields the body named."""
    out: dict[str, Any] = {}
    if "budget_usd" in given:
        out["budget_pusd"] = _budget(body.budget_usd)
    for field in ("rpm", "tpm", "max_concurrent", "models"):
        if field in given:
            out[field] = getattr(body, field)
    if given & {"expires_at", "expires_in"}:
        out["expires_at"] = _expiry(body)
    return out


def _name(value: object) -> str:
    """The store's own name rule (names and ids share the URL's {id_or_name}), told as a 400
    naming the param rather than call()'s generic one."""
    try:
        return check_key_name(value)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid value for 'name': {exc}.", param="name") from None


def _one(key: ApiKey | None, id_or_name: str, param: str = "id_or_name") -> ApiKey:
    if key is None:
        raise NotFound(f"No API key {id_or_name!r}.", param=param)
    return key


# -- routes ----------------------------------------------------------------------------------


@router.get("/keys")
async def list_keys(request: Request) -> Response:
    store = await admin_store(request)
    include_revoked = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    found = await call(store.list_keys, include_revoked=include_revoked)
    return json_response({"object": "list", "data": [key_dict(key) for key in found]})


@router.post("/keys")
async def create_key(request: Request) -> Response:
    store = await admin_store(request)
    body = await parse_body(request, KeyCreate)
    limits = _limits(body, body.model_fields_set)
    key, secret = await call(store.create_key, _name(body.name), admin=body.admin, **limits)
    return json_response({**key_dict(key), "secret": secret}, status=201)


@router.get("/keys/{id_or_name:path}")
async def get_key(id_or_name: str, request: Request) -> Response:
    store = await admin_store(request)
    return json_response(key_dict(_one(await call(store.get_key, id_or_name), id_or_name)))


@router.patch("/keys/{id_or_name:path}")
async def update_key(id_or_name: str, request: Request) -> Response:
    store = await admin_store(request)
    body = await parse_body(request, KeyUpdate)
    given = body.model_fields_set
    changes = _limits(body, given)
    if "name" in given:
        changes["name"] = _name(body.name)
    if "admin" in given:
        if body.admin is None:
            raise InvalidRequest("'admin' must be true or false.", param="admin")
        changes["admin"] = body.admin
    key = _one(await call(store.get_key, id_or_name), id_or_name)
    # By id from here on: a rename in the same body must not change which key is meant.
    updated = await call(store.update_key, key.id, **changes)
    return json_response(key_dict(updated))


@router.delete("/keys/{id_or_name:path}")
async def revoke_key(id_or_name: str, request: Request) -> Response:
    """Revoking twice is not an error: the answer is the revoked key either way."""
    store = await admin_store(request)
    key = _one(await call(store.get_key, id_or_name), id_or_name)
    await call(store.revoke_key, key.id)
    revoked = _one(await call(store.get_key, key.id), id_or_name)
    return json_response(key_dict(revoked))


@router.get("/usage")
async def usage(request: Request) -> Response:
    store = await admin_store(request)
    params = request.query_params
    by = USAGE_BY.get(params.get("by") or "key")
    if by is None:
        raise InvalidRequest(f"'by' must be key, model or day, not {params['by']!r}.", param="by")
    since = None
    if params.get("since"):
        try:
            since = parse_since(params["since"])
        except ValueError as exc:
            raise InvalidRequest(f"Invalid value for 'since': {exc}.", param="since") from None
    key_id = None
    if params.get("key"):
        key_id = _one(await call(store.get_key, params["key"]), params["key"], "key").id
    rows = await call(store.usage, since=since, key_id=key_id, by=by)
    return json_response(usage_dict(rows, by, since))
