"""Tests for deltagw.cache.freshness: lifetime, age, and when a stored response may answer."""

from __future__ import annotations

import calendar
from email.utils import formatdate

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.directives import (
    MAX_DELTA_SECONDS,
    RequestDirectives,
    ResponseDirectives,
    request_directives,
)
from deltagw.cache.freshness import (
    Freshness,
    StoredUse,
    age_value,
    corrected_initial_age,
    freshness_lifetime,
    freshness_of,
    may_serve_stale_on_error,
    parse_http_date,
    use_of_stored,
)

PROPERTY = settings(database=None, derandomize=True, deadline=None)
"""Hypothesis, repeatable and without a database in the working tree."""

START = float(calendar.timegm((2026, 12, 5, 14, 0, 0)))
"""Where the test clock starts: a Saturday, so dates read naturally."""

NOV_6_1994 = 784111777.0
"""Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110 §5.6.7's example."""


def http_date(seconds: float) -> bytes:
    return formatdate(seconds, usegmt=True).encode()


def asks(line: bytes) -> RequestDirectives:
    return request_directives([(b"Cache-Control", line)])


class HttpDateTests(SynchronousTestCase):
    """HTTP-date (RFC 9110 §5.6.7)."""

    def test_three_formats(self) -> None:
        """RFC 9110 §5.6.7: IMF-fixdate, RFC 850 and asctime dates are all read."""
        for value in (
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
            b" sun, 06 NOV 1994 08:49:37 gmt\t",
        ):
            self.assertEqual(parse_http_date(value, START), NOV_6_1994, value)

    def test_rfc850_year_more_than_50_years_ahead_is_in_the_past(self) -> None:
        """RFC 9110 §5.6.7: a two-digit year is never read as more than 50 years ahead."""
        self.assertEqual(parse_http_date(b"Tuesday, 01-Jan-76 00:00:00 GMT", START),
                         float(calendar.timegm((2076, 1, 1, 0, 0, 0))))
        self.assertEqual(parse_http_date(b"Friday, 01-Jan-77 00:00:00 GMT", START),
                         float(calendar.timegm((1977, 1, 1, 0, 0, 0))))

    def test_invalid_dates(self) -> None:
        """RFC 9111 §5.3: "0" and other non-dates are no dates (the caller decides the meaning)."""
        for value in (
            b"0", b"", b"-1", b"tomorrow",
            b"Sun, 06 Nov 1994 08:49:37",
            b"Sun, 06 Nov 1994 08:49:37 CET",
            b"Sat, 31 Feb 2026 08:49:37 GMT",
            b"Sun, 06 Nov 1994 24:00:00 GMT",
            b"Sun, 06 Nov 0000 08:49:37 GMT",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
        ):
            self.assertIsNone(parse_http_date(value, START), value)

    def test_leap_second(self) -> None:
        """RFC 9110 §5.6.7: second 60 is a leap second, read as the next second."""
        self.assertEqual(parse_http_date(b"Sat, 31 Dec 2016 23:59:60 GMT", START),
                         float(calendar.timegm((2017, 1, 1, 0, 0, 0))))

    @PROPERTY
    @given(st.integers(min_value=0, max_value=253402300799))
    def test_round_trips_imf_fixdate(self, seconds: int) -> None:
        """Every IMF-fixdate the standard library writes reads back to the same second."""
        self.assertEqual(parse_http_date(http_date(seconds), START), float(seconds))

    @PROPERTY
    @given(st.binary(max_size=40))
    def test_never_raises(self, value: bytes) -> None:
        """Any bytes read as a date or as None."""
        parse_http_date(value, START)


