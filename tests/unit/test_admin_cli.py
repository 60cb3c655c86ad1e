"""``spigot keys`` and ``spigot usage`` through click, on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner, Result

from spigot.cli.admin import keys, usage
from spigot.cli.database import shown_url
from spigot.metering import LedgerEntry, Store, open_store, parse_usd
from tests.unit import metering_db

# The shared database fixtures: pytest looks fixtures up by name in the module.
db_url = metering_db.db_url
pg_database = metering_db.pg_database
pg_server = metering_db.pg_server

cli = click.Group(commands=[keys, usage])


def run(db: str | None, *args: str, env: dict[str, str] | None = None) -> Result:
    argv = [*args, "--db", db] if db is not None else list(args)
    return CliRunner().invoke(cli, argv, env=env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def fails(result: Result, message: str) -> None:
    """Exit 1 with one ``Error: ...`` line that says ``message``, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def create(db: str, name: str, *options: str) -> str:
    result = ok(run(db, "keys", "create", "--name", name, *options))
    return result.stdout.strip()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(db_url) as opened:
        yield opened


def listed(db: str, *options: str) -> dict[str, dict[str, Any]]:
    result = ok(run(db, "keys", "list", "--format", "json", *options))
    body = orjson.loads(result.stdout)
    assert body["object"] == "list"
    return {item["name"]: item for item in body["data"]}


# -- create ----------------------------------------------------------------------------------


def test_create_prints_the_secret_once_alone_on_stdout(db_url: str, store: Store) -> None:
    result = ok(run(db_url, "keys", "create", "--name", "ci"))
    secret = result.stdout.removesuffix("\n")
    assert result.stdout == secret + "\n" and "\n" not in secret
    assert secret.startswith("sk-spigot-")
    assert result.output.count(secret) == 1
    assert "will not be shown again" in result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert "key 1 'ci'" in result.stderr and secret[:14] in result.stderr
    key = store.authenticate(secret)
    assert key is not None and key.name == "ci" and not key.admin
    assert (key.budget_pusd, key.rpm, key.tpm, key.max_concurrent) == (None,) * 4
    assert key.models is None and key.expires_at is None


def test_create_with_every_limit(db_url: str, store: Store) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    secret = create(
        db_url, "full", "--budget-usd", "12.50", "--rpm", "60", "--tpm", "10000",
        "--max-concurrent", "4", "--models", "small, large,small", "--expires", "30d", "--admin",
    )  # fmt: skip
    key = store.authenticate(secret)
    assert key is not None
    assert key.budget_pusd == parse_usd("12.50")
    assert (key.rpm, key.tpm, key.max_concurrent, key.admin) == (60, 10000, 4, True)
    assert key.models == ("large", "small")
    assert key.expires_at is not None
    assert timedelta(days=30) <= key.expires_at - before <= timedelta(days=30, seconds=5)

    dated = store.authenticate(create(db_url, "dated", "--expires", "2099-01-31"))
    assert dated is not None and dated.expires_at == datetime(2099, 1, 31, tzinfo=UTC)
    timed = store.authenticate(create(db_url, "timed", "--expires", "2099-01-31T12:00:00+02:00"))
    assert timed is not None and timed.expires_at == datetime(2099, 1, 31, 10, tzinfo=UTC)


