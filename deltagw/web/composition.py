"""Backend for Frontend: composed routes answered from parallel upstream calls.

A composed row of the route table (``Route.parts``) is answered by
the gateway itself: it makes each part's upstream call at the same time,
through the same in-flight cap, circuit breaker, retry policy and timeout as
a forwarded call of that part's row (`deltagw.upstream.proxy.Proxy.fetch_json`),
shrinks each answer to what a dashboard shows, and returns one document:

    {"product": "NIFTY", "underlying": {...} | null, "chain": {...} | null,
     "pcr": {...} | null, "errors": [{"part", "service", "reason"}]}

The answer takes about as long as the slowest part, not the sum. A part that
fails is null and named in ``errors``; the rest still make a 200. Only when
no part succeeds is the whole answer an error: 404 when every part said 404
(the product is unknown), else 503 with ``Retry-After``. Per-part reasons go
to the access log (``partial_failures``) as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from deltagw.config import Settings
from deltagw.errors import (
    RETRY_AFTER_SECONDS,
    CompositionUnavailable,
    GatewayError,
    NotFound,
    UpstreamUnavailable,
    json_response,
    problem_document,
    write_error,
)
from deltagw.metrics import Metrics
from deltagw.routes import Part, Route, part_route
from deltagw.upstream.client import Header
from deltagw.upstream.proxy import Proxy
from deltagw.web.site import GatewayRequest

Summary = Callable[[Any], Any]

REPRESENTATION_FIELDS: frozenset[bytes] = frozenset({
    b"accept", b"accept-encoding", b"content-type", b"range", b"if-range",
    b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since",
})
"""Client fields that would change the shape of a part's answer (a 304, a 206,
a compressed or non-JSON body); the gateway asks each part for plain JSON."""


class InvalidPart(ValueError):
    """A part answered 2xx with a body that is not the document it should be."""


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def summarise_underlying(document: Any) -> dict[str, Any]:
    """The latest tick of ``GET /underlying/{product}?limit=1``.

    Returns:
        ``{"price", "timestamp"}``; both null when storage has no tick.
    """
    ticks = document["ticks"]
    if not isinstance(ticks, list):
        raise InvalidPart("ticks is not a list")
    if not ticks:
        return {"price": None, "timestamp": None}
    latest = ticks[0]
    return {"price": _number(latest["price"]), "timestamp": latest.get("timestamp")}


def _quote(option: dict[str, Any] | None) -> dict[str, Any] | None:
    if option is None:
        return None
    return {"last_price": _number(option.get("last_price")), "iv": _number(option.get("iv"))}


def summarise_chain(document: Any) -> dict[str, Any]:
    """What a dashboard shows of ``GET /option/chain/{product}`` (one expiry).

    Returns:
        Spot, expiry, the number of expiries listed and of strikes, the
        at-the-money strike (nearest spot) with its call and put last price
        and implied volatility, and the total call and put open interest.
    """
    spot = _number(document["spot"])
    calls, puts = document["calls"], document["puts"]
    if not isinstance(calls, list) or not isinstance(puts, list):
        raise InvalidPart("calls and puts must be lists")
    calls_by_strike = {_number(c["strike"]): c for c in calls}
    puts_by_strike = {_number(p["strike"]): p for p in puts}
    strikes = sorted(s for s in set(calls_by_strike) | set(puts_by_strike) if s is not None)
    atm: dict[str, Any] | None = None
    if strikes and spot is not None:
        strike = min(strikes, key=lambda s: (abs(s - spot), s))
        atm = {
            "strike": strike,
            "call": _quote(calls_by_strike.get(strike)),
            "put": _quote(puts_by_strike.get(strike)),
        }
    expiries = document.get("expiries")
    return {
        "spot": spot,
        "expiry": document.get("expiry"),
        "expiries": len(expiries) if isinstance(expiries, list) else None,
        "strikes": len(strikes),
        "atm": atm,
        "total_call_oi": sum(int(c.get("open_interest") or 0) for c in calls),
        "total_put_oi": sum(int(p.get("open_interest") or 0) for p in puts),
    }


PCR_FIELDS = (
    "expiry", "pcr_oi", "pcr_volume", "total_call_oi", "total_put_oi",
    "total_call_volume", "total_put_volume",
)


def summarise_pcr(document: Any) -> dict[str, Any]:
    """The put/call ratios of ``GET /pcr/{product}``, without the echoed product."""
    if "pcr_oi" not in document:
        raise InvalidPart("no pcr_oi")
    return {name: document.get(name) for name in PCR_FIELDS}


SUMMARIES: dict[str, Summary] = {
    "underlying": summarise_underlying,
    "chain": summarise_chain,
    "pcr": summarise_pcr,
}
"""How each part's upstream document is shrunk, by part name."""


class _Failed:
    """Why one part has no value: for ``errors``, the log and the status."""

    def __init__(self, part: Part, route: Route, reason: str, retry_after: int | None = None):
        self.part = part
        self.route = route
        self.reason = reason
        self.retry_after = retry_after

    def entry(self) -> dict[str, str]:
        assert self.route.service is not None
        return {"part": self.part.name, "service": self.route.service.name, "reason": self.reason}