class LifetimeTests(SynchronousTestCase):
    """The freshness lifetime in a shared cache (RFC 9111 §4.2.1, §4.2.2)."""

    def lifetime(self, directives: ResponseDirectives, expires: float | None = None,
                 status: int = 200, default_ttl: float | None = None) -> float:
        return freshness_lifetime(status, directives, START, expires, default_ttl)

    def test_s_maxage_beats_max_age_beats_expires(self) -> None:
        """RFC 9111 §4.2.1: a shared cache uses s-maxage, then max-age, then Expires."""
        self.assertEqual(self.lifetime(ResponseDirectives(max_age=60, s_maxage=10), START + 99), 10)
        self.assertEqual(self.lifetime(ResponseDirectives(max_age=60), START + 99), 60)
        self.assertEqual(self.lifetime(ResponseDirectives(), START + 99), 99)

    def test_expires_at_or_before_date_is_stale(self) -> None:
        """RFC 9111 §4.2.1: Expires minus Date, never below 0."""
        self.assertEqual(self.lifetime(ResponseDirectives(), START), 0)
        self.assertEqual(self.lifetime(ResponseDirectives(), START - 30), 0)

    def test_operator_ttl_only_where_heuristics_are_allowed(self) -> None:
        """RFC 9111 §4.2.2: a lifetime the response does not state, only for a
        heuristically cacheable status (RFC 9110 §15.1) or a public response."""
        self.assertEqual(self.lifetime(ResponseDirectives(), default_ttl=30), 30)
        self.assertEqual(self.lifetime(ResponseDirectives(), status=404, default_ttl=30), 30)
        self.assertEqual(self.lifetime(ResponseDirectives(), status=302, default_ttl=30), 0)
        self.assertEqual(self.lifetime(ResponseDirectives(), status=206, default_ttl=30), 0)
        self.assertEqual(
            self.lifetime(ResponseDirectives(public=True), status=302, default_ttl=30), 30
        )

    def test_operator_ttl_never_overrides_a_stated_lifetime(self) -> None:
        """RFC 9111 §4.2.2: no heuristic when the response states its freshness, even 0."""
        self.assertEqual(self.lifetime(ResponseDirectives(max_age=0), default_ttl=30), 0)
        self.assertEqual(self.lifetime(ResponseDirectives(), START - 1, default_ttl=30), 0)

    def test_nothing_stated_and_no_default_is_zero(self) -> None:
        """RFC 9111 §4.2.2: without the operator's default the cache guesses nothing."""
        self.assertEqual(self.lifetime(ResponseDirectives()), 0)


class AgeTests(SynchronousTestCase):
    """Age (RFC 9111 §4.2.3, §5.1)."""

    def test_apparent_age_from_date(self) -> None:
        """RFC 9111 §4.2.3: a Date 20 s before receipt makes the response 20 s old."""
        self.assertEqual(corrected_initial_age(0, START - 20, START - 1, START), 20)

    def test_age_header_plus_response_delay(self) -> None:
        """RFC 9111 §4.2.3: the Age received plus the time the call took."""
        self.assertEqual(corrected_initial_age(10, START, START - 2, START), 12)

    def test_larger_estimate_wins(self) -> None:
        """RFC 9111 §4.2.3: corrected_initial_age is the larger of the two."""
        self.assertEqual(corrected_initial_age(5, START - 30, START - 1, START), 30)
        self.assertEqual(corrected_initial_age(50, START - 30, START - 1, START), 51)

    def test_date_ahead_of_our_clock_is_not_a_negative_age(self) -> None:
        """RFC 9111 §4.2.3: apparent_age = max(0, response_time - date_value)."""
        self.assertEqual(corrected_initial_age(0, START + 300, START, START), 0)

    def test_age_field(self) -> None:
        """RFC 9111 §5.1: absent is 0; delta-seconds read; the first line counts."""
        self.assertEqual(age_value([]), 0)
        self.assertEqual(age_value([(b"Age", b" 17 ")]), 17)
        self.assertEqual(age_value([(b"age", b"3"), (b"Age", b"9")]), 3)

    def test_unreadable_age_is_stale_on_arrival(self) -> None:
        """RFC 9111 §4.2.1: an age that cannot be known cannot be known to be fresh."""
        for value in (b"-1", b"1.5", b"soon", b"3, 3"):
            self.assertEqual(age_value([(b"Age", value)]), MAX_DELTA_SECONDS, value)

    @PROPERTY
    @given(
        st.floats(min_value=0, max_value=MAX_DELTA_SECONDS),
        st.floats(min_value=-1e10, max_value=1e10),
        st.floats(min_value=-1e10, max_value=1e10),
        st.floats(min_value=-1e10, max_value=1e10),
        st.floats(min_value=-1e10, max_value=1e10),
    )
    def test_age_is_never_negative(self, age: float, date: float, request_time: float,
                                   response_time: float, now: float) -> None:
        """Whatever the clocks say, in any order, no age is negative."""
        initial = corrected_initial_age(age, date, request_time, response_time)
        self.assertGreaterEqual(initial, 0)
        freshness = Freshness(0.0, initial, response_time, ResponseDirectives())
        self.assertGreaterEqual(freshness.current_age(now), 0)
        self.assertGreaterEqual(freshness.current_age(now), initial)