def test_db_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.db"
    result = ok(run(None, "keys", "create", "--name", "e", env={"SPIGOT_DB": str(path)}))
    assert path.exists()
    assert "e" in listed(str(path))
    assert result.stdout.startswith("sk-spigot-")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--name", "42"], "a key name cannot be only digits: '42'"),
        (["--name", " x"], "non-empty string without edge spaces"),
        (["--name", "x", "--expires", "0d"], "--expires: a duration must be longer than zero"),
        (["--name", "x", "--expires", "soon"], "--expires: expected a duration such as 30d"),
        (["--name", "x", "--expires", "2020-01-01"], "--expires: the expiry '2020-01-01' is al"),
        (["--name", "x", "--expires", "2099-02-30"], "--expires: expected a duration"),
        (["--name", "x", "--expires", "2099-01-01T00:00"], "needs a UTC offset"),
        (["--name", "x", "--budget-usd", "ten"], "--budget-usd: amount is not a number: 'ten'"),
        (["--name", "x", "--budget-usd", "-1"], "--budget-usd: amount must not be negative"),
        (["--name", "x", "--budget-usd", "0.0000000000001"], "more than 12 decimals"),
        (["--name", "x", "--rpm", "0"], "--rpm: expected a whole number >= 1, got '0'"),
        (["--name", "x", "--tpm", "1.5"], "--tpm: expected a whole number >= 1"),
        (["--name", "x", "--max-concurrent", "none"], "--max-concurrent: expected a whole"),
        (["--name", "x", "--models", " , "], "--models: expected model names separated by"),
        # Past what the database's BIGINT columns hold: a clear error, not a traceback.
        (["--name", "x", "--rpm", "1" + "0" * 30], "--rpm: expected a whole number at most 9"),
        (["--name", "x", "--tpm", str(2**63)], "--tpm: expected a whole number at most"),
        (["--name", "x", "--max-concurrent", str(2**63)], "--max-concurrent: expected a whole"),
        (["--name", "x", "--budget-usd", "1e300"], "--budget-usd: amount (USD) must be at most"),
        (["--name", "x", "--budget-usd", "1e999999999"], "must be at most 9223372.036854775807"),
        (["--name", "x", "--budget-usd", "inf"], "--budget-usd: amount must be finite"),
        (["--name", "x", "--expires", "99999999999d"], "--expires: a duration must be at most"),
    ],
)
def test_create_refuses_bad_values(
    db_url: str,
    store: Store,
    options: list[str],
    message: str,
) -> None:
    fails(run(db_url, "keys", "create", *options), message)
    assert store.list_keys(include_revoked=True) == []


def test_duplicate_names(db_url: str, store: Store) -> None:
    create(db_url, "alice")
    fails(run(db_url, "keys", "create", "--name", "alice"), "an API key named 'alice' already")
    create(db_url, "bob")
    fails(run(db_url, "keys", "update", "bob", "--name", "alice"), "named 'alice' already exists")
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]


# -- list ------------------------------------------------------------------------------------


def test_list_shows_prefixes_never_secrets(db_url: str) -> None:
    secrets = {
        name: create(db_url, name, *options)
        for name, options in [
            ("alice", ["--budget-usd", "5", "--rpm", "60", "--models", "a,b", "--admin"]),
            ("bob", ["--tpm", "1000", "--max-concurrent", "2", "--expires", "2099-01-31"]),
        ]
    }
    table = ok(run(db_url, "keys", "list"))
    as_json = ok(run(db_url, "keys", "list", "--format", "json", "--all"))
    for result in (table, as_json):
        assert result.stderr == ""
        for secret in secrets.values():
            assert secret not in result.output
            assert secret[14:] not in result.output  # the part that is secret
            assert secret[:14] in result.output

    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "id", "name", "prefix", "status", "created", "expires", "revoked", "budget_usd",
        "spent_usd", "rpm", "tpm", "max_concurrent", "models", "admin",
    ]  # fmt: skip
    alice, bob = (row.split() for row in rows)
    assert alice[:4] == ["1", "alice", secrets["alice"][:14], "active"]
    assert alice[-7:] == ["5.00", "0.00", "60", "-", "-", "a,b", "yes"]
    assert bob[-7:] == ["-", "0.00", "-", "1000", "2", "*", "no"]
    assert "2099-01-31 00:00" in rows[1]

    items = listed(db_url)
    assert items["alice"] == {
        "object": "api_key",
        "id": 1,
        "name": "alice",
        "prefix": secrets["alice"][:14],
        "status": "active",
        "created_at": items["alice"]["created_at"],
        "expires_at": None,
        "revoked_at": None,
        "budget_usd": "5.00",
        "spent_usd": "0.00",
        "remaining_usd": "5.00",
        "rpm": 60,
        "tpm": None,
        "max_concurrent": None,
        "models": ["a", "b"],
        "admin": True,
    }
    assert items["alice"]["created_at"].endswith("Z")
    assert items["bob"]["expires_at"] == "2099-01-31T00:00:00Z"
    assert (items["bob"]["tpm"], items["bob"]["max_concurrent"]) == (1000, 2)


