"""``spigot keys`` and ``spigot usage``: API keys and the usage ledger, straight on the database.

These talk to the metering store itself, not to a server, so they work before the first
server starts (to make the first admin key) and while none runs. Every command takes ``--db``
(``$SPIGOT_DB``): a SQLite path or a ``postgresql://`` URL, the same the server is given.

Whatever goes wrong ends in one ``Error: ...`` line and exit status 1, never a traceback.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click
import orjson

from spigot.cli.database import db_option, opened
from spigot.metering import (
    MAX_BIGINT,
    UNSET,
    ApiKey,
    Store,
    Unset,
    check_key_name,
    parse_usd,
)
from spigot.metering.durations import parse_expiry, parse_since
from spigot.metering.records import UsageBy
from spigot.metering.views import USAGE_COUNTS, key_dict, key_status, since_day, usage_dict

T = TypeVar("T")

CLEAR = "none"  # `keys update --rpm none` lifts the limit


def find_key(store: Store, id_or_name: str) -> ApiKey:
    key = store.get_key(id_or_name)
    if key is None:
        raise click.ClickException(f"no API key {id_or_name!r} (see `spigot keys list --all`)")
    return key


# -- option values -----------------------------------------------------------------------


def parse_option(
    option: str, value: str | None, parse: Callable[[str], T], *, clearable: bool = False
) -> T | Unset | None:
    """UNSET when the option was not given; None for ``none`` where a limit can be lifted."""
    if value is None:
        return UNSET
    if clearable and value.strip().lower() == CLEAR:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        hint = " (or 'none' to lift it)" if clearable else ""
        raise click.ClickException(f"{option}: {exc}{hint}") from None


def given(value: T | Unset | None) -> T | None:
    return None if value is UNSET else value


def positive_int(text: str) -> int:
    """A limit: a whole number that a BIGINT column holds (a database overflow would
    otherwise end the command in a driver's traceback)."""
    try:
        number = int(text.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a whole number >= 1, got {text!r}")
    if number > MAX_BIGINT:
        raise ValueError(f"expected a whole number at most {MAX_BIGINT}, got {text!r}")
    return number


def key_name(name: str) -> str:
    """The store's own name rule (``spigot.metering.check_key_name``), as a one-line error."""
    try:
        return check_key_name(name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def model_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError(f"expected model names separated by commas, got {text!r}")
    return names


def limit_options(*, clearable: bool) -> Callable[[Any], Any]:
    lift = f" '{CLEAR}' lifts it." if clearable else ""
    options = [
        click.option(
            "--budget-usd", metavar="USD", help=f"Spending limit in US dollars, e.g. 25.00.{lift}"
        ),
        click.option("--rpm", metavar="N", help=f"Requests per minute.{lift}"),
        click.option(
            "--tpm", metavar="N", help=f"Tokens per minute (prompt plus max output).{lift}"
        ),
        click.option("--max-concurrent", metavar="N", help=f"Requests running at once.{lift}"),
        click.option(
            "--models",
            metavar="A,B",
            help=f"The only models the key may use (the names clients send).{lift}",
        ),
        click.option(
            "--expires",
            metavar="30d|DATE",
            help="Expiry: a span from now (90m, 12h, 30d, 4w), a date (the key stops at 00:00 UTC "
            f"that day) or an ISO date-time with an offset.{lift}",
        ),
    ]

    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def parse_limits(
    budget_usd: str | None,
    rpm: str | None,
    tpm: str | None,
    max_concurrent: str | None,
    models: str | None,
    expires: str | None,
    *,
    clearable: bool,
) -> dict[str, Any]:
    """The store's keyword arguments; UNSET for each option not given."""
    return {
        "budget_pusd": parse_option("--budget-usd", budget_usd, parse_usd, clearable=clearable),
        "rpm": parse_option("--rpm", rpm, positive_int, clearable=clearable),
        "tpm": parse_option("--tpm", tpm, positive_int, clearable=clearable),
        "max_concurrent": parse_option(
            "--max-concurrent", max_concurrent, positive_int, clearable=clearable
        ),
        "models": parse_option("--models", models, model_names, clearable=clearable),
        "expires_at": parse_option("--expires", expires, parse_expiry, clearable=clearable),
    }


# -- output ----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """Columns two spaces apart; numbers right-aligned so their digits line up."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def dash(value: object) -> str:
    return "-" if value is None else str(value)


def short_time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M")


def echo_json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def describe(key: ApiKey) -> str:
    """One line: what the key is and what it may do."""
    view = key_dict(key)
    limits = [
        f"{label} {view[field]}"
        for label, field in (
            ("budget USD", "budget_usd"),
            ("rpm", "rpm"),
            ("tpm", "tpm"),
            ("max concurrent", "max_concurrent"),
        )
        if view[field] is not None
    ]
    if key.models is not None:
        limits.append(f"models {','.join(key.models)}")
    if key.expires_at is not None:
        limits.append(f"expires {view['expires_at']}")
    if key.admin:
        limits.append("admin")
    what = ", ".join(limits) if limits else "no limits"
    return f"key {key.id} {key.name!r} ({key.prefix}...): {what}"


# -- keys ------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """API keys: create, list, update and revoke them.

    Once any key exists, a server on the same database asks every request for one.
    """


@keys.command("create")
@click.option("--name", required=True, help="A unique name (not only digits).")
@limit_options(clearable=False)
@click.option("--admin", is_flag=True, help="May manage keys and read usage over /admin.")
@db_option
def keys_create(
    name: str,
    budget_usd: str | None,
    rpm: str | None,
    tpm: str | None,
    max_concurrent: str | None,
    models: str | None,
    expires: str | None,
    admin: bool,
    db_url: str,
) -> None:
    """Create a key and print its secret, once, alone on stdout:

    \b
      KEY=$(spigot keys create --name ci --budget-usd 25 --rpm 60 --expires 30d)

    Only a hash of the secret is stored: it cannot be shown again.
    """
    limits = parse_limits(budget_usd, rpm, tpm, max_concurrent, models, expires, clearable=False)
    name = key_name(name)  # before the database is opened (or made, for SQLite)
    with opened(db_url, must_exist=False) as store:
        try:
            key, secret = store.create_key(
                name, admin=admin, **{field: given(value) for field, value in limits.items()}
            )
        except ValueError as exc:  # the store's own checks, should one get past ours
            raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(f"created {describe(key)}; the secret will not be shown again", err=True)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@db_option
def keys_list(include_revoked: bool, fmt: str, db_url: str) -> None:
    """List keys (never their secrets: only the first characters, to tell them apart)."""
    with opened(db_url) as store:
        found = store.list_keys(include_revoked=include_revoked)
    if fmt == "json":
        echo_json({"object": "list", "data": [key_dict(key) for key in found]})
        return
    headers = (
        "id", "name", "prefix", "status", "created", "expires", "revoked", "budget_usd",
        "spent_usd", "rpm", "tpm", "max_concurrent", "models", "admin",
    )  # fmt: skip
    rows = []
    for key in found:
        view = key_dict(key)
        rows.append(
            [
                str(key.id),
                key.name,
                key.prefix,
                key_status(key),
                short_time(key.created_at),
                short_time(key.expires_at),
                short_time(key.revoked_at),
                dash(view["budget_usd"]),
                view["spent_usd"],
                dash(key.rpm),
                dash(key.tpm),
                dash(key.max_concurrent),
                "*" if key.models is None else ",".join(key.models),
                "yes" if key.admin else "no",
            ]
        )
    click.echo(table(headers, rows, numeric={0, 7, 8, 9, 10, 11}))


@keys.command("revoke")
@click.argument("id_or_name")
@db_option
def keys_revoke(id_or_name: str, db_url: str) -> None:
    """Revoke a key for good; requests it has running finish and are still billed."""
    with opened(db_url) as store:
        key = find_key(store, id_or_name)
        revoked = store.revoke_key(key.id)
        key = store.get_key(key.id) or key
    if revoked:
        click.echo(f"revoked key {key.id} {key.name!r}")
    else:
        when = short_time(key.revoked_at)
        click.echo(f"key {key.id} {key.name!r} was already revoked ({when} UTC)")


@keys.command("update")
@click.argument("id_or_name")
@click.option("--name", "new_name", metavar="NAME", help="Rename the key.")
@limit_options(clearable=True)
@click.option("--admin/--no-admin", default=None, help="Grant or withdraw /admin access.")
@db_option
def keys_update(
    id_or_name: str,
    new_name: str | None,
    budget_usd: str | None,
    rpm: str | None,
    tpm: str | None,
    max_concurrent: str | None,
    models: str | None,
    expires: str | None,
    admin: bool | None,
    db_url: str,
) -> None:
    """Change a key's name or limits; the others stay as they are.

    \b
      spigot keys update ci --rpm 120 --budget-usd none
    """
    changes = {
        field: value
        for field, value in parse_limits(
            budget_usd, rpm, tpm, max_concurrent, models, expires, clearable=True
        ).items()
        if value is not UNSET
    }
    if new_name is not None:
        changes["name"] = key_name(new_name)
    if admin is not None:
        changes["admin"] = admin
    if not changes:
        raise click.ClickException("nothing to change: give at least one option (see --help)")
    with opened(db_url) as store:
        key = find_key(store, id_or_name)
        try:
            key = store.update_key(key.id, **changes)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"updated {describe(key)}")


# -- usage -----------------------------------------------------------------------------------

GROUP_HEADERS: dict[str, tuple[str, ...]] = {
    "key": ("key_id", "key_name"),
    "model": ("model",),
    "day": ("day",),
}
NO_KEY_NAME = "(no key)"


@click.command()
@click.option("--key", "key_ref", metavar="ID_OR_NAME", help="Only this key's usage.")
@click.option(
    "--since",
    metavar="7d|DATE",
    help="From this UTC day on: a span back from now (24h, 7d) or a date (2026-11-01). "
    "Usage is kept per day, so 24h counts yesterday and today. Default: all of it.",
)
@click.option("--by", type=click.Choice(["key", "model", "day"]), default="key", show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@db_option
def usage(key_ref: str | None, since: str | None, by: UsageBy, fmt: str, db_url: str) -> None:
    """Requests, tokens and cost (USD), summed by key, model or day."""
    start = given(parse_option("--since", since, parse_since))
    with opened(db_url) as store:
        key_id = None if key_ref is None else find_key(store, key_ref).id
        rows = store.usage(since=start, key_id=key_id, by=by)
    report = usage_dict(rows, by, start)
    headers = (*GROUP_HEADERS[by], *USAGE_COUNTS, "cost_usd")
    if fmt == "json":
        echo_json(report)
        return
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        for item in report["data"]:
            writer.writerow(["" if item[h] is None else item[h] for h in headers])
        click.echo(out.getvalue(), nl=False)
        return
    cells = []
    for item in report["data"]:
        if by == "key" and item["key_id"] is None:
            item = {**item, "key_name": NO_KEY_NAME}
        cells.append([dash(item[h]) for h in headers])
    total = report["total"]
    groups = len(GROUP_HEADERS[by])
    cells.append(["total", *[""] * (groups - 1), *(str(total[h]) for h in headers[groups:])])
    click.echo(table(headers, cells, numeric=set(range(groups, len(headers)))))
    if start is not None:
        click.echo(f"since {since_day(start)} (whole UTC days)", err=True)
