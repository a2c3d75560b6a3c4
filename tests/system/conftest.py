"""What the system tests share: a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, persistence off, stopped at teardown.

    Missing ``redis-server`` is a failure (`RedisServerError`), not a skip:
    CI installs it. A test may stop and start it again on the same port.
    """
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    if server.running:
        server.stop()
