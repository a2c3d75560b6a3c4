"""The client connection's two clocks: the request deadline and the idle timeout.

Both are kept as due times checked by one reactor call per connection, not
as a reactor call made and cancelled for every request (bench/, issue 9);
these tests drive that call with a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from deltagw.config import load_settings
from deltagw.site import GatewaySite

REQUEST = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n"


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request):  # noqa: N802 (twisted.web's name)
        return b"ok"


def _connection(timeout: float = 10.0, resource: Resource | None = None):
    clock = Clock()
    site = GatewaySite(resource or _Ok(), load_settings({"CLIENT_TIMEOUT": str(timeout)}), clock)
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


def test_an_idle_connection_is_closed_after_the_timeout():
    """No request at all: closed once CLIENT_TIMEOUT has passed, not before."""
    clock, _, transport = _connection(10)
    _closes_when_idle_for(10, clock, transport)


def test_a_request_trickled_past_the_timeout_gets_408():
    """Bytes keep arriving, but the request is not whole within CLIENT_TIMEOUT."""
    clock, channel, transport = _connection(10)
    for byte in REQUEST[:-2]:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.disconnecting


def test_answering_takes_as_long_as_it_takes():
    """A request being answered is never timed out; the idle clock restarts after it."""
    clock, channel, transport = _connection(10, resource=_Never())
    channel.dataReceived(REQUEST)
    clock.advance(100)
    assert not transport.disconnecting and transport.value() == b""
    _Never.pending.pop().finish()
    assert transport.value().startswith(b"HTTP/1.1 200")
    _closes_when_idle_for(10, clock, transport)


def test_requests_on_a_connection_keep_one_reactor_call():
    """A thousand keep-alive requests leave one pending call, and the connection open."""
    clock, channel, transport = _connection(10)
    for _ in range(1000):
        channel.dataReceived(REQUEST)
        clock.advance(0.1)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1000
    assert len(clock.getDelayedCalls()) == 1
    assert not transport.disconnecting


def test_a_closed_connection_leaves_no_call_behind():
    """Closing cancels the connection's reactor call."""
    clock, channel, transport = _connection(10)
    channel.dataReceived(REQUEST)
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == []
    channel.setTimeout(10)  # what twisted.web does when a request ends
    assert clock.getDelayedCalls() == []


class _Never(Resource):
    """Answers only when the test finishes the request."""

    isLeaf = True
    pending: list = []

    def render_GET(self, request):  # noqa: N802
        self.pending.append(request)
        return NOT_DONE_YET
