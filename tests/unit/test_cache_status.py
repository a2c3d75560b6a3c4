"""Tests for deltagw.cache.status: Cache-Status (RFC 9211), Age and the log outcome."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.directives import MAX_DELTA_SECONDS
from deltagw.cache.status import (
    CacheOutcome,
    CacheStatus,
    Forward,
    age_header_value,
    forwarded,
    hit,
    served_on_error,
    ttl_seconds,
)

PROPERTY = settings(database=None, derandomize=True, deadline=None)
"""Hypothesis, repeatable and without a database in the working tree."""


class CacheStatusTests(SynchronousTestCase):
    """The gateway's Cache-Status member for each kind of answer (RFC 9211 §2)."""

    def test_hit(self) -> None:
        """RFC 9211 §2.1: an answer from the cache is a hit."""
        self.assertEqual(hit().header_value(), b"deltagw; hit")
        self.assertEqual(hit().outcome, CacheOutcome.HIT)

    def test_hit_with_ttl(self) -> None:
        """RFC 9211 §2.4: ttl is the freshness left, in whole seconds."""
        status = hit(42.9)
        self.assertEqual(status.header_value(), b"deltagw; hit; ttl=42")
        self.assertEqual(status.outcome, CacheOutcome.HIT)

    def test_stale_hit(self) -> None:
        """RFC 9211 §2.4: a stale answer from the cache has a negative ttl; the log says stale."""
        status = hit(-3.2)
        self.assertEqual(status.header_value(), b"deltagw; hit; ttl=-4")
        self.assertEqual(status.outcome, CacheOutcome.STALE)
        self.assertEqual(hit(0.0).outcome, CacheOutcome.STALE)

    def test_hits_of_one_second_share_a_status_but_not_across_the_fresh_line(self) -> None:
        """ttl=0 is fresh just before the lifetime ends and stale at its end, though
        both are remembered under the same ttl."""
        self.assertIs(hit(42.9), hit(42.1))
        self.assertEqual((hit(0.5).outcome, hit(0.5).ttl), (CacheOutcome.HIT, 0))
        self.assertEqual((hit(0.0).outcome, hit(0.0).ttl), (CacheOutcome.STALE, 0))
        self.assertEqual(hit(0.0).header_value(), b"deltagw; hit; ttl=0")

    def test_miss_stored(self) -> None:
        """RFC 9211 §2.2, §2.5: forwarded for want of a stored response, and stored."""
        self.assertEqual(forwarded(Forward.MISS, stored=True).header_value(),
                         b"deltagw; fwd=miss; stored")
        self.assertEqual(forwarded(Forward.MISS, stored=True).outcome, CacheOutcome.MISS)

    def test_uri_miss_and_vary_miss(self) -> None:
        """RFC 9211 §2.2: a URL never seen, and a URL seen with other Vary-named fields."""
        self.assertEqual(forwarded(Forward.URI_MISS).header_value(), b"deltagw; fwd=uri-miss")
        self.assertEqual(forwarded(Forward.VARY_MISS, stored=True, remaining=60).header_value(),
                         b"deltagw; fwd=vary-miss; ttl=60; stored")

    def test_collapsed(self) -> None:
        """RFC 9211 §2.6: an answer from an upstream call shared with other requests."""
        self.assertEqual(forwarded(Forward.URI_MISS, collapsed=True).header_value(),
                         b"deltagw; fwd=uri-miss; collapsed")

    def test_stale_refreshed(self) -> None:
        """RFC 9211 §2.2: forwarded because the stored response was stale; a miss in the log."""
        status = forwarded(Forward.STALE, stored=True, remaining=30)
        self.assertEqual(status.header_value(), b"deltagw; fwd=stale; ttl=30; stored")
        self.assertEqual(status.outcome, CacheOutcome.MISS)

    def test_bypass_method_and_request(self) -> None:
        """RFC 9211 §2.2: not cached here, a method not answered from cache, a client's
        no-cache: bypass in the log."""
        for forward in (Forward.BYPASS, Forward.METHOD, Forward.REQUEST):
            status = forwarded(forward)
            self.assertEqual(status.header_value(), b"deltagw; fwd=" + forward.value.encode())
            self.assertEqual(status.outcome, CacheOutcome.BYPASS, forward)

    def test_stale_if_error(self) -> None:
        """RFC 9211 §2.3 and RFC 5861 §4: the upstream's error status, the stale answer's ttl."""
        status = served_on_error(Forward.STALE, -12.0, 503)
        self.assertEqual(status.header_value(),
                         b"deltagw; fwd=stale; fwd-status=503; ttl=-12; detail=upstream-error")
        self.assertEqual(status.outcome, CacheOutcome.STALE)

    def test_error_without_upstream_status(self) -> None:
        """RFC 9211 §2.3: no fwd-status when the upstream gave no response; a fresh stored
        answer sent after a failed no-cache forward is a hit in the log."""
        status = served_on_error(Forward.REQUEST, 20.0)
        self.assertEqual(status.header_value(),
                         b"deltagw; fwd=request; ttl=20; detail=upstream-error")
        self.assertEqual(status.outcome, CacheOutcome.HIT)

    def test_cache_name(self) -> None:
        """RFC 9211 §2: the member is the cache's name; another name may be given."""
        self.assertEqual(hit().header_value("deltagw-eu"), b"deltagw-eu; hit")

    def test_outcome_values_for_logs(self) -> None:
        """The log field takes exactly four values."""
        self.assertEqual([outcome.value for outcome in CacheOutcome],
                         ["hit", "stale", "miss", "bypass"])

    def test_every_forward_value_of_rfc_9211(self) -> None:
        """RFC 9211 §2.2: the eight fwd values."""
        self.assertEqual({forward.value for forward in Forward},
                         {"bypass", "method", "uri-miss", "vary-miss", "miss", "request",
                          "stale", "partial"})

    def test_all_parameters_in_order(self) -> None:
        """RFC 9211 §2: parameters in the order the RFC defines them."""
        status = CacheStatus(CacheOutcome.MISS, Forward.STALE, 304, 5, True, True, "x")
        self.assertEqual(status.header_value(),
                         b"deltagw; fwd=stale; fwd-status=304; ttl=5; stored; collapsed; detail=x")