class FreshnessOfTests(SynchronousTestCase):
    """A response's freshness, worked out as it arrives, then read off the clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    def arrive(self, *headers: tuple[bytes, bytes], status: int = 200, delay: float = 0.0,
               default_ttl: float | None = None) -> Freshness:
        """A response whose request was sent now and that arrives ``delay`` later."""
        request_time = self.clock.seconds()
        self.clock.advance(delay)
        return freshness_of(status, list(headers), request_time, self.clock.seconds(),
                            default_ttl)

    def test_fresh_until_lifetime_reached(self) -> None:
        """RFC 9111 §4.2: fresh while freshness_lifetime > current_age."""
        freshness = self.arrive((b"Date", http_date(START)), (b"Cache-Control", b"max-age=60"))
        self.assertEqual(freshness.lifetime, 60)
        self.clock.advance(59.5)
        self.assertTrue(freshness.is_fresh(self.clock.seconds()))
        self.assertEqual(freshness.remaining(self.clock.seconds()), 0.5)
        self.clock.advance(0.5)
        self.assertFalse(freshness.is_fresh(self.clock.seconds()))
        self.assertEqual(freshness.current_age(self.clock.seconds()), 60)

    def test_age_from_upstream_counts(self) -> None:
        """RFC 9111 §4.2.3: an Age of 50 leaves 10 s of a 60 s lifetime."""
        freshness = self.arrive((b"Age", b"50"), (b"Cache-Control", b"max-age=60"), delay=0.25)
        self.assertEqual(freshness.initial_age, 50.25)
        self.assertEqual(freshness.remaining(self.clock.seconds()), 9.75)

    def test_expires_minus_date(self) -> None:
        """RFC 9111 §4.2.1: Expires minus Date, both from the upstream's clock."""
        freshness = self.arrive((b"Date", http_date(START - 100)),
                                (b"Expires", http_date(START - 70)))
        self.assertEqual(freshness.lifetime, 30)
        self.assertEqual(freshness.initial_age, 100)
        self.assertFalse(freshness.is_fresh(self.clock.seconds()))

    def test_expires_without_date_uses_receipt_time(self) -> None:
        """RFC 9111 §4.2.1 and RFC 9110 §6.6.1: no Date means the time received."""
        freshness = self.arrive((b"Expires", http_date(START + 45)), delay=5)
        self.assertEqual(freshness.lifetime, 40)

    def test_invalid_date_is_the_time_received(self) -> None:
        """RFC 9110 §6.6.1: an invalid Date may be replaced by the time received."""
        freshness = self.arrive((b"Date", b"yesterday"), (b"Cache-Control", b"max-age=5"))
        self.assertEqual(freshness.initial_age, 0)

    def test_invalid_expires_is_already_expired(self) -> None:
        """RFC 9111 §5.3: an invalid Expires, especially "0", is in the past."""
        freshness = self.arrive((b"Expires", b"0"), default_ttl=60)
        self.assertEqual(freshness.lifetime, 0)

    def test_max_age_overrides_expires(self) -> None:
        """RFC 9111 §5.3: with max-age, Expires is ignored."""
        freshness = self.arrive((b"Expires", b"0"), (b"Cache-Control", b"max-age=30"))
        self.assertEqual(freshness.lifetime, 30)

    def test_first_of_duplicate_dates(self) -> None:
        """RFC 9111 §4.2.1: of two Expires (or Date) lines, the first is used."""
        freshness = self.arrive((b"Date", http_date(START)),
                                (b"Expires", http_date(START + 20)),
                                (b"Expires", http_date(START + 90)))
        self.assertEqual(freshness.lifetime, 20)

    def test_operator_ttl(self) -> None:
        """RFC 9111 §4.2.2: the operator's default applies to a 200 that states nothing."""
        self.assertEqual(self.arrive(default_ttl=15).lifetime, 15)
        self.assertEqual(self.arrive().lifetime, 0)


