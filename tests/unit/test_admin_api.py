"""/admin over HTTP: only the admin router and the app's error handlers, on a real store (SQLite
file and PostgreSQL), driven in-process through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.exceptions import HTTPException

from spigot.api import admin
from spigot.api.app import RequestIdMiddleware, _http_error, _spigot_error
from spigot.api.prep import PrepPool
from spigot.api.state import RequestLimits
from spigot.errors import SpigotError
from spigot.metering import (
    LedgerEntry,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
    parse_usd,
)
from tests.unit import metering_db

# The shared database fixtures: pytest looks fixtures up by name in the module.
db_url = metering_db.db_url
pg_database = metering_db.pg_database
pg_server = metering_db.pg_server


PREP = PrepPool(1)


def make_app(metering: Any) -> FastAPI:
    app = FastAPI()
    # What parse_body reads from the server state besides metering.
    app.state.spigot = SimpleNamespace(metering=metering, limits=RequestLimits(), prep=PREP)
    app.include_router(admin.router)
    app.add_exception_handler(SpigotError, _spigot_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(RequestIdMiddleware)
    return app


async def client_for(app: FastAPI, secret: str | None) -> httpx.AsyncClient:
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
    )


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(db_url) as opened:
        yield opened


@pytest.fixture
def root(store: Store) -> str:
    """An admin key's secret."""
    return store.create_key("root", admin=True)[1]


@pytest.fixture
async def api(store: Store, root: str) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(make_app(SimpleNamespace(store=store)), root) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# -- who may call ----------------------------------------------------------------------------

