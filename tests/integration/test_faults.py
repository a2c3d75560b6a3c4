"""Each upstream (and client) fault, its documented answer, and nothing leaked after it.

| fault | what the client gets |
|---|---|
| upstream refuses | 503 JSON, "<Service> service unavailable", Retry-After |
| upstream accepts, never answers | the same 503, after the service timeout |
| headers, then the body stalls | the status line and partial body, then the connection closes |
| upstream closes mid-body | the same: partial body, closed connection |
| invalid HTTP | 503 JSON |
| a 1 MB response header | 503 JSON (Twisted's client refuses over-long header lines) |
| slow-loris client (silent or trickling) | other clients are served; a request not complete within CLIENT_TIMEOUT gets a JSON 408 and the connection is closed |

After each, the gateway process holds no more file descriptors and no more
pooled upstream connections than before.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.support import RawUpstream, closed_port_url, listen, open_fds, raw_exchange, wait_until

GET = b"GET /api/data/products HTTP/1.1\r\nHost: gateway\r\n\r\n"


def _pooled(gateway: Any) -> int:
    return gateway.service.client.pool.idle_count


def _silent(transport: Any, _: bytes) -> None:
    """Accept, read the request, never answer."""


def _invalid(transport: Any, _: bytes) -> None:
    transport.write(b"HTTP/1.1 OK maybe\r\n\x00\x01\x02\r\n\r\n")
    transport.loseConnection()


def _huge_header(transport: Any, _: bytes) -> None:
    transport.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    transport.loseConnection()


def _stall_body(transport: Any, _: bytes) -> None:
    transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")


def _close_mid_body(transport: Any, _: bytes) -> None:
    transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    # After the gateway read the head: a reset discards unread data.
    reactor.callLater(0.05, transport.abortConnection)


async def _expect_503(gateway: Any) -> None:
    response = await gateway.get("/api/data/products")
    assert response.code == 503
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert int(response.headers.getRawHeaders(b"retry-after")[0]) >= 1
    assert json.loads(await response.content())["error"] == "Storage service unavailable"


async def _expect_cut_body(gateway: Any) -> None:
    received = await raw_exchange(gateway.port_number, GET)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 100" in head
    assert body == b"partial"  # and raw_exchange returned: the connection closed


@pytest.mark.parametrize(
    "behaviour, expect",
    [
        (None, _expect_503),  # nothing listening: refused
        (_silent, _expect_503),
        (_stall_body, _expect_cut_body),
        (_close_mid_body, _expect_cut_body),
        (_invalid, _expect_503),
        (_huge_header, _expect_503),
    ],
    ids=["refused", "never-answers", "stalls-after-headers", "closes-mid-body", "invalid-http", "1mb-header"],
)
@pytest_twisted.ensureDeferred
async def test_upstream_fault_gets_documented_answer_and_leaks_nothing(make_gateway, behaviour, expect):
    """Each upstream fault gets its documented answer; fds and pooled connections return to their level."""
    raw = RawUpstream(behaviour) if behaviour else None
    listening = listen(raw) if raw else None
    try:
        url = listening.url if listening else closed_port_url()
        gateway = await make_gateway(STORAGE_SERVICE_URL=url, STORAGE_TIMEOUT="0.3")
        fds, pooled = open_fds(), _pooled(gateway)
        for _ in range(3):
            await expect(gateway)
        await wait_until(lambda: open_fds() <= fds and _pooled(gateway) <= pooled)
        if raw is not None:
            await wait_until(lambda: raw.open == 0)
        assert (await gateway.get("/health")).code == 200
    finally:
        if listening is not None:
            await listening.port.stopListening()


class _Loris(protocol.Protocol):
    """Sends the first part of a request head, then nothing."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /api/data/products HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_slow_loris_clients_are_dropped_and_others_served(make_gateway, upstream):
    """Half-sent requests do not block other clients and get a 408 and a close after CLIENT_TIMEOUT."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, CLIENT_TIMEOUT="0.5", RATE_LIMIT_REQUESTS="0"
    )
    warm = await gateway.get("/api/data/products")  # the pooled upstream connection is part of the baseline
    await warm.content()
    fds, pooled = open_fds(), _pooled(gateway)
    lorises = [_Loris() for _ in range(50)]
    for loris in lorises:
        reactor.connectTCP("127.0.0.1", gateway.port_number, protocol.ClientFactory.forProtocol(lambda l=loris: l))
    await wait_until(lambda: all(l.transport and l.transport.connected for l in lorises))
    started = reactor.seconds()
    response = await gateway.get("/api/data/products")
    # Answered while every loris still holds its connection: none of them is in the way.
    assert response.code == 200 and not any(l.closed.called for l in lorises)
    await response.content()
    await defer.gatherResults([l.closed for l in lorises])
    assert reactor.seconds() - started >= 0.3
    assert all(l.received.startswith(b"HTTP/1.1 408 ") for l in lorises)
    await wait_until(lambda: open_fds() <= fds and _pooled(gateway) <= pooled)