def test_list_hides_revoked_keys_unless_all(db_url: str) -> None:
    create(db_url, "alice")
    create(db_url, "bob")
    ok(run(db_url, "keys", "revoke", "bob"))
    assert list(listed(db_url)) == ["alice"]
    everything = listed(db_url, "--all")
    assert list(everything) == ["alice", "bob"]
    assert everything["bob"]["status"] == "revoked" and everything["bob"]["revoked_at"]
    table = ok(run(db_url, "keys", "list", "--all")).stdout
    assert "revoked" in table.splitlines()[2]


def test_empty_list(db_url: str) -> None:
    assert ok(run(db_url, "keys", "list")).stdout.split() == [
        "id", "name", "prefix", "status", "created", "expires", "revoked", "budget_usd",
        "spent_usd", "rpm", "tpm", "max_concurrent", "models", "admin",
    ]  # fmt: skip
    assert orjson.loads(ok(run(db_url, "keys", "list", "--format", "json")).stdout) == {
        "object": "list",
        "data": [],
    }


# -- update and revoke -----------------------------------------------------------------------


def test_update_sets_and_clears_limits(db_url: str, store: Store) -> None:
    secret = create(db_url, "ci", "--budget-usd", "5", "--rpm", "10", "--models", "a")
    result = ok(run(db_url, "keys", "update", "ci", "--tpm", "500", "--budget-usd", "7.25"))
    assert result.stdout.startswith("updated key 1 'ci'") and "tpm 500" in result.stdout
    key = store.authenticate(secret)
    assert key is not None
    assert (key.budget_pusd, key.rpm, key.tpm) == (parse_usd("7.25"), 10, 500)

    ok(run(db_url, "keys", "update", "1", "--rpm", "none", "--budget-usd", "None", "--models",
           "none", "--expires", "12h", "--admin"))  # fmt: skip
    key = store.authenticate(secret)
    assert key is not None and key.admin
    assert (key.budget_pusd, key.rpm, key.models, key.tpm) == (None, None, None, 500)
    assert key.expires_at is not None and key.expires_at > datetime.now(UTC)

    renamed = ok(run(db_url, "keys", "update", "ci", "--name", "deploy", "--expires", "none",
                     "--no-admin", "--max-concurrent", "3"))  # fmt: skip
    assert "key 1 'deploy'" in renamed.stdout
    key = store.authenticate(secret)
    assert key is not None and key.name == "deploy" and key.expires_at is None
    assert not key.admin and key.max_concurrent == 3
    assert secret not in renamed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--rpm", "1"], "no API key 'nobody'"),
        (["99", "--rpm", "1"], "no API key '99'"),
        (["ci"], "nothing to change"),
        (["ci", "--rpm", "-3"], "--rpm: expected a whole number >= 1, got '-3' (or 'none'"),
        (["ci", "--expires", "yesterday"], "--expires: expected a duration"),
        (["ci", "--budget-usd", "1,5"], "--budget-usd: amount is not a number"),
        (["ci", "--name", "123"], "a key name cannot be only digits"),
        (["ci", "--rpm", str(2**63)], "--rpm: expected a whole number at most 92233720368547758"),
        (["ci", "--budget-usd", "1e20"], "--budget-usd: amount (USD) must be at most"),
        (["ci", "--expires", "99999999999d"], "--expires: a duration must be at most 36525d"),
    ],
)
def test_update_errors(db_url: str, store: Store, args: list[str], message: str) -> None:
    create(db_url, "ci", "--rpm", "5")
    fails(run(db_url, "keys", "update", *args), message)
    key = store.get_key("ci")
    assert key is not None and key.rpm == 5


