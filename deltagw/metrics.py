"""Prometheus metrics of one gateway (written after the access log, once the answer is sent).

Every label value is drawn from a closed set, so no client can grow the
number of series: ``route`` is a route template from the table or
``unmatched``, ``method`` one of seven methods or ``other``, ``service`` a
service of the table, ``group`` a route group. A scan of a million unknown
paths costs one ``unmatched`` series, not a million.

Each gateway owns a `Metrics` with its own ``CollectorRegistry`` (never
prometheus_client's global one): tests and several gateways in one process
(``--demo``) do not share or collide on counters.

The series every request updates are plain numbers (`deltagw.metric_series`),
remembered by the raw values of a request, so a request costs a dict
lookup and an addition per series instead of prometheus_client's locked
``labels()`` and ``inc()``; the rarer ones are prometheus_client's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from deltagw import __version__
from deltagw.metric_series import CountedSeries, TimedSeries, Timings
from deltagw.routes import ROUTES, SERVICES, Route, Service

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The text exposition format `generate_latest` writes (prometheus_client's
CONTENT_TYPE_LATEST now names a newer format, so it is spelled out here)."""

UNMATCHED = "unmatched"
OTHER = "other"

MAX_REMEMBERED_REQUESTS = 1024
"""Label values whose series `Metrics` remembers per kind: (route, method, status)
for `Metrics.observe_request`, (route, result) for `Metrics.cache_request`."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: a cached local answer takes ~1 ms, a slow analytics call ~10 s."""

UPSTREAM_BUCKETS = REQUEST_BUCKETS + (30.0,)
"""Upstream calls also reach ANALYTICS_TIMEOUT (30 s by default)."""

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
"""``deltagw.upstream.breaker`` state names -> gauge value."""

_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

LIMITER_DOWN_STATES = frozenset({"connecting", "unavailable"})
"""Rate limiter states (``RateLimits.readiness``) in which its backend cannot
decide: ``deltagw_rate_limiter_up`` is 0 in them, 1 in any other (``connected``,
``ready`` for in-process buckets, ``off``)."""

NOT_TIMED_REASONS = frozenset({"shed", "circuit_open"})
"""Failures where no upstream call was made: counted, but their (near zero)
durations would only drag the upstream latency histogram down."""


