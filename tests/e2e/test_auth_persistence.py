"""Authentication never fails open, and ``n`` counts against a key's concurrency, end to end:
real ``spigot serve`` processes on one SQLite database, keys made and revoked with the
``spigot keys`` CLI, a restart in between.

Issue 13 found that with one key made and then revoked, a restarted server served everyone
without a key, and the revoked key worked again; and that a key limited to one request at a
time took every slot with ``n=72``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import RunningServer, spigot, start_server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
SERVE = ("--parallel", "4", "--ctx-size", "2048")


def chat(server: RunningServer, secret: str | None, **fields: Any) -> httpx.Response:
    headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 1,
        **fields,
    }
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers=headers, timeout=60)


def refused(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_a_revoked_last_key_keeps_keys_required_across_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    secret = spigot("keys", "create", "--name", "only", "--db", db).strip()
    assert secret.startswith("sk-spigot-")

    first = start_server("--db", db, *SERVE)
    try:
        assert chat(first, secret).status_code == 200
        assert "revoked key" in spigot("keys", "revoke", "only", "--db", db)
        error = refused(chat(first, secret), 401)
        assert "revoked" in error["message"] and error["code"] == "invalid_api_key"
        refused(chat(first, None), 401)
    finally:
        first.stop()

    # The restart: no live key is left in the database, but one existed.
    second = start_server("--db", db, *SERVE)
    try:
        assert "didn't provide an API key" in refused(chat(second, None), 401)["message"]
        assert "revoked" in refused(chat(second, secret), 401)["message"]
        refused(chat(second, "sk-spigot-" + "A" * 43), 401)
        models = httpx.get(f"{second.base_url}/models", timeout=10)
        assert models.status_code == 401, models.text
    finally:
        second.stop()


def test_n_counts_against_max_concurrent(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    one = spigot("keys", "create", "--name", "one", "--max-concurrent", "1", "--db", db).strip()
    two = spigot("keys", "create", "--name", "two", "--max-concurrent", "2", "--db", db).strip()
    server = start_server("--db", db, *SERVE)
    try:
        response = chat(server, one, n=3)
        error = refused(response, 429)
        # Waiting would not help: said so, and no Retry-After invites a retry.
        assert error["param"] == "n" and "waiting will not help" in error["message"]
        assert "retry-after" not in response.headers
        refused(chat(server, two, n=3), 429)
        done = chat(server, two, n=2)
        assert done.status_code == 200, done.text
        assert len(done.json()["choices"]) == 2
        assert chat(server, one, n=1).status_code == 200
        assert server.wait_idle()["in_flight"] == 0
    finally:
        server.stop()