def test_revoke(db_url: str, store: Store) -> None:
    alice = create(db_url, "alice")
    create(db_url, "bob")
    assert ok(run(db_url, "keys", "revoke", "alice")).stdout == "revoked key 1 'alice'\n"
    assert ok(run(db_url, "keys", "revoke", "2")).stdout == "revoked key 2 'bob'\n"
    again = ok(run(db_url, "keys", "revoke", "1"))
    assert again.stdout.startswith("key 1 'alice' was already revoked (")
    key = store.authenticate(alice)
    assert key is not None and key.revoked
    fails(run(db_url, "keys", "revoke", "carol"), "no API key 'carol'")
    fails(run(db_url, "keys", "revoke", "3"), "no API key '3'")


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


@pytest.fixture
def traffic(db_url: str, store: Store) -> dict[str, str]:
    """alice: 2 requests today (small, large) and one 10 days ago (small); bob: one today
    (large); one without a key today (small)."""
    create(db_url, "alice")
    create(db_url, "bob")
    now = datetime.now(UTC)
    old = now - timedelta(days=10)
    settle(store, "a1", 1, "small", created_at=now)
    settle(store, "a2", 1, "large", created_at=now, cost_pusd=parse_usd("1.000001"))
    settle(store, "a3", 1, "small", created_at=old, prompt_tokens=10, cached_tokens=0)
    settle(store, "b1", 2, "large", created_at=now, completion_tokens=7)
    settle(store, "n1", None, "small", created_at=now, cost_pusd=0)
    return {"today": now.date().isoformat(), "old": old.date().isoformat()}


def usage_json(db: str, *options: str) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(ok(run(db, "usage", "--format", "json", *options)).stdout)
    return body


def test_usage_table_by_key_has_a_totals_row(db_url: str, traffic: dict[str, str]) -> None:
    result = ok(run(db_url, "usage"))
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines == [
        ["key_id", "key_name", "requests", "prompt_tokens", "cached_tokens",
         "completion_tokens", "cost_usd"],
        ["-", "(no", "key)", "1", "100", "20", "50", "0.00"],
        ["1", "alice", "3", "210", "40", "150", "1.500001"],
        ["2", "bob", "1", "100", "20", "7", "0.25"],
        ["total", "5", "410", "80", "207", "1.750001"],
    ]  # fmt: skip
    assert result.stderr == ""


def test_usage_by_model_and_day_with_filters(db_url: str, traffic: dict[str, str]) -> None:
    by_model = usage_json(db_url, "--by", "model")
    assert by_model["by"] == "model" and by_model["since"] is None
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in by_model["data"]] == [
        ("large", 2, "1.250001"),
        ("small", 3, "0.50"),
    ]
    assert by_model["total"] == {
        "requests": 5,
        "prompt_tokens": 410,
        "cached_tokens": 80,
        "completion_tokens": 207,
        "cost_usd": "1.750001",
    }
    by_day = usage_json(db_url, "--by", "day", "--key", "alice")
    assert [(r["day"], r["requests"]) for r in by_day["data"]] == [
        (traffic["old"], 1),
        (traffic["today"], 2),
    ]
    recent = usage_json(db_url, "--by", "day", "--key", "1", "--since", "7d")
    assert [(r["day"], r["requests"]) for r in recent["data"]] == [(traffic["today"], 2)]
    assert recent["since"] is not None and recent["since"] > traffic["old"]
    dated = usage_json(db_url, "--since", traffic["today"])
    assert dated["since"] == traffic["today"] and dated["total"]["requests"] == 4
    keyed = usage_json(db_url)
    assert keyed["data"][0] == {
        "key_id": None,
        "key_name": None,
        "requests": 1,
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "completion_tokens": 50,
        "cost_usd": "0.00",
    }
    table = ok(run(db_url, "usage", "--by", "model", "--since", "24h"))
    assert table.stdout.splitlines()[-1].split() == ["total", "4", "400", "80", "157", "1.500001"]
    assert "whole UTC days" in table.stderr


