"""Time logic of the proxy, driven by task.Clock: header timeout and body gaps."""

from __future__ import annotations

import io

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from deltagw.errors import UpstreamUnavailable
from deltagw.routes import STORAGE
from deltagw.upstream.body import BodyInterrupted
from deltagw.upstream.client import NoResponse
from deltagw.upstream.failures import failure_reason
from deltagw.upstream.proxy import ClientTooSlow, Proxy, _BodyRelay


class FakeRequest:
    """Just what Proxy touches on a server request."""

    def __init__(self) -> None:
        self.method = b"GET"
        self.content = io.BytesIO()
        self.requestHeaders = Headers()
        self.written: list[bytes] = []
        self.producer = None
        self.upstream_notes: list[str | None] = []
        self.channel = object()  # the client is still connected

    def note_upstream(self, service, started, failure):
        self.upstream_notes.append(failure)

    def write(self, data):
        self.written.append(data)

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class HangingClient:
    """An HTTP client whose requests never get an answer until cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.pool = self

    def request(self, *args, **kwargs):
        def cancel(d):
            self.cancelled += 1

        return defer.Deferred(cancel)


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def _forward(proxy: Proxy, request: FakeRequest) -> defer.Deferred:
    """``request`` forwarded to the storage service, with a 10 s timeout."""
    return defer.ensureDeferred(
        proxy.forward(request, STORAGE, "http://s/products", Headers(), 10, request.note_upstream)
    )


class AbortingClient(HangingClient):
    """Cancelling fails the call as the forward client does once a request is
    on a connection: `NoResponse`, its reason the CancelledError."""

    def request(self, *args, **kwargs):
        def cancel(d):
            self.cancelled += 1
            d.errback(NoResponse([Failure(defer.CancelledError())]))

        return defer.Deferred(cancel)


@pytest.mark.parametrize("client_kind", [HangingClient, AbortingClient])
def test_header_timeout_cancels_and_answers_503(client_kind):
    """No response headers within the service timeout: the call is cancelled and becomes a 503,
    whatever the cancelled call failed with (not taken for a client that left)."""
    clock = Clock()
    client = client_kind()
    request = FakeRequest()
    d = _forward(Proxy(clock, client), request)
    clock.advance(9.999)
    assert not d.called and client.cancelled == 0
    clock.advance(0.001)
    failure = _failure_of(d)
    assert isinstance(failure.value, UpstreamUnavailable)
    assert failure.value.reason == "timeout"
    assert failure.value.status == 503
    assert failure.value.message == "Storage service unavailable"
    assert client.cancelled == 1
    assert request.upstream_notes == ["timeout"]


def test_a_client_that_leaves_cancels_the_header_timer():
    """Cancelled before its headers (the client left): no timer is left behind,
    and nothing is noted against the upstream."""
    clock = Clock()
    client = AbortingClient()
    request = FakeRequest()
    proxy = Proxy(clock, client)
    d = _forward(proxy, request)
    d.cancel()
    assert isinstance(_failure_of(d).value, defer.CancelledError)
    assert not clock.getDelayedCalls()
    assert client.cancelled == 1 and request.upstream_notes == []


def test_body_gap_longer_than_timeout_stops_relay():
    """A gap between body chunks longer than the timeout stops the upstream and fails the relay."""
    clock = Clock()
    request = FakeRequest()
    relay = _BodyRelay(request, clock, 5, 60)
    transport = FakeTransport()
    relay.makeConnection(transport)
    assert request.producer is relay
    clock.advance(4)
    relay.dataReceived(b"a")
    clock.advance(4)
    relay.dataReceived(b"b")
    assert not relay.done.called
    clock.advance(5)
    assert transport.calls == ["stop"]
    failure = _failure_of(relay.done)
    assert isinstance(failure.value, BodyInterrupted) and failure.value.reason == "timeout"
    relay.connectionLost(Failure(ResponseDone()))
    assert request.written == [b"a", b"b"]
    assert request.producer is None


def test_relay_completes_and_forwards_backpressure():
    """Pause/resume from the client reach the upstream; a finished body fires the relay."""
    clock = Clock()
    request = FakeRequest()
    relay = _BodyRelay(request, clock, 5, 60)
    transport = FakeTransport()
    relay.makeConnection(transport)
    relay.pauseProducing()
    relay.resumeProducing()
    relay.connectionLost(Failure(ResponseDone()))
    assert transport.calls == ["pause", "resume"]
    assert relay.done.called and not clock.getDelayedCalls()


def test_a_paused_relay_waits_for_the_client_not_the_upstream():
    """Paused by a full client connection, the relay's upstream clock stops and the
    client's runs: past CLIENT_TIMEOUT it fails with ClientTooSlow, not BodyInterrupted."""
    clock = Clock()
    request = FakeRequest()
    relay = _BodyRelay(request, clock, 5, 60)
    transport = FakeTransport()
    relay.makeConnection(transport)
    relay.dataReceived(b"a")
    relay.pauseProducing()
    clock.advance(59)
    assert not relay.done.called and transport.calls == ["pause"]
    relay.resumeProducing()  # the client read: the clock is the upstream's again
    clock.advance(4)
    relay.dataReceived(b"b")
    relay.pauseProducing()
    clock.advance(60)
    assert transport.calls == ["pause", "resume", "pause", "stop"]
    assert isinstance(_failure_of(relay.done).value, ClientTooSlow)
    assert request.upstream_notes == []


def test_cancelling_relay_stops_upstream():
    """A client that goes away cancels the relay, which stops the upstream body."""
    clock = Clock()
    relay = _BodyRelay(FakeRequest(), clock, 5, 60)
    transport = FakeTransport()
    relay.makeConnection(transport)
    relay.done.addErrback(lambda f: f.trap(defer.CancelledError))
    relay.done.cancel()
    assert transport.calls == ["stop"]


@pytest.mark.parametrize(
    "exception, reason",
    [
        (defer.TimeoutError(), "timeout"),
        (error.ConnectionRefusedError(), "refused"),
        (error.DNSLookupError(), "unreachable"),
        (ValueError(), "error"),
    ],
)
def test_failure_reasons(exception, reason):
    """Upstream failures map to the short reasons logged and counted."""
    assert failure_reason(Failure(exception)) == reason


def _failure_of(d: defer.Deferred) -> Failure:
    results: list[Failure] = []
    d.addErrback(results.append)
    assert results, "Deferred has not failed"
    return results[0]
