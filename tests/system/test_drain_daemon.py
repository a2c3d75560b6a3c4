"""Under twistd, SIGTERM drains the requests in flight and the process exits 0."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

from tests.daemon import Twistd, parse_json_lines
from tests.support import wait_until


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_in_flight_request_and_exits_0(upstream):
    """Under twistd, a request in flight at SIGTERM gets its real response and the process exits 0."""
    held: list[Any] = []
    upstream.respond = lambda request, seen: held.append(request) or NOT_DONE_YET
    daemon = Twistd.plugin("--storage-url", upstream.url, env={"SHUTDOWN_GRACE": "10"})
    try:
        port = await daemon.port()
        in_flight = defer.ensureDeferred(treq.get(f"http://127.0.0.1:{port}/api/data/products"))
        await wait_until(lambda: held)
        daemon.process.send_signal(signal.SIGTERM)
        await wait_until(lambda: "drain_started" in daemon.output(), timeout=10)

        async def refused() -> bool:
            try:
                connected = await connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol()
                )
            except error.ConnectionRefusedError:
                return True
            connected.transport.loseConnection()
            return False

        assert await refused()
        assert daemon.process.poll() is None  # still draining
        held[0].write(b'{"answer":42}')
        held[0].finish()
        response = await in_flight
        assert (response.code, json.loads(await response.content())) == (200, {"answer": 42})
        await wait_until(lambda: daemon.process.poll() is not None, timeout=10)
    finally:
        status = await daemon.stop()
    assert status == 0, daemon.output()
    events = [e.get("event") for e in parse_json_lines(daemon.lines())]
    assert events.index("shutdown_requested") < events.index("drain_started") < events.index(
        "drain_finished"
    )


@pytest_twisted.ensureDeferred
async def test_sigterm_exits_0_after_grace_with_request_still_running(upstream):
    """A request outlasting SHUTDOWN_GRACE is cut (connection closed) and the process still exits 0."""
    held: list[Any] = []
    upstream.respond = lambda request, seen: held.append(request) or NOT_DONE_YET
    daemon = Twistd.plugin("--storage-url", upstream.url, env={"SHUTDOWN_GRACE": "0.5"})
    try:
        port = await daemon.port()
        in_flight = defer.ensureDeferred(treq.get(f"http://127.0.0.1:{port}/api/data/products"))
        await wait_until(lambda: held)
        started = reactor.seconds()
        daemon.process.send_signal(signal.SIGTERM)
        await wait_until(lambda: daemon.process.poll() is not None, timeout=10)
        assert 0.5 <= reactor.seconds() - started < 5
        with pytest.raises(Exception):
            await in_flight
    finally:
        status = await daemon.stop()
    await wait_until(lambda: upstream.connections_lost == 1)  # the gateway's exit cut it
    assert status == 0, daemon.output()
    assert "drain_timeout" in daemon.output()
