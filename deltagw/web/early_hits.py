"""Answering a fresh cache hit as soon as its request head is read.

A hit is most of what a shared cache answers, and most of its cost was
twisted.web's: reading the head into a Request, routing it through
resources and Deferreds, and writing the answer field by field through
`Headers`. A request that the cache can answer as it stands, with
nothing to wait for, is answered here from the framer's reading of its
head, before twisted.web sees a byte of it, as nginx and Varnish answer
hits without a detour.

Nothing about the answer is decided here. The same functions as for
any other request fill it in, in the same order: the edge's
(`deltagw.web.before_routing.continue_trace`, `start_answer`), the
limiter's decision, the upstream URL and fields the cache key is made
of (`deltagw.web.application.Gateway`), the cache's stored answer
(`deltagw.web.shared_cache.SharedCache.answer_stored`), the access log
and metrics (`deltagw.web.site.GatewaySite.log`); only the last step,
turning the fields into bytes, is `deltagw.web.response_fields`' rather
than twisted.web's. ``tests/integration/test_early_hits.py`` sends the
same requests both ways and compares the bytes.

Everything else goes to twisted.web as before, decided before anything
is spent or written: a request that is not an HTTP/1.1 GET or HEAD in
origin form, one with a percent-escape, a body, Expect, Authorization or
``Connection: close``, one on a route that needs a token or is not forwarded,
while draining, when the connection has another request under way, and
whenever the cache would need the upstream (a miss, a stale answer to
refresh) or the limiter cannot allow it at once (Redis, or a refusal,
which spends nothing and is decided again with its 429).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from deltagw.cache.status import CacheStatus
from deltagw.cache.store import StoredResponse
from deltagw.errors import BadRequest
from deltagw.policy.buckets import Decision
from deltagw.policy.rate_limits import NotAtOnce
from deltagw.policy.route_access import REQUIRED
from deltagw.routes import Route
from deltagw.upstream.client import Header
from deltagw.web.application import ROUTE_INDEX, Gateway, set_rate_limit_fields
from deltagw.web.before_routing import continue_trace, start_answer
from deltagw.web.head_request import HeadRequest
from deltagw.web.request_tracker import RequestTracker
from deltagw.web.response_fields import http_date
from deltagw.web.shared_cache import SharedCache
from deltagw.web.site import GatewayChannel

_ANSWERED_METHODS = frozenset({b"GET", b"HEAD"})

_FIELDS_FOR_TWISTED_WEB = frozenset({
    b"authorization", b"content-length", b"expect", b"transfer-encoding",
})
"""Request fields that change how twisted.web reads or answers a request
(``100 Continue``, a body) or that ask for a token check; and Connection
with ``close`` (twisted.web then answers ``Connection: close`` and closes),
whatever else it holds, which twisted.web reads more narrowly."""


class _FieldsWhenRead(Sequence[Header]):
    """The upstream request's fields, made only if read: the cache reads them
    only for a stored answer that varies on some."""

    def __init__(self, make: Callable[[], list[Header]]) -> None:
        self._make = make
        self._made: list[Header] | None = None

    def _fields(self) -> list[Header]:
        if self._made is None:
            self._made = self._make()
        return self._made

    def __getitem__(self, index: Any) -> Any:
        return self._fields()[index]

    def __len__(self) -> int:
        return len(self._fields())

    def __iter__(self) -> Iterator[Header]:
        return iter(self._fields())


def _traced(request: HeadRequest) -> HeadRequest:
    """``request`` with its trace context, set once (first thing, as the edge sets it)."""
    if request.trace is None:
        continue_trace(request)
    return request


class EarlyHits:
    """Answers fresh cache hits at their head, for one `Gateway`.

    Args:
        gateway: The routes, policy and cache a request would meet.
        cache: That gateway's cache.
        tracker: Counts the requests being answered; says when draining.
    """

    def __init__(self, gateway: Gateway, cache: SharedCache, tracker: RequestTracker) -> None:
        self._gateway = gateway
        self._cache = cache
        self._tracker = tracker
        self._reactor = gateway.reactor
        self._settings = gateway.settings

    def answer(
        self, channel: GatewayChannel, request_line: bytes, fields: list[tuple[bytes, bytes]]
    ) -> bool:
        """Answer the request whose head was just read, if it is a fresh hit.

        Returns:
            True when it was answered (written, logged and counted);
            False when twisted.web must read it, nothing having been
            spent, written or logged for it.
        """
        method, target, version = request_line.split(b" ")
        if (
            version != b"HTTP/1.1"
            or method not in _ANSWERED_METHODS
            or not target.startswith(b"/")
            or b"%" in target
            or self._cache.is_empty()
            or self._tracker.draining
        ):
            return False
        for name, value in fields:
            lower = name.lower()
            if lower in _FIELDS_FOR_TWISTED_WEB or (
                lower == b"connection" and b"close" in value.lower()
            ):
                return False
        found = ROUTE_INDEX.match(method, target.split(b"?", 1)[0])
        if found is None:
            return False
        route, params = found
        gateway = self._gateway
        if (
            route.service is None
            or route.composed
            or gateway.authenticator.policy(route) == REQUIRED
        ):
            return False
        try:
            url = gateway.upstream_url(route, target, params)
        except BadRequest:
            return False
        request = HeadRequest(
            channel, method, target, fields, self._reactor.seconds(),
            self._settings.trusted_proxies,
        )
        stored = self._cache.fresh_answer(
            request, url, gateway.asked_origin(request),
            _FieldsWhenRead(lambda: gateway.upstream_headers(_traced(request), route, None)),
        )
        if stored is None:
            return False
        try:
            decision = gateway.limits.check_at_once(route, request.client_address)
        except NotAtOnce:
            return False
        self._answer(_traced(request), route, decision, *stored)
        return True

    def _answer(
        self, request: HeadRequest, route: Route, decision: Decision | None,
        stored: StoredResponse, status: CacheStatus,
    ) -> None:
        """Fill in, write and log the answer, as the routes through twisted.web do."""
        fields = request.responseHeaders
        server_field = self._settings.server_field
        if server_field is not None:
            fields.setRawHeaders(b"Server", [server_field])
        fields.setRawHeaders(b"Date", [http_date(self._reactor.seconds())])
        start_answer(request, self._reactor, self._gateway.cors)
        request.route = route.template
        if decision is not None:
            set_rate_limit_fields(request, decision)
        self._cache.answer_stored(request, route, stored, status)
        request.channel.transport.writeSequence(request.rendered())
        request.channel.site.log(request)
