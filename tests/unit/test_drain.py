"""The drain on a Clock: readiness, waiting for in-flight requests, the grace period, Connection: close."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from deltagw.config import load_settings
from deltagw.process.drain import DrainService
from deltagw.upstream.breaker import CircuitBreaker
from deltagw.web.request_tracker import RequestTracker
from deltagw.web.site import GatewaySite


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
