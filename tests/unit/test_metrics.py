"""Metrics: bounded labels, the right instruments, a registry of their own."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from deltagw.metrics import CONTENT_TYPE, MAX_REMEMBERED_REQUESTS, REQUEST_BUCKETS, Metrics
from deltagw.routes import ROUTES, SERVICES

CHAIN = "/api/data/chain/{product}"


def _series(metrics: Metrics) -> int:
    """How many samples the registry exposes (one per series and bucket)."""
    return sum(len(family.samples) for family in metrics.registry.collect())


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.value = self.metrics.registry.get_sample_value

    def test_request_counted_by_route_method_status(self) -> None:
        """A request is counted under its template, method and status."""
        self.metrics.observe_request(CHAIN, "GET", 200, 0.012)
        self.metrics.observe_request(CHAIN, "GET", 200, 0.020)
        self.metrics.observe_request(CHAIN, b"GET", 503, 0.5)
        labels = {"route": CHAIN, "method": "GET", "status": "200"}
        self.assertEqual(self.value("deltagw_http_requests_total", labels), 2.0)
        self.assertEqual(
            self.value("deltagw_http_requests_total", {**labels, "status": "503"}), 1.0
        )

    def test_duration_histogram(self) -> None:
        """Durations land in the route's histogram with gateway-sized buckets."""
        self.metrics.observe_request(CHAIN, "GET", 200, 0.004)
        self.metrics.observe_request(CHAIN, "GET", 200, 3.0)
        name = "deltagw_http_request_duration_seconds"
        self.assertEqual(self.value(name + "_count", {"route": CHAIN}), 2.0)
        self.assertAlmostEqual(self.value(name + "_sum", {"route": CHAIN}), 3.004)
        self.assertEqual(self.value(name + "_bucket", {"route": CHAIN, "le": "0.005"}), 1.0)
        self.assertEqual(self.value(name + "_bucket", {"route": CHAIN, "le": "0.001"}), 0.0)
        self.assertEqual(self.value(name + "_bucket", {"route": CHAIN, "le": "+Inf"}), 2.0)
        self.assertEqual((REQUEST_BUCKETS[0], REQUEST_BUCKETS[-1]), (0.001, 10.0))

    def test_unknown_route_is_unmatched(self) -> None:
        """None, raw paths and unknown strings are all labelled "unmatched"."""
        for route in (None, "/api/data/chain/NIFTY", "/nope", ""):
            self.metrics.observe_request(route, "GET", 404, 0.001)
        self.assertEqual(
            self.value("deltagw_http_requests_total",
                       {"route": "unmatched", "method": "GET", "status": "404"}),
            4.0,
        )
        self.assertEqual(self.metrics.route_label("/api/data/chain/NIFTY"), "unmatched")

    def test_every_template_is_a_route_label(self) -> None:
        """Both prefixes' templates of every table row are accepted as labels."""
        for route in ROUTES:
            for path in route.public_paths:
                self.assertEqual(self.metrics.route_label(path), path)

    def test_method_normalisation(self) -> None:
        """Methods outside the standard seven are labelled "other"."""
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            self.assertEqual(Metrics.method_label(method), method)
        for method in ("BREW", "get", "PROPFIND", b"X" * 100, "TRACE"):
            self.assertEqual(Metrics.method_label(method), "other")
        self.metrics.observe_request(CHAIN, "BREW", 405, 0.001)
        self.assertEqual(
            self.value("deltagw_http_requests_total",
                       {"route": CHAIN, "method": "other", "status": "405"}),
            1.0,
        )

    def test_remembered_request_series_are_bounded(self) -> None:
        """Invented methods are counted as "other" whether or not their series is
        remembered, and no more than MAX_REMEMBERED_REQUESTS are."""
        for i in range(MAX_REMEMBERED_REQUESTS + 50):
            self.metrics.observe_request(CHAIN, f"X{i}", 405, 0.001)
            self.metrics.observe_request(CHAIN, f"X{i}", 405, 0.001)
        self.assertEqual(len(self.metrics._request_series), MAX_REMEMBERED_REQUESTS)
        self.assertEqual(
            self.value("deltagw_http_requests_total",
                       {"route": CHAIN, "method": "other", "status": "405"}),
            2.0 * (MAX_REMEMBERED_REQUESTS + 50),
        )

    def test_cache_results_by_route_within_bounds(self) -> None:
        """Cache results are counted by template and result; unknown routes are
        unmatched, and no more than MAX_REMEMBERED_REQUESTS of them are remembered."""
        self.metrics.cache_request(CHAIN, "bypass")
        self.metrics.cache_request(CHAIN, "bypass")
        for i in range(MAX_REMEMBERED_REQUESTS + 10):
            self.metrics.cache_request(f"/unknown/{i}", "miss")
        self.assertEqual(self.value("deltagw_cache_requests_total",
                                    {"route": CHAIN, "result": "bypass"}), 2.0)
        self.assertEqual(self.value("deltagw_cache_requests_total",
                                    {"route": "unmatched", "result": "miss"}),
                         MAX_REMEMBERED_REQUESTS + 10.0)
        self.assertEqual(len(self.metrics._cache_series), MAX_REMEMBERED_REQUESTS)

    def test_odd_status_is_other(self) -> None:
        """A status outside 100-599 cannot add series either."""
        self.metrics.observe_request(CHAIN, "GET", 999, 0.001)
        self.assertEqual(
            self.value("deltagw_http_requests_total",
                       {"route": CHAIN, "method": "GET", "status": "other"}),
            1.0,
        )

    def test_unknown_paths_add_no_series(self) -> None:
        """1,000 distinct unknown paths and methods cost no more series than one."""
        self.metrics.observe_request("/unknown/0", "GET", 404, 0.001)
        self.metrics.observe_request("/unknown/0", "FOO0", 404, 0.001)
        before = _series(self.metrics)
        for i in range(1000):
            self.metrics.observe_request(f"/unknown/{i}", "GET", 404, 0.001)
            self.metrics.observe_request(f"/api/data/chain/P{i}", f"FOO{i}", 404, 0.001)
        self.assertEqual(_series(self.metrics), before)
        self.assertEqual(
            self.value("deltagw_http_requests_total",
                       {"route": "unmatched", "method": "GET", "status": "404"}),
            1001.0,
        )

    def test_upstream_duration_and_failures(self) -> None:
        """Upstream calls are timed per service; failures counted per reason."""
        self.metrics.observe_upstream("storage", 0.05, None)
        self.metrics.observe_upstream("storage", 10.0, "timeout")
        self.metrics.observe_upstream("storage", None, "body_timeout")
        self.assertEqual(
            self.value("deltagw_upstream_request_duration_seconds_count", {"service": "storage"}),
            2.0,
        )
        self.assertEqual(
            self.value("deltagw_upstream_request_duration_seconds_bucket",
                       {"service": "storage", "le": "30.0"}),
            2.0,
        )
        for reason in ("timeout", "body_timeout"):
            self.assertEqual(
                self.value("deltagw_upstream_failures_total",
                           {"service": "storage", "reason": reason}),
                1.0,
            )
        self.assertIsNone(
            self.value("deltagw_upstream_failures_total", {"service": "storage", "reason": "ok"})
        )

    def test_upstream_labels_are_bounded(self) -> None:
        """Unknown services and odd reasons are "other"."""
        self.metrics.observe_upstream("mystery", 0.1, "Weird Reason!")
        self.assertEqual(
            self.value("deltagw_upstream_failures_total", {"service": "other", "reason": "other"}),
            1.0,
        )

    def test_rate_limited_by_group(self) -> None:
        """429s are counted by route group; an unknown group is "other"."""
        self.metrics.rate_limited("data")
        self.metrics.rate_limited("data")
        self.metrics.rate_limited("bogus")
        self.assertEqual(self.value("deltagw_rate_limited_total", {"group": "data"}), 2.0)
        self.assertEqual(self.value("deltagw_rate_limited_total", {"group": "other"}), 1.0)

    def test_every_service_starts_closed_with_nothing_in_flight(self) -> None:
        """Before the proxy is watched, every service's gauges read closed (0) and 0 calls."""
        for service in SERVICES:
            self.assertEqual(self.value("deltagw_circuit_state", {"service": service.name}), 0.0)
            self.assertEqual(
                self.value("deltagw_upstream_in_flight", {"service": service.name}), 0.0
            )

    def test_upstream_durations_not_observed_without_a_timed_call(self) -> None:
        """Shed, circuit_open and body_* failures are counted but add no duration."""
        for reason in ("shed", "circuit_open", "body_timeout", "body_reset"):
            self.metrics.observe_upstream("analytics", 0.0001, reason)
            self.assertEqual(
                self.value("deltagw_upstream_failures_total",
                           {"service": "analytics", "reason": reason}),
                1.0,
            )
        self.assertIsNone(
            self.value("deltagw_upstream_request_duration_seconds_count", {"service": "analytics"})
        )

    def test_watch_reads_proxy_state_at_scrape(self) -> None:
        """watch() makes the gauges read the proxy's in-flight counts and breaker states."""

        class Breaker:
            state = "closed"

        in_flight = {"storage": 0, "auth": 0, "analytics": 0}
        breakers = {"storage": Breaker(), "auth": Breaker(), "analytics": Breaker()}
        self.metrics.watch(in_flight=in_flight, breakers=breakers)
        in_flight["storage"] = 7
        breakers["storage"].state = "open"
        breakers["auth"].state = "half_open"
        self.assertEqual(self.value("deltagw_upstream_in_flight", {"service": "storage"}), 7.0)
        self.assertEqual(self.value("deltagw_circuit_state", {"service": "storage"}), 2.0)
        self.assertEqual(self.value("deltagw_circuit_state", {"service": "auth"}), 1.0)
        self.assertEqual(self.value("deltagw_circuit_state", {"service": "analytics"}), 0.0)

    def test_watch_works_with_the_real_proxy(self) -> None:
        """The real Proxy's in_flight and breakers plug straight in."""
        from twisted.internet.task import Clock

        from deltagw.upstream.proxy import Proxy

        proxy = Proxy(Clock(), client=None)  # type: ignore[arg-type]
        self.metrics.watch(in_flight=proxy.in_flight, breakers=proxy.breakers)
        proxy.in_flight["storage"] += 1
        for _ in range(5):
            proxy.breakers["analytics"].acquire()
            proxy.breakers["analytics"].record_failure()
        self.assertEqual(self.value("deltagw_upstream_in_flight", {"service": "storage"}), 1.0)
        self.assertEqual(self.value("deltagw_circuit_state", {"service": "analytics"}), 2.0)

    def test_rate_limiter_up_follows_the_limiter_state(self) -> None:
        """deltagw_rate_limiter_up is 1 until watched, then 0 exactly while the
        limiter's backend is connecting or unreachable, read at each scrape."""
        name = "deltagw_rate_limiter_up"
        self.assertEqual(self.value(name), 1.0)
        state = ["connecting"]
        self.metrics.watch(limiter_state=lambda: state[0])
        seen = {}
        for state[0] in ("connecting", "connected", "unavailable", "ready", "off"):
            seen[state[0]] = self.value(name)
        self.assertEqual(
            seen,
            {"connecting": 0.0, "connected": 1.0, "unavailable": 0.0, "ready": 1.0, "off": 1.0},
        )

    def test_render(self) -> None:
        """render gives the 0.0.4 text format with its content type, parseable by Prometheus."""
        self.metrics.observe_request(CHAIN, "GET", 200, 0.01)
        body, content_type = self.metrics.render()
        self.assertTrue(content_type.startswith(b"text/plain; version=0.0.4"))
        self.assertEqual(content_type, CONTENT_TYPE)
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        self.assertLessEqual(
            {"deltagw_http_requests", "deltagw_http_request_duration_seconds",
             "deltagw_upstream_request_duration_seconds", "deltagw_upstream_failures",
             "deltagw_rate_limited", "deltagw_circuit_state", "deltagw_upstream_in_flight",
             "deltagw_rate_limiter_up"},
            names,
        )
        self.assertIn(b'deltagw_http_requests_total{method="GET",route="' + CHAIN.encode()
                      + b'",status="200"} 1.0', body)

    def test_registries_are_separate(self) -> None:
        """Two gateways' metrics do not share counts, and the global registry stays clean."""
        other = Metrics()
        self.metrics.rate_limited("data")
        self.assertIsNone(other.registry.get_sample_value("deltagw_rate_limited_total",
                                                          {"group": "data"}))
        self.assertIsNone(REGISTRY.get_sample_value("deltagw_rate_limited_total",
                                                    {"group": "data"}))

    def test_negative_duration_is_clamped(self) -> None:
        """A clock step backwards cannot record a negative duration."""
        self.metrics.observe_request(CHAIN, "GET", 200, -1.0)
        self.assertEqual(
            self.value("deltagw_http_request_duration_seconds_sum", {"route": CHAIN}), 0.0
        )
