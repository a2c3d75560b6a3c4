"""Reading a whole upstream body into memory, within a size and a deadline.

For the answers the gateway reads itself (a composed route's parts, the
auth service's verdict), never for a forwarded body, which is relayed as
it arrives. Works with both clients' responses (``deliverBody``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH


class BodyInterrupted(Exception):
    """The upstream body stopped (stalled past the timeout, or was cut)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _BodyCollector(Protocol):
    """Buffers a response body up to a size, before a deadline."""

    def __init__(self, reactor: IReactorTime, timeout: float, max_bytes: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._max_bytes = max_bytes
        self._timer = reactor.callLater(timeout, self.fail, "timeout")
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._max_bytes:
            self.fail("too_large")
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._timer.active():
            self._timer.cancel()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(BodyInterrupted("reset"))

    def fail(self, reason: str) -> None:
        """End the read with `BodyInterrupted` and close the connection."""
        if not self.done.called:
            self.done.errback(BodyInterrupted(reason))
        self._stop()

    def _stop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        # Stopping closes the connection: an unread body would otherwise
        # keep it out of the pool.
        if self.transport is not None:
            self.transport.stopProducing()


def read_body(
    response: Any, reactor: IReactorTime, timeout: float, max_bytes: int
) -> defer.Deferred[bytes]:
    """The whole body of ``response``; cancelling the Deferred stops the read.

    Raises (through the Deferred):
        BodyInterrupted: ``timeout``, ``too_large`` or ``reset``.
    """
    collector = _BodyCollector(reactor, timeout, max_bytes)
    response.deliverBody(collector)
    if response.length is not UNKNOWN_LENGTH and response.length > max_bytes:
        # Content-Length says it already: refuse before reading a byte.
        collector.fail("too_large")
    return collector.done
