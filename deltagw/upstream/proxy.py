"""Forwarding a call to its upstream: timeouts, resilience, streaming the answer back.

Before a call, the service's in-flight cap (load shedding) and circuit
breaker may answer 503 at once; the wait for response headers is retried
where that is safe (``deltagw.upstream.retry``); the response body is then relayed
chunk by chunk as it arrives, registered as a push producer on the client's
request so that a slow client slows the upstream instead of filling the
gateway's memory.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from deltagw.errors import UpstreamUnavailable
from deltagw.logs import get_logger
from deltagw.routes import SERVICES, Service
from deltagw.speedups import clean_fields
from deltagw.upstream.body import BodyInterrupted, read_body
from deltagw.upstream.breaker import HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, is_failure_status
from deltagw.upstream.client import NO_BODY_CODES, Header, UpstreamResponse
from deltagw.upstream.failures import failure_reason, was_cancelled
from deltagw.upstream.forwarding import copy_response_headers
from deltagw.upstream.pools import UpstreamClient
from deltagw.upstream.retry import RetryPolicy, call_with_retries

_log = get_logger(component="proxy")

SHED_RETRY_AFTER = 1
"""``Retry-After`` (seconds) of a shed request: the overload is momentary
(one slot frees as soon as any in-flight call ends)."""

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest body `Proxy.fetch_json` buffers: a composed answer reads small
JSON documents, never a stream."""

Note = Callable[[str, float, str | None], None]
"""Records one upstream call: ``(service name, started, failure or None)``."""


class RelayEnding(enum.Enum):
    """How the relay of a forwarded answer ended; the caller acts on the client side.

    The proxy never closes the client's connection nor records why a
    request ended: it says what happened, and the web layer decides.
    """

    COMPLETE = "complete"
    """The whole answer went to the client."""
    UPSTREAM_CUT = "upstream_cut"
    """The upstream body broke after part of the answer was written: the client's
    connection must close, else it would take a truncated body for complete."""
    CLIENT_SLOW = "client_slow"
    """The client read nothing for CLIENT_TIMEOUT: its connection must close,
    with nothing left to flush to a reader that reads nothing."""


@dataclass(frozen=True)
class WholeResponse:
    """An upstream's answer read whole (`Proxy.fetch_whole`).

    Attributes:
        code: The status code.
        phrase: The reason phrase.
        headers: The end-to-end fields, as the upstream sent them.
        body: The body.
        requested_at: ``reactor.seconds()`` when the call was made.
        received_at: ``reactor.seconds()`` when the body had arrived.
    """

    code: int
    phrase: bytes
    headers: list[Header]
    body: bytes
    requested_at: float
    received_at: float


Keep = Callable[[UpstreamResponse], int]
"""Asked at a forwarded response's head: how many body bytes to keep a copy of (0: none)."""

Unwanted = Callable[[UpstreamResponse], bool]
"""Asked at a forwarded response's head, before anything is written: True when the
caller has a better answer than this one (a stored copy in place of a 5xx)."""


@dataclass(frozen=True)
class Relayed:
    """What `Proxy.forward` did: how the relay ended, and the answer if it kept it whole."""

    ending: RelayEnding
    kept: WholeResponse | None = None


_COMPLETE = Relayed(RelayEnding.COMPLETE)


class ClientTooSlow(Exception):
    """The client read nothing of the answer for CLIENT_TIMEOUT."""