class Metrics:
    """The gateway's metrics, in a registry of their own.

    Args:
        routes: The route table; its templates are the only ``route`` values.
        services: The upstream services; their names are the only
            ``service`` values (their circuit and in-flight gauges start at 0).
    """

    def __init__(
        self, routes: Iterable[Route] = ROUTES, services: Iterable[Service] = SERVICES
    ) -> None:
        routes = tuple(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        # Every public template (both prefixes) is accepted, so a caller that
        # labels with the /api/v1 form still gets a bounded label.
        self._routes = frozenset(path for route in routes for path in route.public_paths)
        self._groups = frozenset(route.group for route in routes)
        self._services = frozenset(service.name for service in services)

        self._requests = CountedSeries(
            "deltagw_http_requests", "Requests answered, by route template, method and status.",
            ("route", "method", "status"),
        )
        self._request_seconds = TimedSeries(
            "deltagw_http_request_duration_seconds",
            "Time from the request reaching the gateway to the end of its response.",
            ("route",), REQUEST_BUCKETS,
        )
        self._upstream_seconds = TimedSeries(
            "deltagw_upstream_request_duration_seconds",
            "Time until an upstream's response headers arrived (or the call failed).",
            ("service",), UPSTREAM_BUCKETS,
        )
        for series in (self._requests, self._request_seconds, self._upstream_seconds):
            self.registry.register(series)
        self._upstream_failures = Counter(
            "deltagw_upstream_failures", "Upstream calls that failed, by service and reason.",
            ("service", "reason"), registry=self.registry,
        )
        self._rate_limited = Counter(
            "deltagw_rate_limited", "Requests refused with 429, by route group.",
            ("group",), registry=self.registry,
        )
        self._circuit = Gauge(
            "deltagw_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ("service",), registry=self.registry,
        )
        self._in_flight = Gauge(
            "deltagw_upstream_in_flight", "Upstream calls in progress.",
            ("service",), registry=self.registry,
        )
        # Which deltagw runs, and the standard process_* series (memory,
        # CPU seconds, open and max file descriptors) of this process.
        Info("deltagw_build", "The deltagw version serving.", registry=self.registry).info(
            {"version": __version__}
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._limiter_up = Gauge(
            "deltagw_rate_limiter_up",
            "1 while the rate limiter can decide (Redis connected, in-process buckets, "
            "limiting off); 0 while its backend is connecting or unreachable.",
            registry=self.registry,
        )
        self._limiter_up.set(1)
        self._cache_requests = CountedSeries(
            "deltagw_cache_requests",
            "Requests of cached routes, by route template and cache result "
            "(hit, stale, miss, bypass).",
            ("route", "result"),
        )
        self.registry.register(self._cache_requests)
        self._cache_state = _CacheCollector()
        self.registry.register(self._cache_state)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._request_series: dict[tuple[Any, ...], tuple[list[float], Timings]] = {}
        self._cache_series: dict[tuple[str | None, str], list[float]] = {}
        for name in sorted(self._services):
            self._child(self._circuit, name).set(0)
            self._child(self._in_flight, name).set(0)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def route_label(self, route: str | None) -> str:
        """``route`` if it is a template of the table, else ``unmatched``."""
        return route if route in self._routes else UNMATCHED

    @staticmethod
    def method_label(method: str | bytes) -> str:
        """The method, or ``other`` for any method outside `METHODS`."""
        if isinstance(method, bytes):
            method = method.decode("ascii", "replace")
        return method if method in METHODS else OTHER

    def _service_label(self, service: str) -> str:
        return service if service in self._services else OTHER

    def observe_request(
        self, route: str | None, method: str | bytes, status: int, seconds: float
    ) -> None:
        """Count one answered (or abandoned: status 499) request and its duration.

        Args:
            route: The matched route template (``request.route``), or None.
            method: The request method.
            status: The response status.
            seconds: From arrival to the end of the response.
        """
        series = self._request_series.get((route, method, status))
        if series is None:
            series = self._series_of_request(route, method, status)
        count, duration = series
        count[0] += 1
        duration.observe(max(0.0, seconds))

    def _series_of_request(
        self, route: str | None, method: str | bytes, status: int
    ) -> tuple[list[float], Timings]:
        """The count and duration series a request goes to, remembered by its raw values.

        Requests come with the same few (route, method, status) again and
        again: their labels are worked out once. Past `MAX_REMEMBERED_REQUESTS`
        a new one is not remembered (a client inventing methods cannot grow it).
        """
        route_label = self.route_label(route)
        status_label = str(status) if 100 <= status <= 599 else OTHER
        series = (
            self._requests.series(route_label, self.method_label(method), status_label),
            self._request_seconds.series(route_label),
        )
        if len(self._request_series) < MAX_REMEMBERED_REQUESTS:
            self._request_series[route, method, status] = series
        return series

    def observe_upstream(
        self, service: str, seconds: float | None, failure_reason: str | None = None
    ) -> None:
        """Record one upstream call.

        Args:
            service: The service name (``storage``).
            seconds: Time to response headers or to the failure; None to
                count a failure only. Ignored for ``body_*`` reasons (the
                call's headers were observed already) and for `NOT_TIMED_REASONS`
                (no call was made), so this can be fed every
                ``request.note_upstream`` as it comes.
            failure_reason: Why it failed (``timeout``, ``refused``,
                ``body_timeout``, ``shed``, ...) or None on success. Reasons
                come from code, not clients; anything not shaped like one is
                ``other``.
        """
        label = self._service_label(service)
        if failure_reason is not None and (
            failure_reason in NOT_TIMED_REASONS or failure_reason.startswith("body_")
        ):
            # A body failure comes after the same call's headers were
            # already observed; shed and circuit_open made no call at all.
            seconds = None
        if seconds is not None:
            self._upstream_seconds.series(label).observe(max(0.0, seconds))
        if failure_reason is not None:
            reason = failure_reason if _REASON.match(failure_reason) else OTHER
            self._child(self._upstream_failures, label, reason).inc()

    def cache_request(self, route: str | None, result: str) -> None:
        """Count one request of a cached route by its result (``hit``, ``stale``, ...)."""
        series = self._cache_series.get((route, result))
        if series is None:
            series = self._cache_requests.series(self.route_label(route), result)
            if len(self._cache_series) < MAX_REMEMBERED_REQUESTS:
                self._cache_series[route, result] = series
        series[0] += 1

    def watch_cache(self, state: Callable[[], Any]) -> None:
        """Read the cache's size, evictions and coalesced waiters at scrape time.

        Args:
            state: Returns ``(store, fills)``: the objects in use now (a
                settings reload may replace the store); ``fills.waited``
                counts requests that waited for another's upstream call.
        """
        self._cache_state.state = state

    def rate_limited(self, group: str) -> None:
        """Count one request refused by the rate limiter."""
        self._child(self._rate_limited, group if group in self._groups else OTHER).inc()

    def watch(
        self,
        in_flight: Mapping[str, int] | None = None,
        breakers: Mapping[str, Any] | None = None,
        limiter_state: Callable[[], str] | None = None,
    ) -> None:
        """Read the in-flight, circuit and rate limiter gauges at scrape time.

        The proxy already keeps both (``Proxy.in_flight``, ``Proxy.breakers``),
        so the gauges read them when scraped and the request path does
        nothing at all.

        Args:
            in_flight: Calls in flight by service name.
            breakers: Objects with a ``state`` (``closed``, ``half_open``,
                ``open``) by service name.
            limiter_state: Returns the rate limiter's state (``connected``,
                ``unavailable``, ...): ``deltagw_rate_limiter_up`` is 0 for
                `LIMITER_DOWN_STATES`, 1 otherwise.
        """
        if in_flight is not None:
            for name in in_flight:
                self._child(self._in_flight, self._service_label(name)).set_function(
                    _reader(in_flight, name)
                )
        for name, breaker in (breakers or {}).items():
            self._child(self._circuit, self._service_label(name)).set_function(
                _state_reader(breaker)
            )
        if limiter_state is not None:
            self._limiter_up.set_function(
                lambda: 0.0 if limiter_state() in LIMITER_DOWN_STATES else 1.0
            )

    def render(self) -> tuple[bytes, bytes]:
        """The exposition: ``(body, content type)`` for a ``/metrics`` answer."""
        return generate_latest(self.registry), CONTENT_TYPE


def _reader(counts: Mapping[str, int], name: str) -> Callable[[], float]:
    return lambda: float(counts.get(name, 0))


def _state_reader(breaker: Any) -> Callable[[], float]:
    return lambda: float(CIRCUIT_STATES.get(breaker.state, 0))


class _NoCache:
    """What a gateway without a cache reports: nothing stored, nothing waited."""

    stored_bytes = entries = evictions = waited = 0


_NO_CACHE = _NoCache()


class _CacheCollector:
    """The cache's own counts, read from the store and the coalescer when scraped.

    A collector rather than gauges with a function: evictions and coalesced
    waiters are counters, which prometheus_client cannot read from a function.
    """

    def __init__(self) -> None:
        self.state: Callable[[], Any] | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        store, fills = self.state() if self.state is not None else (_NO_CACHE, _NO_CACHE)
        yield GaugeMetricFamily(
            "deltagw_cache_bytes", "Bytes the cache holds, as it accounts them.",
            value=store.stored_bytes,
        )
        yield GaugeMetricFamily(
            "deltagw_cache_entries", "URLs the cache holds a response for.", value=store.entries
        )
        yield CounterMetricFamily(
            "deltagw_cache_evictions", "Entries dropped to stay within CACHE_MAX_BYTES.",
            value=store.evictions,
        )
        yield CounterMetricFamily(
            "deltagw_cache_coalesced", "Requests that waited for another's upstream call "
            "instead of making their own.", value=fills.waited,
        )
