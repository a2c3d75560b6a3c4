"""Answering forwarded GET and HEAD requests from the shared cache (RFC 9111).

The gateway runs authentication and the rate limit first, so a 401 or a
429 never comes from here. Then:

- a stored response that may answer (fresh, or stale within what the
  request or stale-while-revalidate allows) is written at once, with
  ``Age``; stale-while-revalidate also refreshes it behind the answer, one
  refresh per URL at a time (`Coalescer`);
- otherwise the request is forwarded as any other, streamed with
  back-pressure, and the proxy keeps a copy of the body when the head
  says the answer may be stored (and it is not over CACHE_MAX_ENTRY_BYTES);
  it is stored once relayed whole;
- a GET that misses while another request for the same URL is already on
  its way upstream waits for that one (as nginx's ``proxy_cache_lock``),
  then looks again: it is answered from the store when the first answer
  was stored and matches its request (Vary), and forwarded itself
  otherwise. So one user's answer never reaches another unless the
  upstream said it may be shared, and a waiter whose client leaves
  cancels nothing but its own wait. When the first call fails with no
  answer, every waiter gets the same error (or the stale copy);
- when the upstream gives no answer (refused, timed out, reset, circuit
  open, shed) and a stored response allows stale-if-error (its own
  directive, or CACHE_STALE_IF_ERROR), the stored response answers; so it
  does in place of an upstream 500, 502, 503 or 504, decided at the 5xx's
  head before a byte of it is written.

Every answer of a cached route carries ``Cache-Status`` (RFC 9211) and the
access log line a ``cache`` field.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from deltagw.cache.coalescing import Coalescer
from deltagw.cache.directives import RequestDirectives, request_directives
from deltagw.cache.freshness import (
    ONLY_IF_CACHED_STATUS,
    STALE_IF_ERROR_STATUSES,
    StoredUse,
    freshness_of,
    may_serve_stale_on_error,
    use_of_stored,
)
from deltagw.cache.keys import asked_origin, primary_key, url_key_prefix
from deltagw.cache.status import (
    CacheStatus,
    Forward,
    age_header_value,
    forwarded,
    hit,
    served_on_error,
)
from deltagw.cache.storability import storage_refusal
from deltagw.cache.store import ResponseStore, StoredResponse
from deltagw.config import Settings
from deltagw.errors import UpstreamUnavailable
from deltagw.logs import get_logger
from deltagw.metrics import Metrics
from deltagw.routes import Route
from deltagw.upstream.client import Header, UpstreamResponse
from deltagw.upstream.forwarding import copy_response_headers
from deltagw.upstream.proxy import Proxy, WholeResponse
from deltagw.web.head_request import HeadRequest
from deltagw.web.site import GatewayRequest

_log = get_logger(component="cache")

UNCACHEABLE_SECONDS = 10.0
"""How long a URL whose last answer could not be stored is forwarded without
waiting for calls in progress (Varnish's hit-for-miss): waiting for an
answer that will not be shared would only queue requests behind each other."""

MAX_UNCACHEABLE_URLS = 10_000
"""URLs remembered as uncacheable at once; the oldest are forgotten first."""


class FillsInProgress:
    """GETs on their way upstream, by URL, and the requests waiting for them.

    Attributes:
        waited: Requests that waited for another's call instead of making
            their own, since start (a metrics counter).
    """

    def __init__(self) -> None:
        self.waited = 0
        self._waiting: dict[bytes, list[defer.Deferred[None]]] = {}
        self._uncacheable: OrderedDict[bytes, float] = OrderedDict()

    def in_progress(self, key: bytes) -> bool:
        return key in self._waiting

    def worth_waiting(self, key: bytes, now: float) -> bool:
        """Whether a call for ``key`` may be shared: its last answer was not uncacheable."""
        until = self._uncacheable.get(key)
        if until is None:
            return True
        if until > now:
            return False
        del self._uncacheable[key]
        return True

    def uncacheable(self, key: bytes, now: float) -> None:
        """Remember that ``key``'s answer could not be stored (`UNCACHEABLE_SECONDS`)."""
        self._uncacheable[key] = now + UNCACHEABLE_SECONDS
        self._uncacheable.move_to_end(key)
        if len(self._uncacheable) > MAX_UNCACHEABLE_URLS:
            self._uncacheable.popitem(last=False)

    def begin(self, key: bytes) -> list[defer.Deferred[None]]:
        """Mark a call for ``key`` as on its way; the token ends it (`end`)."""
        waiting: list[defer.Deferred[None]] = []
        self._waiting[key] = waiting
        return waiting

    def wait(self, key: bytes) -> defer.Deferred[None]:
        """Fires when the call in progress for ``key`` ends (with its failure, if none answered)."""
        self.waited += 1
        waiting = self._waiting[key]
        d: defer.Deferred[None] = defer.Deferred(lambda d: waiting.remove(d))
        waiting.append(d)
        return d

    def end(
        self, key: bytes, token: list[defer.Deferred[None]], failure: Failure | None = None
    ) -> None:
        """Release the requests waiting for the call ``token`` began (once; later calls do not)."""
        if self._waiting.get(key) is not token:
            return
        del self._waiting[key]
        for d in token:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)


