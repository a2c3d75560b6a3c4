"""The HTTP front door: per-request state, the body limit and the access log.

twisted.web buffers a request body before any resource sees it, so the size
limit has to live in the request object: past MAX_BODY_BYTES the bytes are
counted and dropped, never stored, and the edge answers 413.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer
from twisted.web import http, server

from deltagw.errors import BadRequest, json_body, problem_document, upstream_outcome
from deltagw.logs import get_logger
from deltagw.metrics import Metrics
from deltagw.speedups import held_writes

_access_log = get_logger(component="access")

class _CappedBody(io.BytesIO):
    """A request body buffer that stops storing past its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    @property
    def too_large(self) -> bool:
        return self.received > self.limit

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.received += len(data)
        if self.received > self.limit:
            return len(data)
        return super().write(data)


class GatewayRequest(server.Request):
    """A request that carries what the edge and the access log need.

    Attributes:
        request_id: The id sent upstream and returned to the client.
        client_address: The client as far as the gateway believes it.
        started: ``reactor.seconds()`` when processing began.
        route: The route template (never the raw path), for logs and metrics.
        log_fields: Extra fields for the ``outgoing_response`` event.
        outcome: Why the request ended the way it did.
    """

    request_id: bytes = b""
    client_address: str = "-"
    started: float = 0.0
    route: str | None = None
    outcome: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_fields: dict[str, Any] = {}

    def gotLength(self, length: int | None) -> None:
        self.content = _CappedBody(self.channel.site.settings.max_body_bytes)

    @property
    def body_too_large(self) -> bool:
        return self.content.too_large

    def note_upstream(self, service: str, started: float, failure: str | None) -> None:
        """Record an upstream call for the access log."""
        # self.site, not self.channel.site: a client that left has already
        # cut the channel loose, and its cancelled upstream call still reports.
        site = self.site
        elapsed = site.reactor.seconds() - started
        self.log_fields["upstream"] = service
        self.log_fields["upstream_latency_ms"] = round(elapsed * 1000, 3)
        if site.metrics is not None:
            held_writes.after_sending(
                site.reactor, site.metrics.observe_upstream, service, elapsed, failure
            )
        if failure is not None:
            self.log_fields["upstream_failure"] = failure
            self.outcome = self.outcome or upstream_outcome(failure)

    def connectionLost(self, reason: Any) -> None:
        if not self.finished and self.started:
            self.outcome = self.outcome or "client_closed"
            self.site.log(self, status=499)
        super().connectionLost(reason)


def _raw_error(status: int, phrase: bytes, message: str) -> bytes:
    """A whole JSON error response, for answers made before any request exists."""
    body = json_body(problem_document(status, message, None))
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
    )


_MALFORMED_RESPONSE = _raw_error(400, b"Bad Request", "Malformed HTTP request")
_TIMEOUT_RESPONSE = _raw_error(408, b"Request Timeout", "Request not received in time")