class Composer:
    """Answers composed routes by calling their parts in parallel.

    Args:
        settings: Upstream URLs and timeouts.
        reactor: The clock the parts' latencies are measured on.
        proxy: Makes each call through the shared breakers and in-flight caps.
        metrics: Where each part's upstream call is observed.
        path_for: The upstream path of a row for the path parameters,
            refusing unsafe values (``deltagw.web.application.upstream_path``).
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        proxy: Proxy,
        metrics: Metrics,
        path_for: Callable[[Route, dict[str, str]], str],
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._proxy = proxy
        self._metrics = metrics
        self._path_for = path_for

    async def compose(
        self,
        route: Route,
        request: GatewayRequest,
        params: dict[str, str],
        headers_for: Callable[[Route], list[Header]],
    ) -> bytes:
        """Answer ``request`` for the composed ``route``.

        Args:
            route: A row with ``parts``.
            request: The client's request (a ``GatewayRequest``).
            params: The path parameters.
            headers_for: Builds the header fields of one upstream call for a
                part's row (forwarding fields, request id, trace context,
                identity), as a forwarded call of that row would carry.

        Raises:
            BadRequest: a path parameter that may not reach an upstream.
        """
        calls = []
        for part in route.parts:
            target = part_route(part)
            # Every URL is built (and every parameter checked) before any
            # call starts, so a bad request never half-reaches the upstreams.
            assert target.service is not None
            url = self._settings.upstream_url(target.service.name) + self._path_for(target, params)
            if part.query:
                url += "?" + part.query
            calls.append((part, target, url))
        latencies: dict[str, float] = {}
        try:
            results = await defer.gatherResults([
                defer.Deferred.fromCoroutine(
                    self._part(part, target, url, _part_headers(headers_for(target)), latencies)
                )
                for part, target, url in calls
            ], consumeErrors=True)
        except defer.FirstError as e:
            # A part answers every upstream failure with a `_Failed`; what
            # fails here is a part cancelled because its client went away.
            e.subFailure.raiseException()
        request.log_fields["parts_latency_ms"] = latencies

        document: dict[str, Any] = dict(params)
        failed: list[_Failed] = []
        for (part, target, _), result in zip(calls, results, strict=True):
            if isinstance(result, _Failed):
                failed.append(result)
                document[part.name] = None
            else:
                document[part.name] = result
        errors = [f.entry() for f in failed]
        document["errors"] = errors
        if failed:
            request.log_fields["partial_failures"] = errors
        if len(failed) < len(calls):
            if failed:
                request.outcome = "partial"
            return json_response(request, document)
        return _failure_answer(request, failed, errors)

    async def _part(
        self, part: Part, target: Route, url: str, headers: list[Header], latencies: dict[str, float]
    ) -> Any:
        """One part's summary, or a `_Failed` saying why there is none."""
        service = target.service
        assert service is not None

        def note(name: str, started: float, failure: str | None) -> None:
            elapsed = self._reactor.seconds() - started
            latencies[part.name] = round(elapsed * 1000, 3)
            self._metrics.observe_upstream(name, elapsed, failure)

        try:
            status, body = await self._proxy.fetch_json(
                service, url, headers, self._settings.upstream_timeout(service.name), note=note
            )
        except UpstreamUnavailable as e:
            return _Failed(part, target, e.reason, _retry_after(e))
        if not 200 <= status < 300:
            return _Failed(part, target, f"status {status}")
        try:
            return SUMMARIES[part.name](body)
        except (InvalidPart, KeyError, TypeError, ValueError, AttributeError):
            return _Failed(part, target, "invalid_response")


def _part_headers(headers: list[Header]) -> list[Header]:
    """A part's header fields: the forwarded ones, asking for plain JSON."""
    kept = [(name, value) for name, value in headers if name.lower() not in REPRESENTATION_FIELDS]
    return [*kept, (b"Accept", b"application/json")]


def _retry_after(error: UpstreamUnavailable) -> int | None:
    for name, value in error.headers:
        if name.lower() == b"retry-after":
            return int(value)
    return None


def _failure_answer(request: GatewayRequest, failed: list[_Failed], errors: list[dict[str, str]]) -> bytes:
    """The error answer when no part succeeded, with ``errors`` as an RFC 9457
    extension member."""
    error: GatewayError
    if all(f.reason == "status 404" for f in failed):
        error = NotFound("Product not found")
    else:
        titles: list[str] = []
        for f in failed:
            assert f.route.service is not None
            if f.reason != "status 404" and f.route.service.title not in titles:
                titles.append(f.route.service.title)
        # The overview is back (partly) as soon as any part is: the soonest hint.
        hints = [f.retry_after for f in failed if f.retry_after is not None]
        error = CompositionUnavailable(titles, min(hints) if hints else RETRY_AFTER_SECONDS)
    request.outcome = error.outcome
    write_error(request, error)
    document = problem_document(error.status, error.message, request.request_id.decode("ascii"))
    document["errors"] = errors
    content_type = request.responseHeaders.getRawHeaders(b"content-type", [b"application/json"])[0]
    return json_response(request, document, content_type)

