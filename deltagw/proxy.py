"""Upstream calls: one pooled treq client, timeouts, and streaming back.

The response body is relayed chunk by chunk as it arrives, registered as a
push producer on the client's request so that a slow client slows the
upstream instead of filling the gateway's memory.
"""

from __future__ import annotations

from http.cookiejar import CookieJar
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from deltagw.errors import UpstreamUnavailable
from deltagw.headers import connection_named, copy_response_headers
from deltagw.routes import Service


class _ConnectionHonouringProtocol(_newclient.HTTP11ClientProtocol):
    """An HTTP/1.1 client protocol that drops the fields Connection names.

    Twisted's parser moves Connection itself into ``connHeaders``, so the
    fields it lists (RFC 9110 §7.6.1) would otherwise reach the client as if
    they were end-to-end. The parser is private to the protocol, so the one
    place that sees both is here.
    """

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        d = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is None:
            return d

        def drop_named(response: IResponse) -> IResponse:
            for name in connection_named(parser.connHeaders):
                response.headers.removeHeader(name)
            return response

        return d.addCallback(drop_named)


class _ConnectionHonouringFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> _newclient.HTTP11ClientProtocol:
        return _ConnectionHonouringProtocol(self._quiescentCallback)


class _NoCookies(CookieJar):
    """A jar that never stores: a shared jar would replay one user's upstream
    cookies to every other user. Client cookies still pass as plain headers."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


class UpstreamClient:
    """The process-wide HTTP client for every upstream call.

    One persistent pool keeps connections to each upstream alive between
    requests; its automatic retry is off because retrying is a policy
    decision (idempotency, deadlines) the gateway makes itself.
    """

    def __init__(
        self, reactor: Any, max_idle_per_host: int, idle_timeout: float
    ) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _ConnectionHonouringFactory
        self.pool.retryAutomatically = False
        self.pool.maxPersistentPerHost = max_idle_per_host
        self.pool.cachedConnectionTimeout = idle_timeout
        self.http = HTTPClient(Agent(reactor, pool=self.pool), cookiejar=_NoCookies())

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections; fires when they are closed."""
        return self.pool.closeCachedConnections()


def failure_reason(failure: Failure) -> str:
    """A short name for why an upstream call failed, for logs and metrics."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timeout"
    if failure.check(error.ConnectionRefusedError):
        return "refused"
    if failure.check(error.DNSLookupError, error.NoRouteError, error.ConnectError):
        return "unreachable"
    if failure.check(_newclient._WrapperException):
        reasons = failure.value.reasons
        if any(r.check(_newclient.ParseError, _newclient.BadHeaders) for r in reasons):
            return "invalid_response"
        return "reset"
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        return "reset"
    return "error"


class BodyInterrupted(Exception):
    """The upstream body stopped (stalled past the timeout, or was cut)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@implementer(IPushProducer)
class _BodyRelay(Protocol):
    """Writes the upstream body to the client as it arrives.

    A gap longer than ``idle_timeout`` between chunks ends the relay: the
    status line is already out, so the only honest signal left is to close
    the client connection (see ``Proxy.forward``).
    """

    def __init__(self, request: Any, reactor: IReactorTime, idle_timeout: float) -> None:
        self._request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer: Any = None
        self.done: defer.Deferred[None] = defer.Deferred(self._cancelled)

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._timer = self._reactor.callLater(self._idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        self._request.write(data)
        if self._timer.active():
            self._timer.reset(self._idle_timeout)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(BodyInterrupted("reset"))

    def _stalled(self) -> None:
        self.done.errback(BodyInterrupted("timeout"))
        self.transport.stopProducing()

    def _cancelled(self, _: defer.Deferred[None]) -> None:
        self.transport.stopProducing()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class Proxy:
    """Forwards one client request to its upstream and streams the answer."""

    def __init__(self, reactor: Any, client: UpstreamClient) -> None:
        self._reactor = reactor
        self._client = client

    async def forward(
        self,
        request: Any,
        service: Service,
        url: str,
        headers: Any,
        timeout: float,
    ) -> None:
        """Send ``request`` to ``url`` and relay the response to the client.

        Raises:
            UpstreamUnavailable: no response headers arrived (refused, reset,
                timed out, invalid HTTP); nothing has been written yet.
        """
        started = self._reactor.seconds()
        d = self._client.http.request(
            request.method.decode("ascii"),
            url,
            headers=headers,
            data=_body_of(request),
            unbuffered=True,
            allow_redirects=False,
        )
        d.addTimeout(timeout, self._reactor)
        try:
            response = await d
        except Exception:
            reason = failure_reason(Failure())
            request.note_upstream(service.name, started, reason)
            raise UpstreamUnavailable(service, reason) from None
        request.note_upstream(service.name, started, None)
        _undo_empty_content_encoding(response.headers)
        if response.code >= 400:
            request.outcome = "upstream_error"
        request.setResponseCode(response.code, response.phrase or None)
        copy_response_headers(response.headers, request.responseHeaders)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % response.length)
        relay = _BodyRelay(request, self._reactor, timeout)
        response.deliverBody(relay)
        try:
            await relay.done
        except BodyInterrupted as e:
            request.note_upstream(service.name, started, f"body_{e.reason}")
            await _abort(request)


def _undo_empty_content_encoding(headers: Any) -> None:
    """Remove the empty Content-Encoding that treq's decoder agent adds.

    ``ContentDecoderAgent`` rewrites the field even when the upstream sent
    none, leaving ``Content-Encoding:`` (empty) that the upstream never said.
    """
    if headers.getRawHeaders(b"content-encoding") == [b""]:
        headers.removeHeader(b"content-encoding")


def _body_of(request: Any) -> FileBodyProducer | None:
    """The buffered request body as a producer, or None when there is none."""
    content = request.content
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    if size == 0 and not request.requestHeaders.hasHeader(b"content-length"):
        return None
    return FileBodyProducer(content)


async def _abort(request: Any) -> None:
    """Close the client connection mid-response and wait until it is gone.

    Finishing the response normally would tell the client a truncated body
    was complete; an aborted connection cannot be mistaken for success.
    """
    finished = request.notifyFinish()
    request.transport.abortConnection()
    try:
        await finished
    except Exception:
        pass
