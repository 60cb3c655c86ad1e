"""One key-name rule for the store, ``spigot keys`` and /admin, agreeing with the lookup that
reads a name-or-id argument: a name is refused exactly when the lookup would take it for an id.
On a SQLite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from spigot.metering import Store, check_key_name, key_id_of, open_store
from tests.unit import metering_db
from tests.unit.test_admin_api import client_for, error_of, make_app
from tests.unit.test_admin_cli import fails, ok, run

# The shared database fixtures: pytest looks fixtures up by name in the module.
db_url = metering_db.db_url
pg_database = metering_db.pg_database
pg_server = metering_db.pg_server

EDGES = "a key name must be a non-empty string without edge spaces"
DIGITS = "a key name cannot be only digits"

# name -> why it is refused (None: a valid name). "²" is a digit to str.isdigit() but no
# number (int("²") fails) and "٣" (Arabic-Indic three) is not ASCII: the lookup reads neither
# as an id, so both are names. The old API refused "²" and "٣" while the store took them.
NAMES: list[tuple[str, str | None]] = [
    ("12", f"{DIGITS}: '12'"),
    ("012", f"{DIGITS}: '012'"),
    ("²", None),
    ("٣", None),
    ("1²", None),
    (" a", f"{EDGES}: ' a'"),
    ("a\t", f"{EDGES}: 'a\\t'"),
    ("", f"{EDGES}: ''"),
]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(db_url) as opened:
        yield opened


def test_the_lookup_reads_only_ascii_digits_as_an_id() -> None:
    assert [key_id_of(text) for text in ("12", "012", "0")] == [12, 12, 0]
    for text in ("²", "٣", "1²", " 1", "+1", "-1", "1_0", "1.0", "", "a1"):
        assert key_id_of(text) is None, text


@pytest.mark.parametrize(("name", "refusal"), NAMES)
async def test_store_cli_and_api_agree_on_a_name(
    db_url: str, store: Store, name: str, refusal: str | None
) -> None:
    if refusal is None:
        assert check_key_name(name) == name
    else:
        with pytest.raises(ValueError) as caught:
            check_key_name(name)
        assert str(caught.value) == refusal

    # The store, creating and renaming.
    _, root = store.create_key("root", admin=True)
    if refusal is None:
        made, _ = store.create_key(name)
        assert store.get_key(name) == made
        store.update_key(made.id, name="renamed")
        assert store.update_key("renamed", name=name).name == name
        store.revoke_key(made.id)
        store.update_key(made.id, name=f"old {made.id}")
    else:
        for attempt in (
            lambda: store.create_key(name),
            lambda: store.update_key("root", name=name),
        ):
            with pytest.raises(ValueError) as caught:
                attempt()
            assert str(caught.value) == refusal

    # spigot keys create / update.
    if refusal is None:
        ok(run(db_url, "keys", "create", "--name", name))
        ok(run(db_url, "keys", "update", name, "--rpm", "5"))
        assert store.get_key(name).rpm == 5  # type: ignore[union-attr]
        ok(run(db_url, "keys", "update", name, "--name", "cli-renamed"))
        ok(run(db_url, "keys", "update", "cli-renamed", "--name", name))
        ok(run(db_url, "keys", "revoke", name))
        store.update_key(name, name="cli-done")
    else:
        fails(run(db_url, "keys", "create", "--name", name), refusal)
        fails(run(db_url, "keys", "update", "root", "--name", name), refusal)

    # POST / PATCH /admin/keys.
    async with await client_for(make_app(SimpleNamespace(store=store)), root) as api:
        created = await api.post("/admin/keys", json={"name": name})
        renamed = await api.patch("/admin/keys/root", json={"name": name})
        if refusal is None:
            assert created.status_code == 201, created.text
            path = f"/admin/keys/{quote(name)}"
            assert (await api.get(path)).json()["id"] == created.json()["id"]
            assert renamed.status_code == 400  # taken by the key just made
            assert error_of(renamed, 400)["code"] == "duplicate_name"
        else:
            for response in (created, renamed):
                error = error_of(response, 400)
                assert error["param"] == "name"
                assert error["message"] == f"Invalid value for 'name': {refusal}."
    if refusal is not None:
        assert [key.name for key in store.list_keys(include_revoked=True)] == ["root"]


def test_a_name_of_other_digits_never_shadows_an_id(store: Store) -> None:
    keys = [store.create_key(f"k{i}")[0] for i in range(3)]
    three, _ = store.create_key("٣")
    superscript, _ = store.create_key("²")
    assert store.get_key("3") == keys[2] and store.get_key(3) == keys[2]
    assert store.get_key("٣") == three and store.get_key("²") == superscript
    assert store.get_key("03") == keys[2]
    assert store.revoke_key("٣") and not store.get_key("3").revoked  # type: ignore[union-attr]
