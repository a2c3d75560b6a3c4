"""Hostile or broken clients get a 4xx (or a closed connection), never a crash."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.web.server import NOT_DONE_YET

from tests.support import open_fds, raw_exchange, wait_until


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head
    if b"Transfer-Encoding: chunked" in head:
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return json.loads(body)


@pytest.mark.parametrize(
    "target",
    [
        b"/api/data/underlying/%ZZ",
        b"/api/data/underlying/NIFTY?x=%4",
        b"/api/data/underlying/%FF%FE",
        b"/api/data/underlying/NIFTY?q=%C3%28",
        b"/api/data/underlying/\xff\xfe",
        b"/api/data/underlying/NIFTY?q=\xe2\x82",
        b"/api/data/underlying/a%00b",
    ],
)
@pytest_twisted.ensureDeferred
async def test_unreadable_url_is_400_json(gateway, upstream, target):
    """Broken percent-encoding, non-UTF-8 or control bytes in a URL: 400 JSON, no upstream call."""
    raw = await raw_exchange(
        gateway.port_number, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert _status(raw) == 400
    assert "error" in _json_body(raw)
    assert upstream.seen == []
    assert (await gateway.get("/health")).code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET / HTTP/9.9 extra\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),
    ],
    ids=["garbage", "short", "bad-version", "bad-header", "oversized-header", "bad-length", "tls-hello"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_request_is_rejected_and_next_served(make_gateway, request_bytes, status):
    """A malformed request gets its 4xx in JSON at once and a closed connection; the next is served."""
    gateway = await make_gateway(CLIENT_TIMEOUT="5")
    raw = await raw_exchange(gateway.port_number, request_bytes, timeout=3)
    assert _status(raw) == status
    assert "error" in _json_body(raw)
    assert (await gateway.get("/health")).code == 200


@pytest_twisted.ensureDeferred
async def test_body_over_limit_is_413(make_gateway, upstream):
    """A body over MAX_BODY_BYTES is answered 413 and never forwarded."""
    gateway = await make_gateway(AUTH_SERVICE_URL=upstream.url, MAX_BODY_BYTES="1000")
    response = await gateway.request("POST", "/api/auth/register", data=b"x" * 1001)
    assert response.code == 413
    assert "error" in json.loads(await response.content())
    ok = await gateway.request("POST", "/api/auth/register", data=b"x" * 1000)
    await ok.content()
    assert ok.code == 200
    assert [len(seen.body) for seen in upstream.seen] == [1000]


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_is_413(make_gateway, upstream):
    """A chunked body is counted too, and dropped past the limit."""
    gateway = await make_gateway(AUTH_SERVICE_URL=upstream.url, MAX_BODY_BYTES="10")
    chunk = b"x" * 8
    raw = await raw_exchange(
        gateway.port_number,
        b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n8\r\n" + chunk + b"\r\n8\r\n" + chunk + b"\r\n0\r\n\r\n",
    )
    assert _status(raw) == 413
    assert upstream.seen == []


class _HalfSender(protocol.Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def connectionLost(self, reason=None) -> None:
        self.closed = True


async def _connect(port: int, data: bytes) -> _HalfSender:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    sender = _HalfSender(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), sender)
    return sender


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_request_leaves_gateway_serving(gateway, upstream):
    """A client that drops half-way through its request is forgotten; nothing is forwarded."""
    sender = await _connect(
        gateway.port_number, b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
    )
    sender.transport.loseConnection()
    await wait_until(lambda: sender.closed)
    assert (await gateway.get("/health")).code == 200
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_response_cancels_upstream(gateway, upstream):
    """A client that leaves while the upstream is still sending makes the gateway close the upstream call."""
    upstream.respond = lambda request, seen: (request.write(b"x" * 1000), NOT_DONE_YET)[1]
    sender = await _connect(gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: upstream.seen)
    sender.transport.abortConnection()
    await wait_until(lambda: upstream.connections_lost == 1)
    assert (await gateway.get("/health")).code == 200


@pytest_twisted.ensureDeferred
async def test_client_gone_before_upstream_answers_cancels_upstream(gateway, upstream):
    """A client that leaves while waiting for response headers cancels the upstream request."""
    upstream.respond = lambda request, seen: NOT_DONE_YET
    sender = await _connect(gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: upstream.seen)
    sender.transport.abortConnection()
    await wait_until(lambda: upstream.connections_lost == 1)


@pytest_twisted.ensureDeferred
async def test_idle_and_half_sent_connections_are_closed(make_gateway):
    """Connections that send nothing, or stop half-way, are closed after CLIENT_TIMEOUT."""
    gateway = await make_gateway(CLIENT_TIMEOUT="0.3")
    before = open_fds()
    idle = await _connect(gateway.port_number, b"")
    half = await _connect(gateway.port_number, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow")
    await wait_until(lambda: idle.closed and half.closed, timeout=5)
    await wait_until(lambda: open_fds() <= before)


@pytest_twisted.ensureDeferred
async def test_trickling_client_is_cut_off(make_gateway):
    """A client sending its request a byte at a time gets 408 and is closed after CLIENT_TIMEOUT."""
    from twisted.internet.task import LoopingCall

    gateway = await make_gateway(CLIENT_TIMEOUT="0.5")
    received: list[bytes] = []

    class Trickler(protocol.Protocol):
        closed = False

        def dataReceived(self, data):
            received.append(data)

        def connectionLost(self, reason=None):
            self.closed = True

    trickler = Trickler()
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), trickler)
    started = reactor.seconds()
    drip = LoopingCall(lambda: None if trickler.closed else trickler.transport.write(b"X"))
    trickler.transport.write(b"GET /health HTTP/1.1\r\nX-Slow: ")
    drip.clock = reactor
    drip.start(0.05)
    try:
        await wait_until(lambda: trickler.closed, timeout=5)
    finally:
        drip.stop()
    assert reactor.seconds() - started < 2
    assert b"".join(received).startswith(b"HTTP/1.1 408 Request Timeout")
    assert (await gateway.get("/health")).code == 200
