"""The client connection's two clocks: the request deadline and the idle timeout.

Both behave the same with stock Twisted (SPEEDUPS=0: a reactor call for
each) and with the speedup that keeps them as due times checked by one
reactor call per connection; these tests drive them with a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from deltagw.config import load_settings
from deltagw.web.site import GatewaySite

REQUEST = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n"


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802 (twisted.web's name)
        return b"ok"


def _connection(timeout: float = 10.0, resource: Resource | None = None, speedups: str = "1"):
    clock = Clock()
    settings = load_settings({"CLIENT_TIMEOUT": str(timeout), "SPEEDUPS": speedups})
    site = GatewaySite(resource or _Ok(), settings, clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, channel, transport


def _closes_when_idle_for(seconds: float, clock: Clock, transport: StringTransport) -> None:
    """The connection stays open until it has been idle ``seconds``, then closes."""
    clock.advance(seconds - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


both_modes = pytest.mark.parametrize("speedups", ["1", "0"], ids=["speedups", "stock"])


@both_modes
def test_an_idle_connection_is_closed_after_the_timeout(speedups):
    """No request at all: closed once CLIENT_TIMEOUT has passed, not before."""
    clock, _, transport = _connection(10, speedups=speedups)
    _closes_when_idle_for(10, clock, transport)


@both_modes
def test_a_request_trickled_past_the_timeout_gets_408(speedups):
    """Bytes keep arriving, but the request is not whole within CLIENT_TIMEOUT."""
    clock, channel, transport = _connection(10, speedups=speedups)
    for byte in REQUEST[:-2]:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.disconnecting


@both_modes
def test_a_request_started_then_silent_gets_408(speedups):
    """One byte, then nothing: the idle timeout and the deadline fall due together; 408 either way."""
    clock, channel, transport = _connection(10, speedups=speedups)
    channel.dataReceived(REQUEST[:1])
    clock.advance(10)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.disconnecting


@both_modes
def test_answering_takes_as_long_as_it_takes(speedups):
    """A request being answered is never timed out; the idle clock restarts after it."""
    clock, channel, transport = _connection(10, resource=_Never(), speedups=speedups)
    channel.dataReceived(REQUEST)
    clock.advance(100)
    assert not transport.disconnecting and transport.value() == b""
    _Never.pending.pop().finish()
    assert transport.value().startswith(b"HTTP/1.1 200")
    _closes_when_idle_for(10, clock, transport)


@both_modes
def test_keep_alive_requests_are_answered_and_the_connection_kept(speedups):
    """A thousand keep-alive requests are answered, and the connection stays open."""
    clock, channel, transport = _connection(10, speedups=speedups)
    for _ in range(1000):
        channel.dataReceived(REQUEST)
        clock.advance(0.1)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1000
    assert not transport.disconnecting


def test_requests_on_a_connection_keep_one_reactor_call():
    """With the speedup, a thousand keep-alive requests leave one pending call."""
    clock, channel, transport = _connection(10)
    for _ in range(1000):
        channel.dataReceived(REQUEST)
        clock.advance(0.1)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1000
    assert len(clock.getDelayedCalls()) == 1
    assert not transport.disconnecting


@both_modes
def test_a_closed_connection_leaves_no_call_behind(speedups):
    """Closing cancels the connection's reactor calls, mid-request too."""
    clock, channel, transport = _connection(10, speedups=speedups)
    channel.dataReceived(REQUEST + REQUEST[:5])
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_a_closed_connection_makes_no_new_call():
    """With the speedup, twisted.web turning the idle timeout on after the
    connection is gone (as it does when a request ends) makes no call."""
    clock, channel, transport = _connection(10)
    channel.dataReceived(REQUEST)
    channel.connectionLost(None)
    channel.setTimeout(10)
    assert clock.getDelayedCalls() == []


class _Never(Resource):
    """Answers only when the test finishes the request."""

    isLeaf = True
    pending: list = []

    def render_GET(self, request):  # noqa: N802
        self.pending.append(request)
        return NOT_DONE_YET
