"""The HTTP front door: the client connection, per-request state and the access log.

twisted.web buffers a request body before any resource sees it; the body
limit (MAX_BODY_BYTES) is enforced before that, by `deltagw.web.request_framing`,
so a body that reaches a request is one the gateway accepts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.web import http, server

from deltagw.errors import (
    BadRequest,
    PayloadTooLarge,
    json_body,
    problem_document,
    reason_phrase,
    upstream_outcome,
)
from deltagw.logs import LineLogger
from deltagw.metrics import Metrics
from deltagw.speedups import channel_clock, held_writes
from deltagw.upstream.proxy import RelayEnding
from deltagw.web.request_framing import RequestFramer, RequestRejected
from deltagw.web.request_identity import TraceContext, client_address, request_id

_access_log = LineLogger(component="access")


class GatewayRequest(server.Request):
    """A request that carries what the edge and the access log need.

    Attributes:
        request_id: The id sent upstream and returned to the client.
        client_address: The client as far as the gateway believes it.
        started: ``reactor.seconds()`` when its head had arrived.
        route: The route template (never the raw path), for logs and metrics.
        log_fields: Extra fields for the ``outgoing_response`` event.
        outcome: Why the request ended the way it did.
        trace: The W3C trace context it continues (set before routing).
        site: The `GatewaySite` it arrived at (twisted.web sets it once the
            body is in; set here with the head).
        ended: Whether the response is finished or the client has gone.
    """

    request_id: bytes = b""
    client_address: str = "-"
    started: float = 0.0
    route: str | None = None
    outcome: str | None = None
    trace: TraceContext | None = None
    site: GatewaySite
    ended = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_fields: dict[str, Any] = {}
        self._when_ended: list[Callable[[], object]] = []

    def when_ended(self, call: Callable[[], object]) -> None:
        """Call ``call()`` once, when the response is finished or the client has gone.

        What ``notifyFinish`` tells, without a Deferred and its callbacks
        for each request's handler; asked once it has ended, at once.
        """
        if self.ended:
            call()
        else:
            self._when_ended.append(call)

    def finish(self) -> None:
        super().finish()
        self._end()

    def _end(self) -> None:
        self.ended = True
        calls, self._when_ended = self._when_ended, []
        for call in calls:
            call()

    def gotLength(self, length: int | None) -> None:
        """The head has arrived: what the access log needs is known from here on.

        twisted.web sets the method and target only once the body is in;
        set now, a request whose client leaves during its body is logged
        like any other.
        """
        # In memory: the framer has bounded it by MAX_BODY_BYTES already.
        self.content = io.BytesIO()
        channel = self.channel
        self.site = channel.site
        self.started = self.site.reactor.seconds()
        self.method, self.uri, _ = channel.request_line().split(b" ", 2)
        self.path = self.uri.split(b"?", 1)[0]
        self.request_id = request_id(self.getHeader(b"x-request-id"))
        self.client_address = client_address(
            getattr(self.getClientAddress(), "host", "-"),
            self.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
            self.site.settings.trusted_proxies,
        )

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        """An absolute-form target (RFC 9112 §3.2.2) naming the gateway itself is read as
        origin-form, its authority as the Host; one naming any other host is left as it
        is, which no route matches (404): the gateway is no forward proxy."""
        if not path.startswith(b"/"):
            path = self._origin_form(path)
        super().requestReceived(command, path, version)

    def _origin_form(self, target: bytes) -> bytes:
        found = _ABSOLUTE_FORM.match(target)
        if found is None:
            return target
        scheme, authority, rest = found.group(1).lower(), found.group(2).lower(), found.group(3)
        own = {_without_default_port(scheme, a) for a in self._own_authorities()}
        if _without_default_port(scheme, authority) not in own:
            return target
        self.requestHeaders.setRawHeaders(b"host", [authority])
        return rest if rest.startswith(b"/") else b"/" + rest

    def _own_authorities(self) -> list[bytes]:
        """PUBLIC_URL's authority, and the address the connection arrived at."""
        local = self.getHost()
        host = getattr(local, "host", "")
        own = [(f"[{host}]" if ":" in host else host).encode() + b":%d" % getattr(local, "port", 0)]
        public_url = self.site.settings.public_url
        if public_url is not None:
            own.append(urlsplit(public_url).netloc.lower().encode("ascii"))
        return own

    defaultContentType = None
    """No Content-Type is invented: twisted.web would add ``text/html``
    to an upstream answer that has none."""

    def render(self, resource: Any) -> None:
        # twisted.web has set "Server: TwistedWeb/<version>"; the version of
        # what runs the gateway is nobody's business (SERVER_HEADER).
        server_field = self.site.settings.server_field
        if server_field is None:
            self.responseHeaders.removeHeader(b"server")
        else:
            self.responseHeaders.setRawHeaders(b"server", [server_field])
        super().render(resource)

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

    async def relay_ended(self, ending: RelayEnding) -> None:
        """Record how a forwarded answer's relay ended; close the connection if it must."""
        if ending is RelayEnding.COMPLETE:
            if self.code >= 400:
                # Only once relayed whole: a client that leaves before is client_closed.
                self.outcome = "upstream_error"
            return
        if ending is RelayEnding.CLIENT_SLOW:
            self.outcome = "client_slow"
        # A client that reads nothing would hold flushed bytes for ever.
        await self._close_mid_response(flush=ending is RelayEnding.UPSTREAM_CUT)

    async def _close_mid_response(self, flush: bool) -> None:
        """Close the client connection mid-response and wait until it is gone.

        Finishing the response normally would tell the client a truncated body
        was complete. With a Content-Length or chunked framing the client can
        tell a body cut short by the close (RFC 9112 §8), so the bytes already
        written go out first (unless ``flush`` is false); without either, only
        an aborted connection cannot be mistaken for success.
        """
        finished = self.notifyFinish()
        if flush and (self.chunked or self.responseHeaders.hasHeader(b"content-length")):
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()
        try:
            await finished
        except Exception:
            pass

    def connectionLost(self, reason: Any) -> None:
        if not self.finished and self.started:
            self.outcome = self.outcome or "client_closed"
            self.site.log(self, status=499)
        super().connectionLost(reason)
        self._end()


