from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import RunningServer, start_server


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