class NumbersTests(SynchronousTestCase):
    """ttl and Age as integers."""

    def test_ttl_rounds_down(self) -> None:
        """RFC 9211 §2.4: an integer; rounding down keeps fresh at 0 or more, stale below 0."""
        self.assertEqual([ttl_seconds(x) for x in (59.99, 0.5, -0.5, -1.0)], [59, 0, -1, -1])

    def test_ttl_within_structured_field_integers(self) -> None:
        """RFC 8941 §3.3.1: at most 15 digits."""
        self.assertEqual(ttl_seconds(float("inf")), 999_999_999_999_999)
        self.assertEqual(ttl_seconds(float("-inf")), -999_999_999_999_999)

    def test_age(self) -> None:
        """RFC 9111 §5.1: whole seconds, rounded down."""
        self.assertEqual(age_header_value(0.0), b"0")
        self.assertEqual(age_header_value(12.99), b"12")

    def test_age_never_negative_nor_over_two_to_the_31(self) -> None:
        """RFC 9111 §1.2.2, §5.1: Age is delta-seconds, and 2^31 at most."""
        self.assertEqual(age_header_value(-5.0), b"0")
        self.assertEqual(age_header_value(1e12), str(MAX_DELTA_SECONDS).encode())
        self.assertEqual(age_header_value(float("inf")), str(MAX_DELTA_SECONDS).encode())

    @PROPERTY
    @given(st.floats(allow_nan=False))
    def test_age_is_always_delta_seconds(self, current_age: float) -> None:
        """Any age gives 1*DIGIT within 0 and 2^31."""
        value = age_header_value(current_age)
        self.assertTrue(value.isdigit())
        self.assertLessEqual(int(value), MAX_DELTA_SECONDS)

    @PROPERTY
    @given(st.floats(allow_nan=False))
    def test_ttl_sign_matches_freshness(self, remaining: float) -> None:
        """A fresh response never reads as stale, nor a stale one as fresh."""
        self.assertEqual(ttl_seconds(remaining) >= 0, remaining >= 0)