_ABSOLUTE_FORM = re.compile(rb"(?i:(https?))://([^/?#]*)(.*)\Z", re.DOTALL)
_DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}


def _without_default_port(scheme: bytes, authority: bytes) -> bytes:
    port = _DEFAULT_PORTS[scheme]
    return authority[: -len(port)] if authority.endswith(port) else authority


def _raw_error(status: int, message: str) -> bytes:
    """A whole JSON error response, for answers made before any request exists."""
    body = json_body(problem_document(status, message, None))
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (status, reason_phrase(status), len(body), body)
    )


_TIMEOUT_RESPONSE = _raw_error(408, "Request not received in time")


_WARNING_OUTCOMES = frozenset({
    "circuit_open", "shed", "auth_unavailable", "rate_limiter_unavailable", "upstream_all_failed",
})
"""Outcomes that say a part of the platform is failing, besides ``upstream_*``."""


def _level_of(outcome: str, status: int) -> str:
    """The level of an access log line: a gateway bug is an error; an upstream
    failing, shedding or an open circuit a warning; the rest, client errors
    included, info (they say nothing about the platform's health)."""
    if outcome == "internal_error":
        return "error"
    if outcome in _WARNING_OUTCOMES or (
        outcome.startswith("upstream_") and (outcome != "upstream_error" or status >= 500)
    ):
        return "warning"
    return "info"


