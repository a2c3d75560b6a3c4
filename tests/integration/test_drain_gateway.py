"""A running gateway stops listening at once and lets the request in flight finish; /health/ready."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

from tests.support import wait_until


@pytest_twisted.ensureDeferred
async def test_stopping_gateway_closes_port_and_finishes_in_flight(make_gateway, upstream):
    """Stopping the gateway refuses new connections at once and lets the request in flight finish."""
    held: list[Any] = []
    upstream.respond = lambda request, seen: held.append(request) or NOT_DONE_YET
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, SHUTDOWN_GRACE="5")
    in_flight = defer.ensureDeferred(gateway.get("/api/data/products"))
    await wait_until(lambda: held)
    stopped = gateway.service.stopService()
    with pytest.raises(error.ConnectionRefusedError):
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), Protocol())
    assert not stopped.called
    held[0].write(b'{"late":true}')
    held[0].finish()
    response = await in_flight
    assert (response.code, json.loads(await response.content())) == (200, {"late": True})
    await stopped


@pytest_twisted.ensureDeferred
async def test_ready_route_answers_breaker_states(gateway):
    """GET /health/ready answers 200 with every upstream's breaker state while serving."""
    response = await gateway.get("/health/ready")
    assert response.code == 200
    assert json.loads(await response.content()) == {
        "status": "ready",
        "upstreams": {"auth": "closed", "storage": "closed", "analytics": "closed"},
        "rate_limiter": {"backend": "memory", "state": "ready"},
    }