class SharedCache:
    """The store and the rules that put it in front of the proxy.

    Args:
        reactor: The clock ages and freshness are read from.
        store: Survives settings reloads (the service keeps it).
        fills: GETs on their way upstream (kept with the store).
        refreshes: Background refreshes in flight (kept with the store).
        proxy: Makes the upstream calls.
        settings: CACHE_TTL, CACHE_STALE_IF_ERROR, CACHE_MAX_ENTRY_BYTES.
        metrics: Counts each request's cache result.
        purge_elsewhere: Called after each purge, to reach the caches of
            other processes (with ``--workers``, every worker's).
    """

    def __init__(
        self,
        reactor: Any,
        store: ResponseStore,
        fills: FillsInProgress,
        refreshes: Coalescer[WholeResponse],
        proxy: Proxy,
        settings: Settings,
        metrics: Metrics,
        purge_elsewhere: Callable[[], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._purge_elsewhere = purge_elsewhere
        self._store = store
        self._fills = fills
        self._refreshes = refreshes
        self._proxy = proxy
        self._settings = settings
        self._default_ttls = dict(settings.cache_ttl)
        self._metrics = metrics

    async def forward(
        self,
        request: GatewayRequest,
        route: Route,
        url: str,
        headers: list[Header],
        timeout: float,
    ) -> None:
        """Answer a forwarded GET or HEAD from the store, or forward it."""
        key = primary_key(url.encode("ascii"), asked_origin(headers))
        asked = _asked(request)
        stored = self._store.lookup(key, headers)
        if stored is not None and self._answered_with(request, route, stored, key, url, headers,
                                                      timeout, asked):
            return
        if asked.only_if_cached:
            self._answer_only_if_cached(request, route)
            return
        now = self._reactor.seconds()
        shared = request.method == b"GET" and self._fills.worth_waiting(key, now)
        if shared and self._fills.in_progress(key):
            try:
                await self._fills.wait(key)
            except UpstreamUnavailable as unavailable:
                if self._served_stale(request, route, key, headers, Forward.MISS,
                                      unavailable.answered_status):
                    return
                raise
            stored = self._store.lookup(key, headers)
            if stored is not None and self._answered_with(request, route, stored, key, url,
                                                          headers, timeout, asked):
                return
        why = _why_forwarded(key in self._store, stored is not None, asked)
        await self._forward_upstream(request, route, key, url, headers, timeout, why, shared)

    def is_empty(self) -> bool:
        """Whether nothing is stored: no request can be answered from the store."""
        return self._store.entries == 0

    def fresh_answer(
        self, request: HeadRequest, url: str, origin: bytes, headers: Sequence[Header]
    ) -> tuple[StoredResponse, CacheStatus] | None:
        """The stored response that answers ``request`` as it is, and its Cache-Status.

        Asks nothing of the upstream and changes nothing but the entry's
        place in the LRU order: None whenever answering would need the
        upstream (a miss, a refresh behind a stale answer, a request that
        asks for a fresher one), which `forward` then handles.

        Args:
            origin: The origin `forward` finds in the upstream fields
                (`deltagw.web.application.Gateway.asked_origin`).
            headers: The upstream fields, read only when the stored
                answer varies on some.
        """
        key = primary_key(url.encode("ascii"), origin)
        stored = self._store.lookup(key, headers)
        if stored is None:
            return None
        now = self._reactor.seconds()
        use = use_of_stored(stored.freshness, _asked(request), now)
        if use is not StoredUse.FRESH and use is not StoredUse.STALE_ALLOWED:
            return None
        return stored, hit(stored.freshness.remaining(now))

    def purge(self, url: bytes | None, prefix: bool = False) -> int:
        """Forget stored answers: all (``url`` None), one upstream URL's, or
        every URL that starts with ``url`` (``prefix``).

        Returns:
            How many stored responses this process removed (variants count
            one each).
        """
        if url is None:
            purged = self._store.purge_all()
        else:
            purged = self._store.purge_prefix(url if prefix else url_key_prefix(url))
        if self._purge_elsewhere is not None:
            self._purge_elsewhere()
        return purged

    def _answered_with(
        self,
        request: GatewayRequest,
        route: Route,
        stored: StoredResponse,
        key: bytes,
        url: str,
        headers: list[Header],
        timeout: float,
        asked: RequestDirectives,
    ) -> bool:
        """Answer with the stored response if it may answer this request (RFC 9111 §4)."""
        now = self._reactor.seconds()
        use = use_of_stored(stored.freshness, asked, now)
        if use is StoredUse.STALE_WHILE_REVALIDATE:
            self._refresh(request, route, key, url, headers, timeout)
        elif use is not StoredUse.FRESH and use is not StoredUse.STALE_ALLOWED:
            return False
        self.answer_stored(request, route, stored, hit(stored.freshness.remaining(now)))
        return True

    async def _forward_upstream(
        self,
        request: GatewayRequest,
        route: Route,
        key: bytes,
        url: str,
        headers: list[Header],
        timeout: float,
        why: Forward,
        shared: bool,
    ) -> None:
        """Forward, streamed; keep and store the answer when RFC 9111 allows it."""
        assert route.service is not None
        fill = None
        if shared and not self._fills.in_progress(key):
            fill = self._fills.begin(key)
        outcome: Failure | None = None
        try:
            relayed = await self._proxy.forward(
                request, route.service, url, headers, timeout, request.note_upstream,
                keep=self._keep(request, route, key, why, fill),
                unwanted=self._unwanted(key, headers) if key in self._store else None,
            )
        except UpstreamUnavailable as unavailable:
            outcome = Failure()
            if self._served_stale(request, route, key, headers, why,
                                  unavailable.answered_status):
                return
            raise
        except BaseException:
            outcome = Failure()
            raise
        finally:
            if fill is not None and outcome is not None:
                # No answer: waiters fail alike; a leader whose client left
                # (cancelled) lets them go on their own.
                unanswered = outcome if outcome.check(UpstreamUnavailable) else None
                self._fills.end(key, fill, unanswered)
        if relayed.kept is not None:
            self._store_if_allowed(request, route, key, headers, relayed.kept)
        if fill is not None:
            self._fills.end(key, fill)  # they look in the store again
        await request.relay_ended(relayed.ending)

    def _keep(
        self,
        request: GatewayRequest,
        route: Route,
        key: bytes,
        why: Forward,
        fill: list[defer.Deferred[None]] | None,
    ) -> Callable[[UpstreamResponse], int]:
        """Decided at the response head: Cache-Status, and whether to keep the body.

        An answer that will not be stored lets the requests waiting for it
        go at once: they could not use it.
        """

        limit = self._settings.cache_max_entry_bytes

        def keep(response: UpstreamResponse) -> int:
            storable = (
                request.method == b"GET"
                and (response.length is UNKNOWN_LENGTH or response.length <= limit)
                and self._storable(request, route, response)
            )
            status, value = _FORWARDED[why, storable]
            # After any the upstream's own caches wrote (RFC 9211 §2).
            request.responseHeaders.addRawHeader(b"Cache-Status", value)
            self._count(request, route, status)
            if not storable and request.method == b"GET":
                self._fills.uncacheable(key, self._reactor.seconds())
                if fill is not None:
                    self._fills.end(key, fill)
            return limit if storable else 0

        return keep

    def _unwanted(self, key: bytes, headers: list[Header]) -> Callable[[UpstreamResponse], bool]:
        """Decided at the response head: a 5xx is not relayed when a stored copy may answer.

        RFC 5861 §4 lets stale-if-error stand in for a 500, 502, 503 or 504
        as for no answer at all (nginx's ``proxy_cache_use_stale http_500
        http_502 http_503 http_504``). The decision is taken before a byte
        of the 5xx is written, so the client gets one answer or the other.
        """

        def unwanted(response: UpstreamResponse) -> bool:
            if response.code not in STALE_IF_ERROR_STATUSES:
                return False
            stored = self._store.lookup(key, headers)
            return stored is not None and self._may_serve_stale(stored)

        return unwanted

    def _storable(self, request: GatewayRequest, route: Route, response: UpstreamResponse) -> bool:
        default_ttl = self._default_ttls.get(route.group)
        if default_ttl is None and not _states_a_lifetime(response.headers):
            # The common uncacheable answer, told without parsing a field.
            return False
        now = self._reactor.seconds()
        freshness = freshness_of(response.code, response.headers, now, now, default_ttl)
        # The client's own fields: a token the gateway turned into X-User-ID
        # still makes the answer that user's (RFC 9111 §3.5).
        asked_with = _fields_for_storing(request.requestHeaders)
        refusal = storage_refusal(b"GET", response.code, asked_with, response.headers, freshness)
        return refusal is None

    def _store_if_allowed(
        self, request: GatewayRequest, route: Route, key: bytes, headers: list[Header],
        response: WholeResponse,
    ) -> bool:
        freshness = freshness_of(
            response.code, response.headers, response.requested_at, response.received_at,
            self._default_ttls.get(route.group),
        )
        if storage_refusal(b"GET", response.code, _fields_for_storing(request.requestHeaders),
                           response.headers, freshness) is not None:
            return False
        return self._store.store(key, headers, StoredResponse(
            response.code, response.phrase, tuple(response.headers), response.body,
            response.requested_at, response.received_at, freshness,
        ))

    def _served_stale(
        self, request: GatewayRequest, route: Route, key: bytes, headers: list[Header],
        why: Forward, forward_status: int | None = None,
    ) -> bool:
        """No usable upstream answer: the stored copy answers if stale-if-error allows
        (RFC 5861 §4).

        Args:
            forward_status: The upstream's 5xx when it answered with one
                (``fwd-status``, RFC 9211 §2.3); None when it gave no answer.

        Returns:
            True when the stored copy answered; False when the caller's
            error stands (it then carries Cache-Status too).
        """
        stored = self._store.lookup(key, headers)
        if stored is not None and self._may_serve_stale(stored):
            request.responseHeaders.removeHeader(b"Cache-Status")
            self.answer_stored(request, route, stored, served_on_error(
                Forward.STALE, stored.freshness.remaining(self._reactor.seconds()),
                forward_status))
            return True
        status = forwarded(why)
        request.responseHeaders.setRawHeaders(b"Cache-Status", [status.header_value()])
        if "cache" not in request.log_fields:
            self._count(request, route, status)
        return False

    def _refresh(
        self, request: GatewayRequest, route: Route, key: bytes, url: str,
        headers: list[Header], timeout: float,
    ) -> None:
        """Fetch a fresh copy behind a stale answer (RFC 5861 §3), one per URL at a time."""
        assert route.service is not None
        service = route.service
        limit = self._settings.cache_max_entry_bytes

        def start() -> defer.Deferred[WholeResponse]:
            return defer.ensureDeferred(self._proxy.fetch_whole(
                b"GET", service, url, headers, timeout, None, limit))

        refreshing = self._refreshes.fetch(key, start)
        refreshing.addCallback(lambda whole: self._store_if_allowed(request, route, key, headers,
                                                                    whole))
        refreshing.addErrback(lambda failure: _log.msg(
            "cache_refresh_failed", level="warning", route=route.template,
            reason=failure.getErrorMessage()))

    def _may_serve_stale(self, stored: StoredResponse) -> bool:
        return may_serve_stale_on_error(
            stored.freshness, self._reactor.seconds(), self._settings.cache_stale_if_error
        )

    def answer_stored(
        self, request: GatewayRequest | HeadRequest, route: Route, stored: StoredResponse,
        status: CacheStatus,
    ) -> None:
        """Write a stored response whole: its fields, Content-Length, Age, Cache-Status."""
        request.setResponseCode(stored.status, stored.reason or None)
        copy_response_headers(stored.headers, request.responseHeaders)
        age = stored.freshness.current_age(self._reactor.seconds())
        request.responseHeaders.setRawHeaders(b"Age", [age_header_value(age)])
        if stored.status not in (204, 304):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(stored.body)])
        request.responseHeaders.addRawHeader(b"Cache-Status", status.header_value())
        self._count(request, route, status)
        if stored.status >= 400:
            request.outcome = request.outcome or "upstream_error"
        if request.method != b"HEAD" and stored.status not in (204, 304):
            request.write(stored.body)

    def _answer_only_if_cached(self, request: GatewayRequest, route: Route) -> None:
        """RFC 9111 §5.2.1.7: nothing stored may answer, and the client will not wait for more."""
        status = forwarded(Forward.REQUEST)
        request.setResponseCode(ONLY_IF_CACHED_STATUS)
        request.responseHeaders.setRawHeaders(b"Cache-Status", [status.header_value()])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
        request.outcome = "cache_only_if_cached"
        self._count(request, route, status)

    def _count(
        self, request: GatewayRequest | HeadRequest, route: Route, status: CacheStatus
    ) -> None:
        result = status.outcome.value
        request.log_fields["cache"] = result
        self._metrics.cache_request(route.template, result)


