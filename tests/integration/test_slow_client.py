"""A client that stops reading a large answer is told apart from an upstream that stops sending.

Through the real gateway on loopback: the upstream sends a large body as
fast as the gateway takes it; the client reads the head and then nothing.
The gateway pauses the upstream, waits CLIENT_TIMEOUT (not the upstream's
timeout), closes the client's connection and logs ``client_slow``; the
upstream is not blamed: no breaker failure, no upstream failure metric.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.support import listen, wait_until

BODY_BYTES = 32 * 1024 * 1024
"""More than the loopback socket buffers of both connections hold."""


class _Sender(protocol.Protocol):
    """An upstream that answers with a large body and keeps writing while it may."""

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.sent == 0 and b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.closed and self.sent < BODY_BYTES:
            piece = min(65536, BODY_BYTES - self.sent)
            self.sent += piece
            self.transport.write(b"x" * piece)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.closed = True

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


class _NonReader(protocol.Protocol):
    """Sends its request, reads the first bytes, then stops reading."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-Request-ID: slow\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.pauseProducing()  # and never resumes

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_client_slow(make_gateway, access_log):
    senders: list[_Sender] = []
    upstream = protocol.Factory.forProtocol(lambda: senders.append(_Sender()) or senders[-1])
    listening = listen(upstream)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="0.2", CLIENT_TIMEOUT="1",
            BREAKER_FAILURES="1",
        )
        client = _NonReader()
        reactor.connectTCP("127.0.0.1", gateway.port_number, protocol.ClientFactory.forProtocol(lambda: client))
        await wait_until(lambda: senders and senders[0].paused and client.received)
        started = reactor.seconds()
        await wait_until(lambda: any(e["request_id"] == "slow" for e in access_log), timeout=10)
        waited = reactor.seconds() - started
        [event] = [e for e in access_log if e["request_id"] == "slow"]
        assert (event["status_code"], event["outcome"]) == (499, "client_slow")
        assert "upstream_failure" not in event
        # Cut after CLIENT_TIMEOUT (1 s), not after STORAGE_TIMEOUT (0.2 s).
        assert waited >= 0.7
        assert client.received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert senders[0].sent < BODY_BYTES
        await wait_until(lambda: senders[0].closed)
        proxy = gateway.service.proxy
        assert {b.state for b in proxy.breakers.values()} == {"closed"}
        assert proxy.in_flight["storage"] == 0
        metrics = gateway.service.metrics.registry
        assert metrics.get_sample_value(
            "deltagw_upstream_failures_total", {"service": "storage", "reason": "body_timeout"}
        ) is None
        assert (await gateway.get("/health")).code == 200
    finally:
        await listening.port.stopListening()
