from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import RunningServer, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The shared server: the embedded model, eight parallel sequences."""
    srv = start_server("--parallel", "8", "--ctx-size", "8192", "--max-queue", "64")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def base_url(server: RunningServer) -> str:
    return server.base_url