_NOTHING_ASKED = request_directives(())

_FORWARDED = {
    (why, stored): (status, status.header_value())
    for why in Forward
    for stored in (False, True)
    for status in (forwarded(why, stored=stored),)
}
"""Each forwarded Cache-Status once, with its field value: one is sent per forwarded request."""

_LIFETIME_FIELDS = frozenset({b"cache-control", b"expires"})
_LIFETIME_FIELD_LENGTHS = frozenset(len(name) for name in _LIFETIME_FIELDS)


def _states_a_lifetime(fields: list[Header]) -> bool:
    """Whether an answer has a field that could give it a lifetime (RFC 9111 §4.2.1).

    Asked of every forwarded answer: a name of another length is passed
    over without being lower-cased.
    """
    for name, _ in fields:
        if len(name) in _LIFETIME_FIELD_LENGTHS and name.lower() in _LIFETIME_FIELDS:
            return True
    return False


def _asked(request: GatewayRequest | HeadRequest) -> RequestDirectives:
    """The request's Cache-Control directives (RFC 9111 §5.2.1); most requests have none."""
    lines = request.requestHeaders.getRawHeaders(b"cache-control")
    if lines is None:
        return _NOTHING_ASKED
    return request_directives([(b"cache-control", line) for line in lines])


def _fields_for_storing(headers: Headers) -> list[Header]:
    """The client's fields that decide whether its answer may be stored (RFC 9111 §3, §3.5)."""
    return [
        (name, value)
        for name in (b"cache-control", b"authorization")
        for value in headers.getRawHeaders(name, ())
    ]


def _why_forwarded(url_known: bool, had_stored: bool, asked: RequestDirectives) -> Forward:
    if had_stored:
        return Forward.REQUEST if asked.no_cache or asked.max_age is not None else Forward.STALE
    return Forward.VARY_MISS if url_known else Forward.URI_MISS


def cache_store(settings: Settings) -> ResponseStore:
    """A store sized by CACHE_MAX_BYTES and CACHE_MAX_ENTRY_BYTES."""
    return ResponseStore(settings.cache_max_bytes, settings.cache_max_entry_bytes)