class UseOfStoredTests(SynchronousTestCase):
    """Whether a stored response may answer a request (RFC 9111 §4.2.4, §5.2.1; RFC 5861)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    def stored(self, **directives: object) -> Freshness:
        """A response with a 60 s lifetime that arrived now, 0 s old."""
        return Freshness(60.0, 0.0, self.clock.seconds(), ResponseDirectives(**directives))

    def use(self, freshness: Freshness, line: bytes = b"", after: float = 0.0) -> StoredUse:
        self.clock.advance(after)
        return use_of_stored(freshness, asks(line), self.clock.seconds())

    def test_fresh(self) -> None:
        """RFC 9111 §4.2: a fresh response answers."""
        self.assertEqual(self.use(self.stored(), after=59), StoredUse.FRESH)

    def test_stale_without_permission_is_forwarded(self) -> None:
        """RFC 9111 §4.2.4: a stale response is not served unless someone allows it."""
        self.assertEqual(self.use(self.stored(), after=60), StoredUse.FORWARD)

    def test_request_no_cache(self) -> None:
        """RFC 9111 §5.2.1.4: no-cache in the request forwards even a fresh response."""
        self.assertEqual(self.use(self.stored(), b"no-cache"), StoredUse.FORWARD)

    def test_request_max_age(self) -> None:
        """RFC 9111 §5.2.1.1: max-age=N accepts an age up to N; so max-age=0 accepts age 0."""
        self.assertEqual(self.use(self.stored(), b"max-age=0"), StoredUse.FRESH)
        freshness = self.stored()
        self.assertEqual(self.use(freshness, b"max-age=10", after=10), StoredUse.FRESH)
        self.assertEqual(self.use(freshness, b"max-age=10", after=0.5), StoredUse.FORWARD)
        self.assertEqual(self.use(freshness, b"max-age=0"), StoredUse.FORWARD)

    def test_request_min_fresh(self) -> None:
        """RFC 9111 §5.2.1.3: min-fresh=N needs N more seconds of freshness."""
        freshness = self.stored()
        self.assertEqual(self.use(freshness, b"min-fresh=20", after=40), StoredUse.FRESH)
        self.assertEqual(self.use(freshness, b"min-fresh=20", after=0.5), StoredUse.FORWARD)

    def test_request_max_stale(self) -> None:
        """RFC 9111 §5.2.1.2: max-stale=N accepts staleness up to N; bare max-stale, any."""
        freshness = self.stored()
        self.assertEqual(self.use(freshness, b"max-stale=5", after=65), StoredUse.STALE_ALLOWED)
        self.assertEqual(self.use(freshness, b"max-stale=4"), StoredUse.FORWARD)
        self.assertEqual(self.use(freshness, b"max-stale", after=10**6), StoredUse.STALE_ALLOWED)

    def test_stale_while_revalidate(self) -> None:
        """RFC 5861 §3: served stale for up to N seconds while a fresh one is fetched."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, after=70), StoredUse.STALE_WHILE_REVALIDATE)
        self.assertEqual(self.use(freshness, after=0.5), StoredUse.FORWARD)

    def test_max_stale_preferred_to_revalidation(self) -> None:
        """When the client accepts the staleness, no refresh is needed for it."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, b"max-stale=30", after=65), StoredUse.STALE_ALLOWED)

    def test_request_limits_apply_to_stale_while_revalidate(self) -> None:
        """RFC 9111 §5.2.1.1, §5.2.1.4: the client's max-age or no-cache beats the window."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, b"max-age=30", after=65), StoredUse.FORWARD)
        self.assertEqual(self.use(freshness, b"no-cache"), StoredUse.FORWARD)

    def test_request_max_age_wants_no_stale_response(self) -> None:
        """RFC 9111 §5.2.1.1: with max-age and no max-stale, the client wants no stale
        response, even one young enough; with max-stale too, it accepts one."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, b"max-age=100", after=65), StoredUse.FORWARD)
        self.assertEqual(self.use(freshness, b"max-age=100, max-stale=10"),
                         StoredUse.STALE_ALLOWED)

    def test_request_min_fresh_wants_no_stale_response(self) -> None:
        """RFC 9111 §5.2.1.3: min-fresh asks for freshness left, which a stale response lacks."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, b"min-fresh=0", after=65), StoredUse.FORWARD)

    def test_request_max_stale_is_not_widened(self) -> None:
        """RFC 9111 §5.2.1.2: a client's max-stale bounds the staleness it gets, even where
        the upstream's stale-while-revalidate would allow more."""
        freshness = self.stored(stale_while_revalidate=10)
        self.assertEqual(self.use(freshness, b"max-stale=3", after=65), StoredUse.FORWARD)

    def test_directives_that_forbid_stale_use(self) -> None:
        """RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: must-revalidate, proxy-revalidate,
        s-maxage and no-cache beat max-stale and stale-while-revalidate."""
        for forbidding in ({"must_revalidate": True}, {"proxy_revalidate": True},
                           {"s_maxage": 60}, {"no_cache": True}):
            freshness = self.stored(stale_while_revalidate=30, **forbidding)
            self.assertEqual(use_of_stored(freshness, asks(b"max-stale"), START + 61),
                             StoredUse.FORWARD, forbidding)

    def test_only_if_cached_does_not_change_the_decision(self) -> None:
        """RFC 9111 §5.2.1.7: only-if-cached changes what a forward becomes (504), not the use."""
        freshness = self.stored()
        self.assertEqual(self.use(freshness, b"only-if-cached"), StoredUse.FRESH)
        self.assertEqual(self.use(freshness, b"only-if-cached", after=61), StoredUse.FORWARD)

    @PROPERTY
    @given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=1e6))
    def test_a_stale_response_is_never_fresh(self, lifetime: float, after: float) -> None:
        """FRESH only ever comes with is_fresh."""
        freshness = Freshness(lifetime, 0.0, START, ResponseDirectives())
        use = use_of_stored(freshness, RequestDirectives(), START + after)
        self.assertEqual(use is StoredUse.FRESH, freshness.is_fresh(START + after))


