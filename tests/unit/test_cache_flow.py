"""The cache's parts together, in the order a forwarded GET will use them, on a Clock.

Not the integration into the request path (that is a later step): plain
calls, to show the parts fit and that a whole sequence gives the exact
Cache-Status and Age values.
"""

from __future__ import annotations

import calendar
from email.utils import formatdate

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.coalescing import Coalescer
from deltagw.cache.directives import request_directives
from deltagw.cache.fields import HeaderPairs
from deltagw.cache.freshness import StoredUse, freshness_of, may_serve_stale_on_error, use_of_stored
from deltagw.cache.keys import primary_key
from deltagw.cache.status import (
    CacheStatus,
    Forward,
    age_header_value,
    forwarded,
    hit,
    served_on_error,
)
from deltagw.cache.storability import ANSWERED_METHODS, storage_refusal
from deltagw.cache.store import ResponseStore, StoredResponse

START = float(calendar.timegm((2026, 12, 5, 14, 0, 0)))
URL = primary_key(b"http://storage:8001/v1/chain?symbol=NIFTY", b"https://api.example")


class FlowTests(SynchronousTestCase):
    """A URL through miss, hit, stale-while-revalidate and stale-if-error."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = ResponseStore(max_bytes=2**20, max_entry_bytes=2**16)

    def fetch_upstream(self, cache_control: bytes, delay: float = 0.5,
                       request_headers: HeaderPairs = ()) -> StoredResponse | None:
        """Forward a GET, then store the answer if it may be; returns what was stored."""
        request_time = self.clock.seconds()
        self.clock.advance(delay)
        headers = ((b"Date", formatdate(request_time, usegmt=True).encode()),
                   (b"Cache-Control", cache_control),
                   (b"Content-Type", b"application/json"))
        freshness = freshness_of(200, headers, request_time, self.clock.seconds(),
                                 default_ttl=None)
        if storage_refusal(b"GET", 200, request_headers, headers, freshness) is not None:
            return None
        stored = StoredResponse(200, b"OK", headers, b'{"ltp": 1}', request_time,
                                self.clock.seconds(), freshness)
        self.assertTrue(self.store.store(URL, request_headers, stored))
        return stored

    def from_store(self, method: bytes = b"GET",
                   request_headers: HeaderPairs = ()) -> tuple[StoredUse, CacheStatus, bytes]:
        """Look the request up and say what the stored response may do, with its Age."""
        self.assertIn(method, ANSWERED_METHODS)
        stored = self.store.lookup(URL, request_headers)
        assert stored is not None
        now = self.clock.seconds()
        use = use_of_stored(stored.freshness, request_directives(request_headers), now)
        return (use, hit(stored.freshness.remaining(now)),
                age_header_value(stored.freshness.current_age(now)))

    def test_miss_hit_stale_while_revalidate_refresh(self) -> None:
        """RFC 9111 §4.2, RFC 5861 §3, RFC 9211: the values a client sees, second by second."""
        self.assertIsNone(self.store.lookup(URL, []))
        self.assertNotIn(URL, self.store)
        self.fetch_upstream(b"max-age=60, stale-while-revalidate=30")
        self.assertEqual(forwarded(Forward.URI_MISS, stored=True).header_value(),
                         b"deltagw; fwd=uri-miss; stored")

        self.clock.advance(10)
        use, status, age = self.from_store(b"HEAD")
        self.assertEqual((use, status.header_value(), age),
                         (StoredUse.FRESH, b"deltagw; hit; ttl=49", b"10"))

        self.clock.advance(60)
        use, status, age = self.from_store()
        self.assertEqual((use, status.header_value(), age),
                         (StoredUse.STALE_WHILE_REVALIDATE, b"deltagw; hit; ttl=-11", b"70"))
        self.assertEqual(status.outcome.value, "stale")

        # The refresh behind it replaces the stored response. Sent at 70.5 s,
        # it is dated 70 s (Date has whole seconds) and arrives at 71 s:
        # 1 s old already (RFC 9111 §4.2.3, apparent_age).
        self.fetch_upstream(b"max-age=60, stale-while-revalidate=30")
        use, status, age = self.from_store()
        self.assertEqual((use, status.header_value(), age),
                         (StoredUse.FRESH, b"deltagw; hit; ttl=59", b"1"))

    def test_stale_if_error_from_the_operators_default(self) -> None:
        """RFC 5861 §4, RFC 9111 §4.2.4: past stale-while-revalidate the request goes
        upstream; when that fails, the operator's window lets the stale answer through."""
        self.fetch_upstream(b"max-age=60")
        self.clock.advance(100)
        use, _, _ = self.from_store()
        self.assertEqual(use, StoredUse.FORWARD)
        stored = self.store.lookup(URL, [])
        assert stored is not None
        now = self.clock.seconds()
        self.assertFalse(may_serve_stale_on_error(stored.freshness, now))
        self.assertTrue(may_serve_stale_on_error(stored.freshness, now, 300))
        self.assertEqual(
            served_on_error(Forward.STALE, stored.freshness.remaining(now), 503).header_value(),
            b"deltagw; fwd=stale; fwd-status=503; ttl=-41; detail=upstream-error",
        )

    def test_authorised_request_needs_the_upstreams_permission(self) -> None:
        """RFC 9111 §3.5: with a bearer token, only public, s-maxage or must-revalidate store."""
        bearer = [(b"Authorization", b"Bearer t")]
        self.assertIsNone(self.fetch_upstream(b"max-age=60", request_headers=bearer))
        self.assertIsNotNone(self.fetch_upstream(b"public, max-age=60", request_headers=bearer))

    def test_concurrent_misses_share_one_upstream_call(self) -> None:
        """RFC 9211 §2.6: three misses at once, one upstream call, two answers collapsed."""
        coalescer: Coalescer[StoredResponse | None] = Coalescer()
        upstream: list[Deferred[StoredResponse | None]] = []

        def start() -> Deferred[StoredResponse | None]:
            upstream.append(Deferred())
            return upstream[-1]

        answers = [coalescer.fetch(URL, start) for _ in range(3)]
        upstream[0].callback(self.fetch_upstream(b"max-age=60"))
        stored = [self.successResultOf(answer) for answer in answers]
        self.assertEqual((len(upstream), coalescer.coalesced), (1, 2))
        self.assertTrue(all(response is stored[0] for response in stored))
        self.assertEqual(forwarded(Forward.URI_MISS, collapsed=True).header_value(),
                         b"deltagw; fwd=uri-miss; collapsed")
