"""Every outgoing_response log line says why the request ended as it did."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

from tests.support import RawUpstream, RecordingUpstream, closed_port_url, listen, wait_until


async def _outcome_of(access_log, gateway, path, **kwargs):
    response = await gateway.request(kwargs.pop("method", "GET"), path, **kwargs)
    await response.content()
    [request_id] = response.headers.getRawHeaders(b"x-request-id")
    await wait_until(lambda: any(e["request_id"] == request_id.decode() for e in access_log))
    return next(e for e in access_log if e["request_id"] == request_id.decode())["outcome"]


@pytest_twisted.ensureDeferred
async def test_outcomes_of_gateway_answers(make_gateway, upstream, access_log):
    """ok, upstream_error, bad_request, not_found, rate_limited and unauthorized."""
    # Four tokens: the 401 spends one too (the address pays for what no user does).
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="4")
    assert await _outcome_of(access_log, gateway, "/api/data/products") == "ok"
    upstream.respond = lambda request, seen: (request.setResponseCode(404), b"{}")[1]
    assert await _outcome_of(access_log, gateway, "/api/data/products") == "upstream_error"
    assert await _outcome_of(access_log, gateway, "/api/data/underlying/..") == "bad_request"
    assert await _outcome_of(access_log, gateway, "/nowhere") == "not_found"
    assert await _outcome_of(access_log, gateway, "/api/v1/user/me") == "unauthorized"
    assert await _outcome_of(access_log, gateway, "/api/data/products") == "rate_limited"
    assert await _outcome_of(access_log, gateway, "/health") == "ok"


@pytest.mark.parametrize(
    "behaviour, outcome",
    [("refused", "upstream_refused"), ("silent", "upstream_timeout"), ("reset", "upstream_reset")],
)
@pytest_twisted.ensureDeferred
async def test_outcomes_of_upstream_failures(make_gateway, access_log, behaviour, outcome):
    """Refused, silent and resetting upstreams are told apart in the log."""
    raw = listen(RawUpstream(lambda transport, _: transport.abortConnection()))
    silent = RecordingUpstream()
    silent.respond = lambda request, seen: NOT_DONE_YET
    quiet = listen(silent)
    urls = {"refused": closed_port_url(), "silent": quiet.url, "reset": raw.url}
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=urls[behaviour], STORAGE_TIMEOUT="0.2", RETRIES="0")
        assert await _outcome_of(access_log, gateway, "/api/data/products") == outcome
    finally:
        await raw.port.stopListening()
        await quiet.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_outcomes_circuit_open_and_auth_unavailable(make_gateway, access_log):
    """An open circuit and an unreachable auth service have outcomes of their own."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=closed_port_url(), AUTH_SERVICE_URL=closed_port_url(), BREAKER_FAILURES="1"
    )
    assert await _outcome_of(access_log, gateway, "/api/data/products") == "upstream_refused"
    assert await _outcome_of(access_log, gateway, "/api/data/products") == "circuit_open"
    bearer = {b"Authorization": [b"Bearer abc"]}
    assert await _outcome_of(access_log, gateway, "/api/user/me", headers=bearer) == "auth_unavailable"


@pytest_twisted.ensureDeferred
async def test_outcomes_shed_and_client_closed(make_gateway, upstream, access_log):
    """A saturated service sheds; a client that leaves is logged as client_closed."""
    held: list = []
    upstream.respond = lambda request, seen: (held.append(request), NOT_DONE_YET)[1]
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, MAX_IN_FLIGHT="1")

    class Leaver(Protocol):
        def connectionMade(self):
            self.transport.write(b"GET /api/data/products HTTP/1.1\r\nHost: x\r\nX-Request-ID: leaver\r\n\r\n")

    leaver = Leaver()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), leaver)
    await wait_until(lambda: held)
    # Another URL: the same one would wait for the held call (the cache's request coalescing).
    assert await _outcome_of(access_log, gateway, "/api/data/products?page=2") == "shed"
    leaver.transport.abortConnection()
    await wait_until(lambda: any(e["request_id"] == "leaver" for e in access_log))
    closed = next(e for e in access_log if e["request_id"] == "leaver")
    assert closed["outcome"] == "client_closed" and closed["status_code"] == 499
