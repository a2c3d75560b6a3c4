"""A client that closes its connection, at any point of its request.

Through the real gateway on loopback, against upstreams that hold their
answer where the test wants it: the request is logged once as
``client_closed`` at level info, nothing is logged at level error (no
traceback), the upstream call is cancelled and no breaker failure is
counted.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.server import NOT_DONE_YET

from tests.support import RawUpstream, RecordingUpstream, listen, wait_until


class _Events:
    """Every log event of the test: the access log lines and anything at error level."""

    def __init__(self) -> None:
        self.access: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        text = str(event.get("message", ("",))[0]) if event.get("message") else ""
        if event.get("_structlog") and "outgoing_response" in text:
            self.access.append(json.loads(text))
        level = event.get("log_level")
        if event.get("isError") or (level is not None and level >= LogLevel.error):
            self.errors.append(text or str(event.get("log_format")) + repr(event.get("log_failure")))
        elif '"level": "error"' in text or '"level":"error"' in text:
            self.errors.append(text)

    def outcomes(self, request_id: str) -> list[tuple[int, str]]:
        return [(e["status_code"], e["outcome"]) for e in self.access if e["request_id"] == request_id]


@pytest_twisted.async_yield_fixture
async def events() -> Any:
    collected = _Events()
    globalLogPublisher.addObserver(collected)
    yield collected
    globalLogPublisher.removeObserver(collected)


class _Client(protocol.Protocol):
    """A raw client: sends its bytes, keeps what comes back, closes when told."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def _connect(port: int, data: bytes) -> _Client:
    client = _Client(data)
    endpoint_factory = protocol.ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port, endpoint_factory)
    await wait_until(lambda: client.transport is not None and client.transport.connected)
    return client


def _get(path: str, request_id: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-Request-ID: {request_id}\r\n\r\n".encode()


async def _assert_closed_cleanly(events: _Events, gateway: Any, request_id: str) -> None:
    await wait_until(lambda: events.outcomes(request_id))
    assert events.outcomes(request_id) == [(499, "client_closed")]
    proxy = gateway.service.proxy
    await wait_until(lambda: proxy.in_flight == {"auth": 0, "storage": 0, "analytics": 0})
    # BREAKER_FAILURES=1: one failure counted would have opened a circuit.
    assert {b.state for b in proxy.breakers.values()} == {"closed"}
    # A request after it is served as usual: the gateway is unharmed.
    assert (await gateway.get("/health")).code == 200
    assert events.errors == []


@pytest_twisted.ensureDeferred
async def test_closing_while_the_body_uploads(make_gateway, upstream, events):
    """Half a declared body, then gone: logged client_closed; nothing reaches the upstream."""
    gateway = await make_gateway(BREAKER_FAILURES="1", AUTH_SERVICE_URL=upstream.url)
    client = await _connect(
        gateway.port_number,
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nX-Request-ID: uploading\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
    )
    # TCP delivers the bytes before the close: the gateway reads the head first.
    client.transport.loseConnection()
    await client.closed
    await _assert_closed_cleanly(events, gateway, "uploading")
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_closing_while_waiting_for_the_upstream(make_gateway, upstream, events):
    """The upstream holds its answer; the client leaves: the upstream call is cancelled."""
    upstream.respond = lambda request, seen: NOT_DONE_YET
    gateway = await make_gateway(BREAKER_FAILURES="1", STORAGE_SERVICE_URL=upstream.url)
    client = await _connect(gateway.port_number, _get("/api/data/products", "waiting"))
    await wait_until(lambda: len(upstream.seen) == 1)
    client.transport.loseConnection()
    await wait_until(lambda: upstream.connections_lost == 1)
    await _assert_closed_cleanly(events, gateway, "waiting")


async def _leave_mid_body(make_gateway, events, head_and_part: bytes, request_id: str) -> None:
    """An upstream sends ``head_and_part`` and holds the rest; the client reads
    the part, then leaves: the upstream connection is cut, the request logged."""
    raw = RawUpstream(lambda transport, _: transport.write(head_and_part))
    listening = listen(raw)
    try:
        gateway = await make_gateway(BREAKER_FAILURES="1", STORAGE_SERVICE_URL=listening.url)
        client = await _connect(gateway.port_number, _get("/api/data/products", request_id))
        body = head_and_part.split(b"\r\n\r\n", 1)[1]
        await wait_until(lambda: body in client.received)
        assert client.received.startswith(head_and_part.split(b"\r\n", 1)[0])
        client.transport.loseConnection()
        await wait_until(lambda: raw.open == 0)
        await _assert_closed_cleanly(events, gateway, request_id)
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_closing_while_the_body_streams(make_gateway, events):
    """Head and part of a long body sent, the rest held: the client leaves, the upstream is cut."""
    await _leave_mid_body(
        make_gateway, events,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b" " * 65536, "streaming",
    )


@pytest_twisted.ensureDeferred
async def test_closing_while_an_upstream_error_streams(make_gateway, events):
    """The same with an upstream 404 being relayed: still client_closed, not upstream_error."""
    await _leave_mid_body(
        make_gateway, events,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", "error-streaming",
    )


@pytest_twisted.ensureDeferred
async def test_closing_during_a_composed_overview(make_gateway, events):
    """One part answered, two held: the client leaves, the held calls are cancelled."""
    storage = RecordingUpstream()
    analytics = RecordingUpstream()

    def storage_answer(request: Any, seen: Any) -> Any:
        if seen.uri.startswith(b"/underlying/"):
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"product": "NIFTY", "ticks": []}'
        return NOT_DONE_YET

    storage.respond = storage_answer
    analytics.respond = lambda request, seen: NOT_DONE_YET
    storage_listening, analytics_listening = listen(storage), listen(analytics)
    try:
        gateway = await make_gateway(
            BREAKER_FAILURES="1", STORAGE_SERVICE_URL=storage_listening.url, ANALYTICS_SERVICE_URL=analytics_listening.url
        )
        client = await _connect(gateway.port_number, _get("/api/bff/overview/NIFTY", "composing"))
        await wait_until(lambda: len(storage.seen) == 2 and len(analytics.seen) == 1)
        client.transport.loseConnection()
        await wait_until(lambda: storage.connections_lost == 1 and analytics.connections_lost == 1)
        await _assert_closed_cleanly(events, gateway, "composing")
    finally:
        await storage_listening.port.stopListening()
        await analytics_listening.port.stopListening()
