"""Admission in the request path (spigot.api.metering) on a real store, SQLite and PostgreSQL:
two phases, ``n`` against max_concurrent, the worst-case reservation, checkpoints, and auth
that stays on once a key existed."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from spigot.api import metering as api_metering
from spigot.api.metering import Metering
from spigot.errors import PermissionDenied, QuotaExceeded, RateLimited
from spigot.metering import Price, Store, open_store
from spigot.metering.prices import PriceTable
from tests.unit import metering_db

db_url = metering_db.db_url
pg_database = metering_db.pg_database
pg_server = metering_db.pg_server

MODEL = "m"
PRICES = PriceTable({MODEL: Price.per_million(prompt="1", cached="0.5", completion="2")})


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(db_url) as opened:
        yield opened


def request_for(metering: Metering | None, request_id: str) -> Any:
    """What the module-level helpers read from a Starlette request."""
    return SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(spigot=SimpleNamespace(metering=metering))),
        state=SimpleNamespace(request_id=request_id),
        url=SimpleNamespace(path="/v1/chat/completions"),
    )


def reservations(store: Store) -> dict[str, tuple[int, int, int]]:
    """request_id -> (sequences, amount_pusd, tokens), read through a second store."""
    found: dict[str, tuple[int, int, int]] = {}
    with store._db.transaction(write=False) as tx:  # type: ignore[attr-defined]
        for row in tx.all("SELECT request_id, sequences, amount_pusd, tokens FROM reservations"):
            found[row[0]] = (int(row[1]), int(row[2]), int(row[3]))
    return found


async def test_n_beyond_max_concurrent_is_refused_for_good(store: Store) -> None:
    metering = Metering(store, PRICES, require_auth=False)
    key, _ = store.create_key("one", max_concurrent=1)
    request = request_for(metering, "req_n72")
    with pytest.raises(RateLimited) as refused:
        await api_metering.admit(request, key, model=MODEL, sequences=72)
    error = refused.value
    assert error.status == 429 and error.param == "n" and error.retry_after is None
    assert "waiting will not help" in error.message and "max_concurrent" in error.message
    assert "retry-after" not in error.headers()
    assert reservations(store) == {}

    # n=1 takes the one slot; a second request waits (and is told it may retry).
    held = await api_metering.admit(request_for(metering, "req_a"), key, model=MODEL, sequences=1)
    assert held is not None and reservations(store) == {"req_a": (1, 0, 0)}
    with pytest.raises(RateLimited) as busy:
        await api_metering.admit(request_for(metering, "req_b"), key, model=MODEL, sequences=1)
    assert busy.value.retry_after is not None and busy.value.param is None

    wide, _ = store.create_key("wide", max_concurrent=4)
    four = request_for(metering, "req_four")
    assert await api_metering.admit(four, wide, model=MODEL, sequences=4) is not None
    assert reservations(store)["req_four"] == (4, 0, 0)
    with pytest.raises(RateLimited):
        await api_metering.admit(request_for(metering, "req_c"), wide, model=MODEL, sequences=1)
    await api_metering.release(four, held)
    assert "req_four" not in reservations(store)


async def test_two_phases_reserve_after_the_prompt_is_counted(store: Store) -> None:
    metering = Metering(store, PRICES, require_auth=False)
    key, _ = store.create_key("k", rpm=10, tpm=1000, budget_pusd=10**9)
    request = request_for(metering, "req_1")
    reservation = await api_metering.admit(request, key, model=MODEL, sequences=2)
    assert reservation is not None
    assert reservation.headers["x-ratelimit-remaining-requests"] == "9"
    assert reservation.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert reservations(store) == {"req_1": (2, 0, 0)}

    await api_metering.reserve(
        request, reservation, model=MODEL, prompt_tokens=100, max_completion_tokens=200
    )
    # Worst case: every prompt token uncached, every output token made.
    assert reservations(store) == {"req_1": (2, 100 * 1_000_000 + 200 * 2_000_000, 300)}
    assert reservation.headers["x-ratelimit-remaining-tokens"] == "700"
    assert reservation.headers["x-ratelimit-remaining-requests"] == "9"

    # Phase 2 refused: 429, headers updated, the reservation dropped.
    other = request_for(metering, "req_2")
    second = await api_metering.admit(other, key, model=MODEL, sequences=1)
    assert second is not None
    with pytest.raises(RateLimited) as over:
        await api_metering.reserve(
            other, second, model=MODEL, prompt_tokens=1, max_completion_tokens=700
        )
    assert over.value.retry_after is not None
    assert second.headers["x-ratelimit-remaining-tokens"] == "700"
    assert "req_2" not in reservations(store)
    await api_metering.release(other, second)  # what the caller does next: harmless

    third = request_for(metering, "req_3")
    poor = await api_metering.admit(third, key, model=MODEL, sequences=1)
    with pytest.raises(QuotaExceeded):
        await api_metering.reserve(
            third, poor, model=MODEL, prompt_tokens=600, max_completion_tokens=0
        )
    assert "req_3" not in reservations(store)


async def test_model_refusal_comes_first_and_no_key_means_no_metering(store: Store) -> None:
    metering = Metering(store, PRICES, require_auth=False)
    key, _ = store.create_key("k", models=["other"], max_concurrent=1)
    with pytest.raises(PermissionDenied):
        await api_metering.admit(request_for(metering, "r"), key, model=MODEL, sequences=99)
    # No key (keys not required), or metering off: nothing to admit or reserve.
    for state in (metering, None):
        request = request_for(state, "keyless")
        assert await api_metering.admit(request, None, model=MODEL, sequences=5) is None
        await api_metering.reserve(
            request, None, model=MODEL, prompt_tokens=10, max_completion_tokens=10
        )
        await api_metering.release(request, None)
    assert reservations(store) == {}


async def test_a_cached_price_above_the_prompt_price_cannot_overspend(store: Store) -> None:
    # Refused when loaded from a file; made by hand here to check the second line of defence.
    odd = PriceTable({MODEL: Price(prompt=1, cached=15, completion=1)})
    metering = Metering(store, odd, require_auth=False)
    key, _ = store.create_key("k", budget_pusd=100 * 15 + 14)
    request = request_for(metering, "req_1")
    reservation = await api_metering.admit(request, key, model=MODEL, sequences=1)
    await api_metering.reserve(
        request, reservation, model=MODEL, prompt_tokens=100, max_completion_tokens=0
    )
    assert reservations(store)["req_1"][1] == 100 * 15  # the cached price, the higher one
    again = request_for(metering, "req_2")
    other = await api_metering.admit(again, key, model=MODEL, sequences=1)
    with pytest.raises(QuotaExceeded):
        await api_metering.reserve(
            again, other, model=MODEL, prompt_tokens=1, max_completion_tokens=0
        )


async def test_checkpoints_are_priced_and_billed_if_the_server_dies(
    store: Store, db_url: str
) -> None:
    metering = Metering(store, PRICES, require_auth=False)
    key, _ = store.create_key("k")
    request = request_for(metering, "req_1")
    reservation = await api_metering.admit(request, key, model=MODEL, sequences=1)
    await api_metering.reserve(
        request, reservation, model=MODEL, prompt_tokens=10, max_completion_tokens=50
    )
    assert await metering.checkpoint(
        "req_1", model=MODEL, prompt_tokens=10, cached_tokens=4, completion_tokens=20
    )
    assert not await metering.checkpoint(
        "keyless", model=MODEL, prompt_tokens=1, cached_tokens=0, completion_tokens=1
    )
    with open_store(db_url) as restarted:
        assert restarted.clear_reservations() == 1
        (row,) = restarted.ledger()
    assert (row.request_id, row.status, row.endpoint) == (
        "req_1",
        "interrupted",
        "/v1/chat/completions",
    )
    assert (
        row.cost_pusd == metering.cost(MODEL, 10, 4, 20) == 6 * 10**6 + 4 * 5 * 10**5 + 40 * 10**6
    )
    assert store.get_key(key.id).spent_pusd == row.cost_pusd  # type: ignore[union-attr]


async def test_auth_stays_on_after_the_last_key_is_revoked_and_a_restart(
    store: Store, db_url: str
) -> None:
    metering = Metering(store, PRICES, require_auth=False)
    assert await metering.authenticate(None) is None  # no key yet: keyless
    store.create_key("only")
    store.revoke_key("only")
    with open_store(db_url) as restarted:
        fresh = Metering(restarted, PRICES, require_auth=False)
        assert await fresh._auth_required()
        with pytest.raises(Exception, match="didn't provide an API key"):
            await fresh.authenticate(None)
