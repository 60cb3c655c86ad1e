from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import RunningServer, start_server

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run a test under tests/e2e that lacks the ``e2e`` mark.

    ``-m "not e2e"`` must leave out every test that starts a real server, so each
    module there sets ``pytestmark = pytest.mark.e2e``.
    """
    unmarked = [
        item.nodeid
        for item in items
        if item.path.resolve().is_relative_to(E2E_DIR) and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests under tests/e2e without the e2e mark "
            "(add `pytestmark = pytest.mark.e2e` to the module):\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The shared server: the embedded model, eight parallel sequences.

    Without the prefix cache, so that a request's text can be compared with an
    earlier request's: reusing KV computed in another batch shape changes
    float rounding, which can flip greedy near-ties (docs/engine.md).
    tests/e2e/test_prefix_cache.py runs its own server with the cache on.
    """
    srv = start_server(
        "--parallel", "8", "--ctx-size", "8192", "--max-queue", "64", "--no-prefix-cache"
    )  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def base_url(server: RunningServer) -> str:
    return server.base_url
