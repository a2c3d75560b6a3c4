"""Test tiers by folder, and the fixtures the tiers share: real upstreams, a real gateway.

A test's folder is its tier and its marker: ``tests/unit`` (``-m unit``: Clock,
StringTransport, no socket), ``tests/integration`` (real sockets on loopback)
and ``tests/system`` (twistd subprocesses, Redis, Prometheus, deploy files).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from deltagw.logs import configure_structlog
from tests.daemon import Twistd
from tests.support import RecordingUpstream, RunningGateway, listen

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, the folder it lives in under tests/."""
    for item in items:
        parts = item.path.relative_to(Path(__file__).parent).parts
        if parts[0] not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/{{{','.join(TIERS)}}}/")
        item.add_marker(parts[0])


@pytest.fixture(autouse=True, scope="session")
def json_logs() -> None:
    """Log as the daemon does, so tests see the JSON events it writes."""
    configure_structlog()


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[Any]:
    """A recording upstream on a free loopback port (``.resource``, ``.url``)."""
    resource = RecordingUpstream()
    listening = listen(resource)
    resource.url = listening.url
    yield resource
    await listening.port.stopListening()


@pytest_twisted.async_yield_fixture
async def make_gateway() -> AsyncIterator[Callable[..., Any]]:
    """Start gateways with given environment settings; all stopped at teardown."""
    started: list[RunningGateway] = []

    async def start(**env: str) -> RunningGateway:
        gateway = RunningGateway(env)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


@pytest_twisted.async_yield_fixture
async def gateway(make_gateway: Callable[..., Any], upstream: RecordingUpstream) -> Any:
    """A gateway whose three services all point at the recording upstream."""
    yield await make_gateway(
        AUTH_SERVICE_URL=upstream.url,
        STORAGE_SERVICE_URL=upstream.url,
        ANALYTICS_SERVICE_URL=upstream.url,
    )


@pytest_twisted.async_yield_fixture
async def access_log():
    """The access log events written while the test runs."""
    events: list[dict] = []

    def collect(event):
        message = event.get("message")
        if event.get("_structlog") and "outgoing_response" in str(message):
            events.append(json.loads(str(message[0])))

    globalLogPublisher.addObserver(collect)
    yield events
    globalLogPublisher.removeObserver(collect)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """Start `Twistd` children in a scratch directory; all closed at teardown."""
    started: list[Twistd] = []

    def start(argv: Sequence[str], env: Mapping[str, str], **options: Any) -> Twistd:
        daemon = Twistd(argv, env, cwd=options.pop("cwd", tmp_path), **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