def test_usage_csv(db_url: str, traffic: dict[str, str]) -> None:
    result = ok(run(db_url, "usage", "--format", "csv"))
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows == [
        ["key_id", "key_name", "requests", "prompt_tokens", "cached_tokens",
         "completion_tokens", "cost_usd"],
        ["", "", "1", "100", "20", "50", "0.00"],
        ["1", "alice", "3", "210", "40", "150", "1.500001"],
        ["2", "bob", "1", "100", "20", "7", "0.25"],
    ]  # fmt: skip
    by_day = list(csv.reader(io.StringIO(ok(run(db_url, "usage", "--by", "day",
                                                  "--format", "csv")).stdout)))  # fmt: skip
    assert by_day[0][0] == "day" and [r[0] for r in by_day[1:]] == [
        traffic["old"],
        traffic["today"],
    ]


def test_usage_of_an_empty_database(db_url: str) -> None:
    assert usage_json(db_url)["data"] == []
    table = ok(run(db_url, "usage", "--by", "day")).stdout.splitlines()
    assert table[-1].split() == ["total", "0", "0", "0", "0", "0.00"]


def test_usage_errors(db_url: str, traffic: dict[str, str]) -> None:
    fails(run(db_url, "usage", "--key", "carol"), "no API key 'carol'")
    fails(run(db_url, "usage", "--since", "last week"), "--since: expected a duration")
    fails(run(db_url, "usage", "--since", "0h"), "--since: a duration must be longer than zero")
    bad_by = run(db_url, "usage", "--by", "hour")
    assert bad_by.exit_code == 2 and "Traceback" not in bad_by.output


# -- databases that cannot be used -----------------------------------------------------------


def test_a_missing_sqlite_file_is_not_created_by_reading_commands(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    for args in (["keys", "list"], ["keys", "revoke", "x"], ["usage"],
                 ["keys", "update", "x", "--rpm", "1"]):  # fmt: skip
        fails(run(str(path), *args), f"no database at {path}")
    assert not path.exists()
    create(str(path), "first")
    assert path.exists()


def test_unusable_databases(tmp_path: Path) -> None:
    fails(
        run(str(tmp_path / "no" / "such" / "dir.db"), "keys", "create", "--name", "x"),
        "cannot open the database",
    )
    junk = tmp_path / "junk.db"
    junk.write_text("this is not a database\n" * 100)
    fails(run(str(junk), "keys", "list"), "file is not a database")
    unreachable = "postgresql://spigot:hunter2@127.0.0.1:1/spigot"
    for args in (["keys", "list"], ["keys", "create", "--name", "x"], ["usage"]):
        result = run(unreachable, *args)
        fails(result, "cannot open the database postgresql://spigot:***@127.0.0.1:1/spigot")
        assert "hunter2" not in result.output
    fails(run("postgresql://[bad", "keys", "list"), "cannot open the database postgresql://...")
    # psycopg quotes what it could not parse, here the password itself.
    spaced = run("postgresql://u:top secret@127.0.0.1/x", "keys", "list")
    fails(spaced, "cannot open the database postgresql://u:***@127.0.0.1/x")
    assert "top secret" not in spaced.output


def test_a_newer_schema_is_refused(db_url: str) -> None:
    metering_db.execute(db_url, "INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    try:
        fails(run(db_url, "keys", "list"), "newer than this spigot knows")
    finally:
        metering_db.execute(db_url, "DELETE FROM schema_migrations WHERE version = 999")


def test_shown_url_masks_only_passwords() -> None:
    assert shown_url("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert shown_url("postgres://u@h/d") == "postgres://u@h/d"
    assert shown_url("/tmp/x:y@z.db") == "/tmp/x:y@z.db"