ROUTES = [
    ("GET", "/admin/keys", None),
    ("POST", "/admin/keys", {"name": "x"}),
    ("GET", "/admin/keys/root", None),
    ("PATCH", "/admin/keys/root", {"rpm": 1}),
    ("DELETE", "/admin/keys/root", None),
    ("GET", "/admin/usage", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_without_metering_admin_does_not_exist(method: str, path: str, body: Any) -> None:
    async with await client_for(make_app(None), "sk-spigot-anything") as client:
        response = await client.request(method, path, json=body)
    error = error_of(response, 404)
    assert error["message"] == f"Unknown request URL: {method} {path}."
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_wants_a_live_admin_key(
    store: Store, root: str, method: str, path: str, body: Any
) -> None:
    _, user = store.create_key("user")
    _, revoked = store.create_key("gone", admin=True)
    store.revoke_key("gone")
    _, old = store.create_key("old", admin=True, expires_at=datetime.now(UTC) + timedelta(hours=1))
    store.update_key("old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    app = make_app(SimpleNamespace(store=store))
    cases: list[tuple[dict[str, str], int, str | None, str]] = [
        ({}, 401, "invalid_api_key", "You didn't provide an API key"),
        ({"authorization": f"Basic {root}"}, 401, "invalid_api_key", "didn't provide"),
        ({"authorization": "Bearer "}, 401, "invalid_api_key", "didn't provide"),
        ({"authorization": f"Bearer {root}x"}, 401, "invalid_api_key", "Incorrect API key"),
        ({"authorization": f"Bearer {revoked}"}, 401, "key_revoked", "revoked"),
        ({"authorization": f"Bearer {old}"}, 401, "key_expired", "expired"),
        ({"authorization": f"Bearer {user}"}, 403, "not_admin", "may not use the admin API"),
    ]
    async with await client_for(app, None) as client:
        for headers, status, code, message in cases:
            response = await client.request(method, path, json=body, headers=headers)
            error = error_of(response, status)
            assert error["code"] == code and message in error["message"]
            assert root[12:] not in response.text  # the rejected secret is not echoed whole
        assert error_of(await client.get("/admin/keys"), 401)["type"] == "invalid_request_error"
        denied = await client.get("/admin/keys", headers={"authorization": f"Bearer {user}"})
        assert error_of(denied, 403)["type"] == "permission_error"
        # The scheme is case-insensitive, as in HTTP.
        fine = await client.get("/admin/keys", headers={"authorization": f"bearer {root}"})
        assert fine.status_code == 200
    assert store.get_key("x") is None
    key = store.get_key("root")
    assert key is not None and not key.revoked and key.rpm is None


async def test_an_unreachable_store_is_a_503() -> None:
    def down(secret: str) -> None:
        raise StoreUnavailable("PostgreSQL failed: connection refused")

    app = make_app(SimpleNamespace(store=SimpleNamespace(authenticate=down)))
    async with await client_for(app, "sk-spigot-x") as client:
        response = await client.get("/admin/keys")
        error = error_of(response, 503)
        assert response.headers["retry-after"] == "5"
    assert error["code"] == "store_unavailable" and "connection refused" not in error["message"]

    def broken(secret: str) -> None:
        raise StoreError("schema detail for the log only")

    app = make_app(SimpleNamespace(store=SimpleNamespace(authenticate=broken)))
    async with await client_for(app, "sk-spigot-x") as client:
        error = error_of(await client.get("/admin/keys"), 500)
    assert error["type"] == "server_error" and "detail" not in error["message"]


# -- keys ------------------------------------------------------------------------------------


async def test_create_returns_the_secret_once(api: httpx.AsyncClient, store: Store) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    response = await api.post(
        "/admin/keys",
        json={
            "name": "ci",
            "budget_usd": "12.50",
            "rpm": 60,
            "tpm": 10_000,
            "max_concurrent": 4,
            "models": ["small", " large "],
            "expires_in": "30d",
            "admin": False,
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    secret = body.pop("secret")
    assert response.text.count(secret) == 1
    expires = datetime.fromisoformat(body.pop("expires_at"))
    assert timedelta(days=30) <= expires - before <= timedelta(days=30, seconds=5)
    created = body.pop("created_at")
    assert created.endswith("Z")
    assert body == {
        "object": "api_key",
        "id": 2,
        "name": "ci",
        "prefix": secret[:14],
        "status": "active",
        "revoked_at": None,
        "budget_usd": "12.50",
        "spent_usd": "0.00",
        "remaining_usd": "12.50",
        "rpm": 60,
        "tpm": 10_000,
        "max_concurrent": 4,
        "models": ["large", "small"],
        "admin": False,
    }
    key = store.authenticate(secret)
    assert key is not None and key.budget_pusd == parse_usd("12.50")

    # Never again: not in the listing, not in the key's own record.
    listing = await api.get("/admin/keys")
    one = await api.get("/admin/keys/ci")
    for later in (listing, one):
        assert (
            later.status_code == 200 and secret not in later.text and secret[14:] not in later.text
        )
    assert [k["name"] for k in listing.json()["data"]] == ["root", "ci"]
    assert listing.json()["object"] == "list"
    assert one.json() == {**body, "created_at": created, "expires_at": one.json()["expires_at"]}


async def test_create_minimal_and_with_a_date(api: httpx.AsyncClient) -> None:
    plain = await api.post("/admin/keys", json={"name": "plain"})
    assert plain.status_code == 201
    body = plain.json()
    assert (body["budget_usd"], body["rpm"], body["models"], body["expires_at"]) == (None,) * 4
    assert body["admin"] is False and body["remaining_usd"] is None
    dated = await api.post(
        "/admin/keys", json={"name": "dated", "expires_at": "2099-01-31T12:00:00+02:00"}
    )
    assert dated.json()["expires_at"] == "2099-01-31T10:00:00Z"
    day = await api.post("/admin/keys", json={"name": "day", "expires_at": "2099-01-31"})
    assert day.json()["expires_at"] == "2099-01-31T00:00:00Z"
    # A JSON number for money is read as written; the answer is a string.
    number = await api.post("/admin/keys", json={"name": "n", "budget_usd": 0.1, "admin": True})
    assert number.json()["budget_usd"] == "0.10" and number.json()["admin"] is True
    whole = await api.post("/admin/keys", json={"name": "w", "budget_usd": 3})
    assert whole.json()["budget_usd"] == "3.00"
    tiny = await api.post("/admin/keys", json={"name": "t", "budget_usd": "0.000000000001"})
    assert tiny.json()["budget_usd"] == "0.000000000001"


BAD_CREATES: list[tuple[Any, str | None, str]] = [
    ({}, "name", "Missing required parameter: 'name'"),
    ({"name": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"name": 5}, "name", "Invalid value for 'name'"),
    ({"name": "42"}, "name", "cannot be only digits"),
    ({"name": " x"}, "name", "without edge spaces"),
    ({"name": "root"}, "name", "An API key named 'root' already exists"),
    ({"name": "x", "rpm": 0}, "rpm", "greater than or equal to 1"),
    ({"name": "x", "rpm": "5"}, "rpm", "Invalid value for 'rpm'"),
    ({"name": "x", "tpm": True}, "tpm", "Invalid value for 'tpm'"),
    ({"name": "x", "max_concurrent": 1.5}, "max_concurrent", "Invalid value"),
    ({"name": "x", "budget_usd": "ten"}, "budget_usd", "amount is not a number"),
    ({"name": "x", "budget_usd": -1}, "budget_usd", "must not be negative"),
    ({"name": "x", "budget_usd": "1e-13"}, "budget_usd", "more than 12 decimals"),
    ({"name": "x", "budget_usd": True}, "budget_usd", "Invalid value"),
    ({"name": "x", "models": []}, "models", "Invalid value for 'models'"),
    ({"name": "x", "models": [" "]}, "models[0]", "Invalid value for 'models[0]'"),
    ({"name": "x", "models": "a,b"}, "models", "Invalid value for 'models'"),
    ({"name": "x", "expires_in": "0d"}, "expires_in", "longer than zero"),
    ({"name": "x", "expires_in": "2099-01-01"}, "expires_in", "expected a duration"),
    ({"name": "x", "expires_at": "30d"}, "expires_at", "expected a duration"),
    ({"name": "x", "expires_at": "2020-01-01"}, "expires_at", "already past"),
    ({"name": "x", "expires_at": "2099-01-01T00:00:00"}, "expires_at", "needs a UTC offset"),
    (
        {"name": "x", "expires_at": "2099-01-01", "expires_in": "1d"},
        "expires_in",
        "not both",
    ),
    ({"name": "x", "admin": "yes"}, "admin", "Invalid value for 'admin'"),
    ([{"name": "x"}], None, "must be a JSON object"),
    # Past what the database's BIGINT columns hold: a 400 naming the field, never a 500.
    ({"name": "x", "rpm": 2**63}, "rpm", "less than or equal to 9223372036854775807"),
    ({"name": "x", "tpm": 2**64 - 1}, "tpm", "less than or equal to 9223372036854775807"),
    ({"name": "x", "max_concurrent": 2**63}, "max_concurrent", "less than or equal to"),
    ({"name": "x", "rpm": 10**30}, "rpm", "Invalid value for 'rpm'"),
    ({"name": "x", "budget_usd": 1e300}, "budget_usd", "at most 9223372.036854775807"),
    ({"name": "x", "budget_usd": 10**30}, "budget_usd", "at most 9223372.036854775807"),
    ({"name": "x", "budget_usd": 2**63}, "budget_usd", "at most 9223372.036854775807"),
    ({"name": "x", "budget_usd": "1e999999999"}, "budget_usd", "at most 9223372.03685477"),
    ({"name": "x", "budget_usd": "9223372.036854775808"}, "budget_usd", "at most"),
    ({"name": "x", "budget_usd": "NaN"}, "budget_usd", "must be finite"),
    ({"name": "x", "budget_usd": "-inf"}, "budget_usd", "must be finite"),
    ({"name": "x", "budget_usd": "-5"}, "budget_usd", "must not be negative"),
    ({"name": "x", "expires_in": "99999999999d"}, "expires_in", "at most 36525d"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_CREATES)
async def test_create_refuses_bad_bodies(
    api: httpx.AsyncClient, store: Store, body: Any, param: str | None, message: str
) -> None:
    error = error_of(await api.post("/admin/keys", json=body), 400)
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert [k.name for k in store.list_keys()] == ["root"]


async def test_a_body_that_is_not_json(api: httpx.AsyncClient) -> None:
    for content in (b"{name: x}", b""):
        response = await api.post("/admin/keys", content=content)
        assert "could not parse the JSON body" in error_of(response, 400)["message"]
        response = await api.patch("/admin/keys/root", content=content)
        assert error_of(response, 400)["param"] is None


async def test_money_and_limits_at_the_edges_of_a_bigint(
    api: httpx.AsyncClient, store: Store
) -> None:
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        body = b'{"name": "x", "budget_usd": ' + number + b', "rpm": ' + number + b"}"
        error = error_of(await api.post("/admin/keys", content=body), 400)
        assert error["type"] == "invalid_request_error"
        error = error_of(await api.patch("/admin/keys/root", content=body), 400)
    biggest = await api.post(
        "/admin/keys", json={"name": "max", "budget_usd": "9223372.036854775807", "rpm": 2**63 - 1}
    )
    assert biggest.status_code == 201, biggest.text
    assert biggest.json()["budget_usd"] == "9223372.036854775807"
    # One pico-dollar more, one request more: 400s naming the field (they were 500s).
    over = await api.post(
        "/admin/keys", json={"name": "over", "budget_usd": "9223372.036854775808"}
    )
    assert error_of(over, 400)["param"] == "budget_usd"
    over = await api.patch("/admin/keys/max", json={"rpm": 2**63})
    assert error_of(over, 400)["param"] == "rpm"
    assert [k.name for k in store.list_keys()] == ["root", "max"]


async def test_get_by_id_or_name(api: httpx.AsyncClient) -> None:
    await api.post("/admin/keys", json={"name": "team/a b"})
    by_id = await api.get("/admin/keys/2")
    by_name = await api.get("/admin/keys/team%2Fa%20b")
    assert by_id.status_code == by_name.status_code == 200
    assert by_id.json() == by_name.json() and by_id.json()["name"] == "team/a b"
    for missing in ("nobody", "99", ""):
        error = error_of(await api.get(f"/admin/keys/{missing}"), 404)
        assert error["param"] == "id_or_name" and f"No API key {missing!r}" in error["message"]


async def test_patch_changes_only_what_it_names(api: httpx.AsyncClient, store: Store) -> None:
    created = await api.post(
        "/admin/keys", json={"name": "ci", "budget_usd": "5", "rpm": 10, "models": ["a"]}
    )
    secret = created.json()["secret"]
    response = await api.patch("/admin/keys/ci", json={"tpm": 500, "budget_usd": "7.25"})
    assert response.status_code == 200 and "secret" not in response.json()
    body = response.json()
    assert (body["budget_usd"], body["rpm"], body["tpm"], body["models"]) == (
        "7.25",
        10,
        500,
        ["a"],
    )

    cleared = await api.patch(
        "/admin/keys/2",
        json={"budget_usd": None, "rpm": None, "models": None, "expires_in": "12h", "admin": True},
    )
    body = cleared.json()
    assert (body["budget_usd"], body["rpm"], body["models"], body["tpm"]) == (None, None, None, 500)
    assert body["admin"] is True and body["expires_at"] is not None

    renamed = await api.patch(
        "/admin/keys/ci", json={"name": "deploy", "expires_at": None, "max_concurrent": 2}
    )
    body = renamed.json()
    assert (body["name"], body["expires_at"], body["max_concurrent"]) == ("deploy", None, 2)
    key = store.authenticate(secret)
    assert key is not None and key.name == "deploy" and key.admin

    unchanged = await api.patch("/admin/keys/deploy", json={})
    assert unchanged.status_code == 200 and unchanged.json() == body


async def test_patch_errors(api: httpx.AsyncClient, store: Store) -> None:
    await api.post("/admin/keys", json={"name": "ci", "rpm": 5})
    cases: list[tuple[str, Any, int, str | None, str]] = [
        ("nobody", {"rpm": 1}, 404, "id_or_name", "No API key 'nobody'"),
        ("ci", {"name": "root"}, 400, "name", "already exists"),
        ("ci", {"name": None}, 400, "name", "non-empty string"),
        ("ci", {"admin": None}, 400, "admin", "true or false"),
        ("ci", {"rpm": 0}, 400, "rpm", "greater than or equal to 1"),
        ("ci", {"secret": "x"}, 400, "secret", "Extra inputs"),
        ("ci", {"expires_in": "soon"}, 400, "expires_in", "expected a duration"),
        ("ci", {"rpm": 2**63}, 400, "rpm", "less than or equal to"),
        ("ci", {"tpm": 2**63}, 400, "tpm", "less than or equal to"),
        ("ci", {"budget_usd": 1e300}, 400, "budget_usd", "at most 9223372.036854775807"),
        ("ci", {"budget_usd": "1e20"}, 400, "budget_usd", "at most 9223372.036854775807"),
        ("ci", {"expires_in": "99999999999w"}, 400, "expires_in", "at most 36525d"),
    ]
    for target, body, status, param, message in cases:
        error = error_of(await api.patch(f"/admin/keys/{target}", json=body), status)
        assert error["param"] == param and message in error["message"], error
    duplicate = await api.patch("/admin/keys/ci", json={"name": "root"})
    assert error_of(duplicate, 400)["code"] == "duplicate_name"
    key = store.get_key("ci")
    assert key is not None and key.rpm == 5


async def test_delete_revokes(api: httpx.AsyncClient, store: Store) -> None:
    secret = (await api.post("/admin/keys", json={"name": "ci"})).json()["secret"]
    response = await api.delete("/admin/keys/ci")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "revoked" and body["revoked_at"].endswith("Z")
    again = await api.delete("/admin/keys/2")
    assert again.status_code == 200 and again.json() == body
    key = store.authenticate(secret)
    assert key is not None and key.revoked
    error_of(await api.delete("/admin/keys/nobody"), 404)

    assert [k["name"] for k in (await api.get("/admin/keys")).json()["data"]] == ["root"]
    for flag in ("true", "1"):
        everything = (await api.get(f"/admin/keys?all={flag}")).json()["data"]
        assert [(k["name"], k["status"]) for k in everything] == [
            ("root", "active"),
            ("ci", "revoked"),
        ]


async def test_an_admin_that_revokes_itself_is_locked_out(api: httpx.AsyncClient) -> None:
    assert (await api.delete("/admin/keys/root")).status_code == 200
    assert error_of(await api.get("/admin/keys"), 401)["code"] == "key_revoked"


# -- usage -----------------------------------------------------------------------------------


def settle(store: Store, request_id: str, key_id: int | None, model: str, **fields: Any) -> None:
    values: dict[str, Any] = {
        "endpoint": "/v1/chat/completions",
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "completion_tokens": 50,
        "cost_pusd": parse_usd("0.25"),
        "duration_ms": 400,
    }
    values.update(fields)
    assert store.settle(LedgerEntry(request_id=request_id, key_id=key_id, model=model, **values))


async def test_usage(api: httpx.AsyncClient, store: Store) -> None:
    user, _ = store.create_key("user")
    now = datetime.now(UTC)
    old = now - timedelta(days=10)
    settle(store, "r1", user.id, "small", created_at=now)
    settle(store, "r2", user.id, "large", created_at=old, cost_pusd=parse_usd("1.000001"))
    settle(store, "r3", 1, "small", created_at=now, completion_tokens=5)
    settle(store, "r4", None, "small", created_at=now, cost_pusd=0)

    body = (await api.get("/admin/usage")).json()
    assert body["object"] == "usage" and body["by"] == "key" and body["since"] is None
    assert [(r["key_id"], r["key_name"], r["requests"], r["cost_usd"]) for r in body["data"]] == [
        (None, None, 1, "0.00"),
        (1, "root", 1, "0.25"),
        (2, "user", 2, "1.250001"),
    ]
    assert body["total"] == {
        "requests": 4,
        "prompt_tokens": 400,
        "cached_tokens": 80,
        "completion_tokens": 155,
        "cost_usd": "1.500001",
    }

    by_model = (await api.get("/admin/usage", params={"by": "model", "key": "user"})).json()
    assert [(r["model"], r["requests"]) for r in by_model["data"]] == [("large", 1), ("small", 1)]
    assert set(by_model["data"][0]) == {
        "model", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
    }  # fmt: skip
    by_day = (await api.get("/admin/usage", params={"by": "day", "key": "2"})).json()
    assert [r["day"] for r in by_day["data"]] == [old.date().isoformat(), now.date().isoformat()]
    recent = (await api.get("/admin/usage", params={"by": "day", "since": "7d"})).json()
    assert [r["day"] for r in recent["data"]] == [now.date().isoformat()]
    assert recent["since"] == (now - timedelta(days=7)).date().isoformat()
    dated = (await api.get("/admin/usage", params={"since": now.date().isoformat()})).json()
    assert dated["total"]["requests"] == 3

    for params, status, param in [
        ({"by": "hour"}, 400, "by"),
        ({"since": "last week"}, 400, "since"),
        ({"key": "nobody"}, 404, "key"),
    ]:
        error = error_of(await api.get("/admin/usage", params=params), status)
        assert error["param"] == param


async def test_a_key_id_past_64_bits_is_404_not_500(api: httpx.AsyncClient) -> None:
    path = "/admin/keys/99999999999999999999"
    for response in (
        await api.get(path),
        await api.patch(path, json={"rpm": 1}),
        await api.delete(path),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
