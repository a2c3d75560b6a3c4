"""/health/ready tells the truth about the rate limiter, with a real redis-server.

A gateway with REDIS_URL is not ready until its limiter's first connection
attempt is over (connected, or failed and logged), and under
RATE_LIMIT_FAIL_CLOSED it is not ready while Redis is unreachable; /health
(liveness) answers 200 throughout. ``deltagw_rate_limiter_up`` on /metrics
says whether the backend answers, whatever the fail mode.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import protocol

from tests.support import listen, wait_until


async def _ready(gateway: Any) -> tuple[int, dict[str, Any]]:
    response = await gateway.get("/health/ready")
    return response.code, json.loads(await response.content())


async def _limiter_up(gateway: Any) -> float:
    """``deltagw_rate_limiter_up`` as the gateway's /metrics shows it."""
    response = await gateway.get("/metrics")
    text = (await response.content()).decode()
    values = [
        float(line.split()[1]) for line in text.splitlines()
        if line.startswith("deltagw_rate_limiter_up ")
    ]
    assert len(values) == 1, text
    return values[0]


async def _health(gateway: Any) -> int:
    response = await gateway.get("/health")
    await response.content()
    return response.code


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers (a Redis that hangs at the handshake)."""


@pytest_twisted.ensureDeferred
async def test_not_ready_until_the_first_attempt_is_over(make_gateway):
    """While the limiter's first connection hangs, /health is 200 and
    /health/ready 503 "connecting"; once the attempt has failed (the
    handshake timed out), fail-open is ready and says Redis is unavailable."""
    silent = listen(protocol.Factory.forProtocol(_Silent))
    try:
        port = silent.port.getHost().port
        gateway = await make_gateway(REDIS_URL=f"redis://127.0.0.1:{port}")
        assert await _health(gateway) == 200
        status, document = await _ready(gateway)
        assert status == 503 and document["status"] == "not_ready"
        assert document["rate_limiter"] == {"backend": "redis", "state": "connecting"}
        assert await _limiter_up(gateway) == 0.0
        await wait_until(lambda: gateway.service.limits.readiness()[1]["state"] != "connecting",
                         timeout=10)
        assert await _ready(gateway) == (200, {
            "status": "ready", "upstreams": {"auth": "closed", "storage": "closed",
                                             "analytics": "closed"},
            "rate_limiter": {"backend": "redis", "state": "unavailable"},
        })
        # Ready (fail-open lets requests through), yet the backend is down.
        assert await _limiter_up(gateway) == 0.0
    finally:
        await silent.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_redis_starting_late_under_fail_closed(make_gateway, redis_server, upstream):
    """Fail-closed, Redis not yet up: not ready (503) though alive; once Redis
    starts, ready, and the first requests after that spend the shared budget."""
    redis_server.stop()
    gateway = await make_gateway(
        REDIS_URL=f"redis://127.0.0.1:{redis_server.port}", RATE_LIMIT_FAIL_CLOSED="1",
        RATE_LIMIT_REQUESTS="2", STORAGE_SERVICE_URL=upstream.url,
    )
    await wait_until(lambda: gateway.service.limits.readiness()[1]["state"] == "unavailable",
                     timeout=10)
    assert await _health(gateway) == 200
    status, document = await _ready(gateway)
    assert status == 503 and document["rate_limiter"]["state"] == "unavailable"
    redis_server.start()
    await wait_until(lambda: gateway.service.limits.readiness()[0], timeout=15)
    status, document = await _ready(gateway)
    assert status == 200 and document["rate_limiter"] == {"backend": "redis", "state": "connected"}
    codes = []
    for _ in range(3):
        response = await gateway.get("/api/data/products")
        await response.content()
        codes.append(response.code)
    assert codes == [200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_redis_going_away_under_fail_closed(make_gateway, redis_server):
    """Fail-closed: ready while Redis answers, 503 once it is gone, ready again
    when it is back."""
    gateway = await make_gateway(
        REDIS_URL=f"redis://127.0.0.1:{redis_server.port}", RATE_LIMIT_FAIL_CLOSED="1",
    )
    await wait_until(lambda: gateway.service.limits.readiness()[0], timeout=10)
    assert (await _ready(gateway))[0] == 200
    assert await _limiter_up(gateway) == 1.0
    redis_server.stop()
    await wait_until(lambda: not gateway.service.limits.readiness()[0], timeout=10)
    status, document = await _ready(gateway)
    assert status == 503 and document["rate_limiter"]["state"] == "unavailable"
    assert await _limiter_up(gateway) == 0.0
    assert await _health(gateway) == 200
    redis_server.start()
    await wait_until(lambda: gateway.service.limits.readiness()[0], timeout=15)
    assert (await _ready(gateway))[0] == 200
    assert await _limiter_up(gateway) == 1.0


@pytest_twisted.ensureDeferred
async def test_in_process_limiter_is_ready_at_once(make_gateway):
    """Without REDIS_URL the buckets are in memory and ready from the start."""
    gateway = await make_gateway()
    status, document = await _ready(gateway)
    assert status == 200
    assert document["rate_limiter"] == {"backend": "memory", "state": "ready"}
    assert await _limiter_up(gateway) == 1.0