class GatewayChannel(http.HTTPChannel):
    """An HTTP channel that reads requests strictly and answers refusals in JSON.

    Every byte a client sends passes `deltagw.web.request_framing` before
    twisted.web's parser sees it; a refused request is answered once the
    requests before it have been, and the connection is then closed. The
    whole request must arrive within CLIENT_TIMEOUT: twisted.web's idle
    timeout restarts on every byte, so a client trickling a request (slow
    loris) would otherwise hold its connection for ever.
    """

    _closed = False
    _host: Any = None
    _secure: bool | None = None
    _answering = False
    """Whether twisted.web holds a complete request not yet answered."""
    _request_clock: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        held_writes.adopt(self.transport)
        self._close_waiters: list[defer.Deferred[None]] = []
        self._framer = RequestFramer(self.site.settings.max_body_bytes)

    def request_line(self) -> bytes:
        """The request line of the request being received (set with its head)."""
        return self._framer.request_line

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
        framer = self._framer
        if framer.rejected is not None:
            return  # refused: what follows cannot be framed
        heads_before = framer.heads_read
        valid = framer.feed(data)
        if not self._answering and (valid or framer.receiving):
            self.start_request_clock()
        if not valid:
            self.resetTimeout()  # bytes came, though none is complete yet
        elif not (framer.heads_read == heads_before + 1 and self._answered_at_head()):
            super().dataReceived(valid)
        if framer.rejected is not None and not self._answering:
            self._refuse(framer.rejected)

    def _answered_at_head(self) -> bool:
        """Answer the one request head just read without twisted.web, if it may be.

        Only when it is all the connection holds: no request before it
        still being read or answered (twisted.web's ``requests``), nothing
        after it begun, and the connection is to stay open
        (`deltagw.web.early_hits` decides the rest).
        """
        early_hits = self.site.early_hits
        framer = self._framer
        if (
            early_hits is None
            or self._answering
            or self.requests
            or framer.receiving
            or framer.rejected is not None
            or not self.persistent
            or self._closed
            or not early_hits.answer(self, framer.request_line, framer.fields)
        ):
            return False
        self.stop_request_clock()
        self.resetTimeout()
        return True

    def allContentReceived(self) -> None:
        self.stop_request_clock()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: GatewayRequest) -> None:
        self._answering = False
        super().requestDone(request)  # may start a pipelined request
        framer = self._framer
        if self._answering or self._closed:
            return
        if framer.rejected is not None:
            self._refuse(framer.rejected)
        elif framer.receiving:
            self.start_request_clock()

    def connectionLost(self, reason: Any) -> None:
        self.stop_request_clock()
        super().connectionLost(reason)
        self._closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def start_request_clock(self) -> None:
        """The request being received must be complete within CLIENT_TIMEOUT."""
        if self._request_clock is None:
            self._request_clock = self.callLater(
                self.site.settings.client_timeout, self.request_too_slow
            )

    def stop_request_clock(self) -> None:
        """The request has arrived (or the connection is gone)."""
        clock, self._request_clock = self._request_clock, None
        if clock is not None and clock.active():
            clock.cancel()

    def request_too_slow(self) -> None:
        """Answer 408 to a request not received within CLIENT_TIMEOUT, and close."""
        self._request_clock = None
        _access_log.msg(
            "request_timeout",
            client=getattr(self.transport.getPeer(), "host", "-"),
            outcome="client_timeout",
        )
        self.transport.write(_TIMEOUT_RESPONSE)
        self.loseConnection()

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        """twisted.web's idle timeout: a request still being received gets its 408.

        The idle timeout and the request deadline are both CLIENT_TIMEOUT,
        so when a client sends its first byte at once and nothing more they
        fall due together; whichever comes first, a request under way is
        answered 408, and only an idle connection is closed without a word.
        """
        if self._request_clock is not None:
            self.stop_request_clock()
            self.request_too_slow()
        else:
            super().timeoutConnection()

    def _refuse(self, rejected: RequestRejected) -> None:
        """Answer a request the framer refused, and close the connection."""
        self.stop_request_clock()
        _access_log.msg(
            "malformed_request",
            client=getattr(self.transport.getPeer(), "host", "-"),
            status_code=rejected.status,
            error=rejected.message,
            outcome=_REFUSAL_OUTCOMES.get(rejected.status, BadRequest.outcome),
        )
        self.transport.write(_raw_error(rejected.status, rejected.message))
        self.loseConnection()


_REFUSAL_OUTCOMES = {413: PayloadTooLarge.outcome, 414: "uri_too_long",
                     431: "headers_too_large", 501: "not_implemented",
                     505: "version_not_supported"}
"""The access log outcome of a refused request, by status (else bad_request)."""


class _OneClockChannel(channel_clock.OneReactorCall, GatewayChannel):
    """`GatewayChannel` whose two clocks share one reactor call (SPEEDUPS)."""


class GatewaySite(server.Site):
    """A Site that logs one ``outgoing_response`` JSON event per request."""

    requestFactory = GatewayRequest
    protocol = GatewayChannel
    early_hits: Any = None
    """Answers fresh cache hits at their head (`deltagw.web.early_hits.EarlyHits`), if set."""

    def __init__(
        self, resource: Any, settings: Any, reactor: Any, metrics: Metrics | None = None
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=settings.client_timeout)
        self.settings = settings
        self.reactor = reactor
        self.metrics = metrics
        if settings.speedups:
            self.protocol = _OneClockChannel

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
            level=_level_of(outcome, status),
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