class StaleIfErrorTests(SynchronousTestCase):
    """Serving a stored response when the upstream failed (RFC 5861 §4)."""

    def stored(self, **directives: object) -> Freshness:
        return Freshness(60.0, 0.0, START, ResponseDirectives(**directives))

    def test_fresh_response_serves_on_error(self) -> None:
        """A response still fresh answers when the forward (e.g. for no-cache) failed."""
        self.assertTrue(may_serve_stale_on_error(self.stored(), START + 59))

    def test_response_window(self) -> None:
        """RFC 5861 §4: stale-if-error=N allows staleness up to N when the upstream fails."""
        freshness = self.stored(stale_if_error=30)
        self.assertTrue(may_serve_stale_on_error(freshness, START + 90))
        self.assertFalse(may_serve_stale_on_error(freshness, START + 90.5))

    def test_no_window_no_stale(self) -> None:
        """RFC 9111 §4.2.4: without a window, a stale response is not served on error."""
        self.assertFalse(may_serve_stale_on_error(self.stored(), START + 60))

    def test_operator_default_when_response_has_none(self) -> None:
        """RFC 9111 §4.2.4: the operator's default window is the out-of-band permission."""
        self.assertTrue(may_serve_stale_on_error(self.stored(), START + 100, 300))
        self.assertFalse(may_serve_stale_on_error(self.stored(), START + 361, 300))

    def test_response_window_beats_operator_default(self) -> None:
        """The upstream's own stale-if-error wins, even when shorter than the default."""
        freshness = self.stored(stale_if_error=10)
        self.assertFalse(may_serve_stale_on_error(freshness, START + 100, 300))
        freshness = self.stored(stale_if_error=0)
        self.assertFalse(may_serve_stale_on_error(freshness, START + 61, 300))

    def test_must_revalidate_holds_when_the_upstream_is_down(self) -> None:
        """RFC 9111 §5.2.2.2, §4.2.4: no stale use, even on error, even with stale-if-error."""
        for forbidding in ({"must_revalidate": True}, {"proxy_revalidate": True},
                           {"s_maxage": 60}):
            freshness = self.stored(stale_if_error=300, **forbidding)
            self.assertFalse(may_serve_stale_on_error(freshness, START + 61, 300), forbidding)
