"""``--db`` for the commands that work on the metering database itself, and opening it.

Failures become one ``Error: ...`` line (a ClickException), with any PostgreSQL
password masked: drivers may quote the URL in their messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from spigot.metering import SchemaTooNew, Store, StoreError, open_store
from spigot.metering.db import is_postgres_url, sqlite_path


def db_option(fn: Any) -> Any:
    return click.option(
        "--db",
        "db_url",
        default="spigot.db",
        envvar="SPIGOT_DB",
        show_default=True,
        metavar="PATH|URL",
        help="The metering database: a SQLite file, or postgresql://user@host/dbname.",
    )(fn)


def shown_url(url: str) -> str:
    """A URL fit for an error message: a PostgreSQL password is masked."""
    if not is_postgres_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # too malformed to find the password in: show none of it
        return url.split("//", 1)[0] + "//..."
    password = _password(url)
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _password(url: str) -> str | None:
    if not is_postgres_url(url):
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redacted(message: object, url: str) -> str:
    """A driver's message about ``url`` (psycopg may quote the URL, password and all)."""
    text = str(message).strip().replace(url, shown_url(url))
    password = _password(url)
    return text if not password else text.replace(password, "***")


def _driver_errors(url: str) -> tuple[type[BaseException], ...]:
    """What the drivers raise beyond StoreError (a malformed URL, a missing grant, a file
    that is not a database): reported, not shown as tracebacks."""
    if is_postgres_url(url):
        import psycopg  # only a PostgreSQL URL needs the driver loaded

        return (StoreError, psycopg.Error)
    return (StoreError, sqlite3.Error)


@contextmanager
def opened(url: str, *, must_exist: bool = True) -> Iterator[Store]:
    """The store at ``url``, closed afterwards; its failures become ClickExceptions.

    ``must_exist``: a SQLite file that is not there is an error rather than a new empty
    database, so a mistyped ``--db`` on ``keys list`` does not answer "no keys".
    """
    shown = shown_url(url)
    if must_exist and not is_postgres_url(url):
        path = sqlite_path(url)
        if path != ":memory:" and not Path(path).expanduser().exists():
            raise click.ClickException(
                f"no database at {path} (pass --db or set SPIGOT_DB; `spigot keys create` "
                "makes one)"
            )
    errors = _driver_errors(url)
    try:
        store = open_store(url)
    except SchemaTooNew as exc:
        raise click.ClickException(f"{shown}: {exc}") from None
    except errors as exc:
        raise click.ClickException(
            f"cannot open the database {shown}: {redacted(exc, url)}"
        ) from None
    try:
        yield store
    except errors as exc:
        # KeyNotFound and DuplicateKeyName say what happened in their own words.
        raise click.ClickException(redacted(exc, url)) from None
    finally:
        store.close()