@implementer(IPushProducer)
class _BodyRelay(Protocol):
    """Writes the upstream body to the client as it arrives.

    Two clocks, one running at a time, so that each side is blamed for its
    own silence. While the client reads, a gap longer than
    ``upstream_timeout`` between upstream chunks ends the relay
    (`BodyInterrupted`). While twisted.web has paused the relay because the
    client's connection is full, the upstream is paused too and waits; if
    the client reads nothing for ``client_timeout``, the relay ends with
    `ClientTooSlow`. Either way the status line is out, so the only honest
    signal left is to close the client connection (see ``Proxy.forward``).
    """

    def __init__(
        self, request: http.Request, reactor: IReactorTime, upstream_timeout: float,
        client_timeout: float, keep_limit: int = 0,
    ) -> None:
        self._request = request
        self._keep_limit = keep_limit
        self._kept: list[bytes] | None = [] if keep_limit else None
        self._kept_size = 0
        self._reactor = reactor
        self._upstream_timeout = upstream_timeout
        self._client_timeout = client_timeout
        self._timer: Any = None
        self._paused = False
        self.done: defer.Deferred[None] = defer.Deferred(self._cancelled)

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._timer = self._reactor.callLater(self._upstream_timeout, self._upstream_stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._kept is not None:
            self._keep(data)
        self._request.write(data)  # may pause this relay at once
        if not self._paused and self._timer.active():
            self._timer.reset(self._upstream_timeout)

    def _keep(self, data: bytes) -> None:
        self._kept_size += len(data)
        if self._kept_size > self._keep_limit:
            self._kept = None  # too long to keep: relayed only
        else:
            self._kept.append(data)  # type: ignore[union-attr]

    def kept(self) -> bytes | None:
        """The body's copy, when one was asked for and the body was not too long."""
        return None if self._kept is None else b"".join(self._kept)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self._request.channel is not None:
            # Not when the client has gone: twisted.web has let go of its
            # connection, and of this producer with it.
            self._request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(BodyInterrupted("reset"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _upstream_stalled(self) -> None:
        self.done.errback(BodyInterrupted("timeout"))
        self.transport.stopProducing()

    def _client_stalled(self) -> None:
        self.done.errback(ClientTooSlow())
        self.transport.stopProducing()

    def _cancelled(self, _: defer.Deferred[None]) -> None:
        self.transport.stopProducing()

    def pauseProducing(self) -> None:
        self._paused = True
        self._stop_timer()
        self._timer = self._reactor.callLater(self._client_timeout, self._client_stalled)
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._stop_timer()
        self._timer = self._reactor.callLater(self._upstream_timeout, self._upstream_stalled)
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class Proxy:
    """Forwards one client request to its upstream and streams the answer.

    Owns the per-service resilience state: a circuit breaker (`breakers`)
    and a count of calls in flight, capped at ``max_in_flight``.

    Args:
        reactor: Clock for timeouts, backoff and the breakers.
        client: The pooled upstream client.
        breaker_failures: Consecutive failures that open a service's circuit.
        breaker_reset: Seconds an open circuit waits before one probe.
        retry: Which failed attempts are tried again, and after what pause.
        max_in_flight: Upstream calls per service beyond which new ones are
            shed (answered 503 at once) instead of queued.
        client_timeout: Seconds a client may read nothing of an answer
            before its connection is closed (CLIENT_TIMEOUT).
    """

    def __init__(
        self,
        reactor: Any,
        client: UpstreamClient,
        breaker_failures: int = 5,
        breaker_reset: float = 30.0,
        retry: RetryPolicy | None = None,
        max_in_flight: int = 256,
        client_timeout: float = 60.0,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._client_timeout = client_timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._max_in_flight = max_in_flight
        self.breakers: dict[str, CircuitBreaker] = {
            service.name: CircuitBreaker(
                service.name, reactor, breaker_failures, breaker_reset, _log_transition
            )
            for service in SERVICES
        }
        self.in_flight: dict[str, int] = {service.name: 0 for service in SERVICES}

    async def forward(
        self,
        request: http.Request,
        service: Service,
        url: str,
        headers: list[Header] | None,
        timeout: float,
        note: Note,
        keep: Keep | None = None,
        unwanted: Unwanted | None = None,
    ) -> Relayed:
        """Send ``request`` to ``url`` and relay the response to the client.

        The call counts as in flight for its service from before it is sent
        until the body relay ends, so shedding caps real upstream load.

        Args:
            request: The client's request: its method and body are sent, and
                the answer is written to it.
            service: The upstream service.
            url: Full upstream URL, query included.
            headers: Request header fields, ``(name, value)`` pairs.
            timeout: Seconds to wait for response headers, and between body chunks.
            note: Called as ``note(service_name, started, failure_or_None)``
                for the headers' outcome and for any body failure.
            keep: Asked at the response head how many body bytes to keep a
                copy of (0: none); a body that turns out longer is not kept.
            unwanted: Asked at the response head, before ``keep``: when it
                says True, nothing is relayed and the upstream connection is
                closed mid-body rather than read to the end.

        Returns:
            How the relay ended (on anything but `RelayEnding.COMPLETE` the
            caller must close the client's connection), and the whole
            answer when ``keep`` asked for it and it was relayed whole.

        Raises:
            UpstreamUnavailable: nothing has been written yet, and either the
                call was not made (``shed``, ``circuit_open``) or no response
                headers arrived (refused, reset, timed out, invalid HTTP), or
                ``unwanted`` declined the answer (its ``answered_status`` is set).
        """
        started = self._reactor.seconds()
        breaker = self._admit(service, started, note)
        self.in_flight[service.name] += 1
        try:
            response = await self._response_headers(
                request.method, _body_of(request), note,
                service, url, headers, timeout, breaker, started,
            )
            if unwanted is not None and unwanted(response):
                _drop_body(response)
                raise UpstreamUnavailable(service, "declined", answered_status=response.code)
            return await self._relay(request, note, service, response, timeout, started, keep)
        finally:
            self.in_flight[service.name] -= 1

    async def fetch_json(
        self,
        service: Service,
        url: str,
        headers: list[Header] | None,
        timeout: float,
        note: Note | None = None,
        max_bytes: int = MAX_JSON_BYTES,
    ) -> tuple[int, Any]:
        """GET ``url`` and return its status and JSON body, buffered.

        For the gateway's own composed answers (``deltagw.web.composition``),
        through `fetch_whole`.

        Returns:
            ``(status, document)``: the upstream's status code and its body
            parsed as JSON, or None when the body is empty or not JSON.

        Raises:
            UpstreamUnavailable: as `fetch_whole`.
        """
        whole = await self.fetch_whole(b"GET", service, url, headers, timeout, note, max_bytes)
        try:
            document = json.loads(whole.body) if whole.body else None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            document = None
        return whole.code, document

    async def fetch_whole(
        self,
        method: bytes,
        service: Service,
        url: str,
        headers: list[Header] | None,
        timeout: float,
        note: Note | None = None,
        max_bytes: int = MAX_JSON_BYTES,
    ) -> WholeResponse:
        """Make a call and read its whole answer into memory.

        The call passes the same in-flight cap, circuit breaker and retry
        policy as a forwarded one, but its body is read (at most
        ``max_bytes``) instead of being relayed. The whole exchange, headers
        and body, must end within ``timeout``.

        Args:
            method: ``GET`` or ``HEAD`` (no request body is sent).
            service: The upstream service.
            url: Full upstream URL, query included.
            headers: Request header fields, ``(name, value)`` pairs.
            timeout: Seconds for the whole call (the service's timeout).
            note: Called as ``note(service_name, started, failure_or_None)``
                for the headers' outcome and any body failure.
            max_bytes: Largest body accepted.

        Raises:
            UpstreamUnavailable: shed, circuit open, no response headers
                (refused, reset, timed out, invalid HTTP), or the body
                failed (``body_timeout``, ``body_reset``, ``body_too_large``).
        """
        note = note or _no_note
        started = self._reactor.seconds()
        breaker = self._admit(service, started, note)
        self.in_flight[service.name] += 1
        try:
            response = await self._response_headers(
                method, None, note, service, url, headers, timeout, breaker, started
            )
            left = max(0.0, started + timeout - self._reactor.seconds())
            try:
                body = await read_body(response, self._reactor, left, max_bytes)
            except BodyInterrupted as e:
                note(service.name, started, f"body_{e.reason}")
                raise UpstreamUnavailable(service, f"body_{e.reason}") from None
        finally:
            self.in_flight[service.name] -= 1
        return WholeResponse(
            response.code, response.phrase, response.headers, body, started,
            self._reactor.seconds(),
        )

    def _admit(self, service: Service, started: float, note: Note) -> CircuitBreaker:
        """Let a call through the in-flight cap and the breaker, or refuse it.

        Returns:
            The service's breaker, acquired: the caller must settle it.

        Raises:
            UpstreamUnavailable: ``shed`` or ``circuit_open``.
        """
        if self.in_flight[service.name] >= self._max_in_flight:
            note(service.name, started, "shed")
            raise UpstreamUnavailable(service, "shed", SHED_RETRY_AFTER)
        breaker = self.breakers[service.name]
        try:
            breaker.acquire()
        except CircuitOpen as e:
            note(service.name, started, "circuit_open")
            raise UpstreamUnavailable(service, "circuit_open", math.ceil(e.retry_after)) from None
        return breaker

    async def _response_headers(
        self,
        method: bytes,
        body: bytes | None,
        note: Note,
        service: Service,
        url: str,
        headers: list[Header] | None,
        timeout: float,
        breaker: CircuitBreaker,
        started: float,
    ) -> UpstreamResponse:
        """Wait for the upstream's response headers, retrying where safe.

        Settles the breaker call that `_admit` acquired: the headers (or
        their absence) are all the breaker judges.
        """

        target = url.encode("ascii")

        def attempt() -> defer.Deferred[UpstreamResponse]:
            return self._client.pool.request(method, target, headers, body)

        # The half-open probe is a single attempt: the point of the open
        # circuit is that a dead upstream sees one connection per reset period.
        policy = _NO_RETRY if breaker.state == HALF_OPEN else self._retry
        d = call_with_retries(self._reactor, policy, method, attempt, started + timeout)
        # One reactor call, cancelled when the headers arrive: all that
        # ``Deferred.addTimeout`` does here, without its two callbacks and
        # closures on every call.
        timer = self._reactor.callLater(timeout, d.cancel)
        try:
            response: UpstreamResponse = await d
        except Exception:
            failure = _timed_out(timeout) if not timer.active() else Failure()
            if was_cancelled(failure):
                # The client went away (Klein cancels the handler): nothing
                # was learnt about the upstream, and nobody waits for an answer.
                breaker.release()
                raise defer.CancelledError() from None
            breaker.record_failure()
            reason = failure_reason(failure)
            note(service.name, started, reason)
            raise UpstreamUnavailable(service, reason) from None
        finally:
            if timer.active():
                timer.cancel()
        if is_failure_status(response.code):
            breaker.record_failure()
        else:
            breaker.record_success()
        note(service.name, started, None)
        return response

    async def _relay(
        self, request: http.Request, note: Note, service: Service, response: UpstreamResponse,
        timeout: float, started: float, keep: Keep | None,
    ) -> Relayed:
        """Write the upstream's status, headers and body to the client.

        Raises:
            UpstreamUnavailable: the body failed before a byte of the answer
                was written (twisted.web writes the head with the first body
                bytes), so the client can still get a clean 503.
        """
        body = response.complete_body()
        # Off the common path (a small answer that came whole): the fields
        # the gateway set itself, to answer with if the body fails.
        ours = None if body is not None else Headers(dict(request.responseHeaders.getAllRawHeaders()))
        request.setResponseCode(response.code, response.phrase or None)
        copy_response_headers(response.headers, request.responseHeaders)
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            # The framing of this body; a HEAD or 304 answer keeps the
            # upstream's Content-Length, and a 204 has none.
            clean_fields.set_field(
                request.responseHeaders, b"Content-Length", b"%d" % response.length
            )
        # Asked once the upstream's fields are in place, before a byte is written.
        keep_limit = keep(response) if keep is not None else 0
        if body is not None:
            # The usual small answer came whole with its head: no relay,
            # timer or producer is needed to pass it on.
            request.write(body)
        else:
            relay = _BodyRelay(request, self._reactor, timeout, self._client_timeout, keep_limit)
            response.deliverBody(relay)
            try:
                await relay.done
            except ClientTooSlow:
                # The client's fault, not the upstream's: no failure noted.
                return Relayed(RelayEnding.CLIENT_SLOW)
            except BodyInterrupted as e:
                note(service.name, started, f"body_{e.reason}")
                if not request.startedWriting:
                    request.responseHeaders = ours
                    raise UpstreamUnavailable(service, f"body_{e.reason}") from None
                return Relayed(RelayEnding.UPSTREAM_CUT)
            body = relay.kept()
        if not keep_limit or body is None or len(body) > keep_limit:
            return _COMPLETE
        return Relayed(RelayEnding.COMPLETE, WholeResponse(
            response.code, response.phrase, response.headers, body, started,
            self._reactor.seconds(),
        ))


_NO_RETRY = RetryPolicy(retries=0)


class _Dropped(Protocol):
    """Reads no body: closing the connection is cheaper than reading an unwanted answer."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _drop_body(response: UpstreamResponse) -> None:
    """Let go of an answer nobody will read, and of its connection if it is still arriving."""
    if response.complete_body() is None:
        response.deliverBody(_Dropped())


def _no_note(service: str, started: float, failure: str | None) -> None:
    return None


def _timed_out(timeout: float) -> Failure:
    """What a call whose timer fired failed of: one ``defer.TimeoutError``.

    Whatever the cancelled call failed with is replaced: cancelling a request
    that is already on a connection fails it with ``ResponseNeverReceived``
    (wrapping the CancelledError), which would read as the client's leaving.
    """
    return Failure(defer.TimeoutError(f"no response headers within {timeout} s"))


def _log_transition(service: str, old: str, new: str) -> None:
    """Log a breaker's state change (the breaker calls this once per change)."""
    _log.msg("circuit_breaker", service=service, previous_state=old, state=new,
             level="warning" if new == OPEN else "info")


def _body_of(request: http.Request) -> bytes | None:
    """The buffered request body, or None when the request has none.

    twisted.web has already read it (at most MAX_BODY_BYTES); a retry sends
    the same bytes again.
    """
    content = request.content
    content.seek(0)
    body: bytes = content.read()
    if not body and not request.requestHeaders.hasHeader(b"content-length"):
        return None
    return body
