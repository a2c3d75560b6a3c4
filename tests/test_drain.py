"""Issue 6: graceful drain on stop and SIGTERM, and the readiness answer."""

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
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from deltagw.upstream.breaker import CircuitBreaker
from deltagw.process.drain import DrainService
from deltagw.web.request_tracker import RequestTracker
from deltagw.config import load_settings
from deltagw.web.site import GatewaySite
from deltagw.routes import ROUTES_BY_NAME
from tests.daemon import Daemon, parse_json_lines
from tests.support import wait_until


class _Pending(Resource):
    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class RunningClock(Clock):
    """A Clock that, like a running reactor, calls ``callWhenRunning`` callables at once."""

    running = True

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)


def _drain_service(grace: float = 5.0) -> tuple[DrainService, RequestTracker, Clock]:
    clock = RunningClock()
    tracker = RequestTracker(_Pending())
    breakers = {name: CircuitBreaker(name, clock, failures=1) for name in ("auth", "storage")}
    return DrainService(clock, tracker, breakers, grace), tracker, clock


def test_readiness_reports_breaker_states_then_draining() -> None:
    """Ready (200) with each upstream's breaker state; 503 "draining" once stopping."""
    drain, _, _ = _drain_service()
    drain.startService()
    drain._breakers["storage"].record_failure()
    assert drain.readiness() == (
        200, {"status": "ready", "upstreams": {"auth": "closed", "storage": "open"}}
    )
    drain.stopService()
    assert drain.readiness() == (
        503, {"status": "draining", "upstreams": {"auth": "closed", "storage": "open"}}
    )


def _request() -> DummyRequest:
    request = DummyRequest([b""])
    request.channel = http.HTTPChannel()
    return request


def test_stop_waits_for_in_flight_requests() -> None:
    """stopService fires only once the requests in flight have finished."""
    drain, tracker, clock = _drain_service(grace=5)
    drain.startService()
    request = _request()
    tracker.render(request)
    assert tracker.in_flight == 1
    stopped = drain.stopService()
    clock.advance(4)
    assert not stopped.called
    request.finish()
    assert stopped.called and tracker.in_flight == 0


def test_stop_gives_up_after_grace() -> None:
    """A request still running when the grace period ends no longer holds up the stop."""
    drain, tracker, clock = _drain_service(grace=5)
    drain.startService()
    tracker.render(_request())
    stopped = drain.stopService()
    clock.advance(4.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called


def test_requests_while_draining_close_their_connection() -> None:
    """A request answered during the drain says Connection: close and ends its keep-alive."""
    drain, tracker, _ = _drain_service()
    drain.startService()
    drain.stopService()
    request = _request()
    tracker.render(request)
    assert request.responseHeaders.getRawHeaders(b"connection") == [b"close"]
    assert request.channel.persistent is False


def test_drain_lasts_until_finished_responses_are_written() -> None:
    """A response finished during the drain holds the stop until its connection
    has closed, its buffered bytes written; a process exiting earlier drops them."""
    drain, tracker, _ = _drain_service()
    drain.startService()
    channel = GatewaySite(Resource(), load_settings({}), Clock()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    request = DummyRequest([b""])
    request.channel = channel
    tracker.render(request)
    stopped = drain.stopService()
    request.finish()
    assert transport.disconnecting and not stopped.called
    assert tracker.in_flight == 1
    channel.connectionLost(Failure(error.ConnectionDone()))
    assert stopped.called and tracker.in_flight == 0


def test_sigterm_is_left_alone_unless_the_reactor_owns_it() -> None:
    """Outside twistd (the reactor does not handle SIGTERM) the service installs no handler."""
    before = signal.getsignal(signal.SIGTERM)
    drain, _, _ = _drain_service()
    drain.startService()
    assert signal.getsignal(signal.SIGTERM) is before
    drain.stopService()


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


@pytest.mark.skipif("health_ready" not in ROUTES_BY_NAME, reason="/health/ready not wired yet")
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


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_in_flight_request_and_exits_0(upstream):
    """Under twistd, a request in flight at SIGTERM gets its real response and the process exits 0."""
    held: list[Any] = []
    upstream.respond = lambda request, seen: held.append(request) or NOT_DONE_YET
    daemon = Daemon.plugin("--storage-url", upstream.url, env={"SHUTDOWN_GRACE": "10"})
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
    daemon = Daemon.plugin("--storage-url", upstream.url, env={"SHUTDOWN_GRACE": "0.5"})
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