class GatewayChannel(http.HTTPChannel):
    """An HTTP channel whose answer to unparsable requests is JSON too.

    twisted.web rejects a malformed request line or header block before any
    resource runs, with a bare 400; this keeps that one answer in the
    gateway's error shape. (The hook is private to twisted.web; it is the
    only place the rejection happens.)
    """

    _closed = False
    _host: Any = None
    _secure: bool | None = None
    _request_due: float | None = None
    """When the request being received must be complete (CLIENT_TIMEOUT)."""
    _idle_due: float | None = None
    """When the connection, idle, is closed (twisted.web's ``timeOut``)."""
    _clock_call: Any = None
    """The one reactor call that looks at both."""

    def connectionMade(self) -> None:
        super().connectionMade()
        held_writes.adopt(self.transport)
        self._close_waiters: list[defer.Deferred[None]] = []

    def getHost(self) -> Any:
        # twisted.web asks for every request (Request.__init__), and each
        # answer is a getsockname() call; the local address of a connection
        # does not change.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        # An interface adaptation per request (to build X-Forwarded-Proto);
        # whether the transport is TLS does not change.
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def when_closed(self) -> defer.Deferred[None]:
        """A Deferred that fires once the connection is closed.

        After ``loseConnection`` that is when the last buffered byte has
        been written: what a draining process waits for before it exits.
        """
        if self._closed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def dataReceived(self, data: bytes) -> None:
        # twisted.web's idle timeout restarts on every byte, so a client
        # trickling a request (slow loris) would hold its connection for
        # ever; the whole request must arrive within CLIENT_TIMEOUT.
        if self._request_due is None and not self._handlingRequest:
            self._request_due = self._due_in(self.site.settings.client_timeout)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._request_due = None
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._request_due = None
        super().connectionLost(reason)
        if self._clock_call is not None and self._clock_call.active():
            self._clock_call.cancel()
        self._clock_call = None
        self._closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def setTimeout(self, period: float | None) -> float | None:
        # TimeoutMixin cancels its reactor call when the timeout is turned
        # off and makes a new one when it is turned on, and twisted.web does
        # both for every request; here the due time is a number, and one
        # reactor call per connection checks it (bench/, issue 9).
        previous, self.timeOut = self.timeOut, period
        self._idle_due = None if period is None else self._due_in(period)
        return previous

    def resetTimeout(self) -> None:
        if self._idle_due is not None and self.timeOut is not None:
            self._idle_due = self.site.reactor.seconds() + self.timeOut

    def _due_in(self, seconds: float) -> float:
        """The time ``seconds`` from now, with the clock call due by then."""
        due = self.site.reactor.seconds() + seconds
        call = self._clock_call
        if call is not None:
            if due < call.getTime():
                call.reset(seconds)
        elif not self._closed:
            self._clock_call = self.callLater(seconds, self._clock_struck)
        return due

    def _clock_struck(self) -> None:
        self._clock_call = None
        now = self.site.reactor.seconds()
        if self._request_due is not None and now >= self._request_due:
            self._request_due = None
            self._request_too_slow()
        elif self._idle_due is not None and now >= self._idle_due:
            self._idle_due = None
            self.timeoutConnection()
        else:
            pending = [due for due in (self._request_due, self._idle_due) if due is not None]
            if pending:
                # At least a millisecond: a call can come a rounding error early.
                wait = max(min(pending) - now, 0.001)
                self._clock_call = self.callLater(wait, self._clock_struck)

    def _request_too_slow(self) -> None:
        _access_log.msg(
            "request_timeout",
            client=getattr(self.transport.getPeer(), "host", "-"),
            outcome="client_timeout",
        )
        self.transport.write(_TIMEOUT_RESPONSE)
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        _access_log.msg("malformed_request", client=getattr(self.transport.getPeer(), "host", "-"),
                        outcome=BadRequest.outcome)
        self.transport.write(_MALFORMED_RESPONSE)
        self.loseConnection()


class GatewaySite(server.Site):
    """A Site that logs one ``outgoing_response`` JSON event per request."""

    requestFactory = GatewayRequest
    protocol = GatewayChannel

    def __init__(
        self, resource: Any, settings: Any, reactor: Any, metrics: Metrics | None = None
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=settings.client_timeout)
        self.settings = settings
        self.reactor = reactor
        self.metrics = metrics

    def log(  # type: ignore[override]
        self, request: GatewayRequest, status: int | None = None
    ) -> None:
        """Log a finished (or, with ``status`` 499, abandoned) request, once
        its answer has been sent."""
        if request.started:
            ended = self.reactor.seconds()
            held_writes.after_sending(
                self.reactor, self.log_response, request, status or request.code, ended
            )

    def log_response(self, request: GatewayRequest, status: int, ended: float) -> None:
        """Write the access log event and the metrics of a request."""
        outcome = request.outcome or ("ok" if status < 400 else "error")
        latency = ended - request.started
        if self.metrics is not None:
            self.metrics.observe_request(request.route, request.method, status, latency)
        _access_log.msg(
            "outgoing_response",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            route=request.route,
            status_code=status,
            latency_ms=round(latency * 1000, 3),
            request_id=request.request_id.decode("ascii"),
            client=request.client_address,
            outcome=outcome,
            **request.log_fields,
        )
