"""Tests for deltagw.cache.store: responses in memory, by URL and Vary, within a byte budget."""

from __future__ import annotations

import gc
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.directives import ResponseDirectives
from deltagw.cache.fields import HeaderPairs
from deltagw.cache.freshness import Freshness
from deltagw.cache.store import (
    ENTRY_OVERHEAD_BYTES,
    FIELD_OVERHEAD_BYTES,
    KEY_VALUE_OVERHEAD_BYTES,
    RESPONSE_OVERHEAD_BYTES,
    TABLE_SLACK_BYTES_PER_ENTRY,
    ResponseStore,
    StoredResponse,
    accounted_size,
)

URL = b"http://storage:8001/v1/chain?symbol=NIFTY"
OTHER_URL = b"http://storage:8001/v1/chain?symbol=BANKNIFTY"
VARY_LANGUAGE = ((b"Vary", b"Accept-Language"),)
ENGLISH = [(b"Accept-Language", b"en")]
FRENCH = [(b"Accept-Language", b"fr")]


def response(body: bytes = b"{}", headers: HeaderPairs = (), status: int = 200) -> StoredResponse:
    freshness = Freshness(60.0, 0.0, 1000.0, ResponseDirectives(max_age=60))
    return StoredResponse(status, b"OK", tuple(headers), body, 999.5, 1000.0, freshness)


class AccountedSizeTests(SynchronousTestCase):
    """What a response counts for."""

    def test_exact_size(self) -> None:
        """Content, reason, fields and key values, plus the fixed charge of each object."""
        stored = response(b"0123456789", [(b"Content-Type", b"text/plain")])
        self.assertEqual(
            accounted_size(stored, (b"en", None)),
            RESPONSE_OVERHEAD_BYTES + 10 + 2 + FIELD_OVERHEAD_BYTES + 12 + 10
            + 2 * KEY_VALUE_OVERHEAD_BYTES + 2,
        )


class StoreTests(SynchronousTestCase):
    """Storing, finding, replacing and removing responses."""

    def setUp(self) -> None:
        self.store = ResponseStore(max_bytes=100_000, max_entry_bytes=10_000)

    def test_empty(self) -> None:
        """A new store holds nothing."""
        self.assertIsNone(self.store.lookup(URL, []))
        self.assertNotIn(URL, self.store)
        self.assertEqual((self.store.entries, self.store.variants, self.store.stored_bytes,
                          self.store.evictions), (0, 0, 0, 0))

    def test_store_and_find(self) -> None:
        """RFC 9111 §4: a stored response answers a request for the same URL."""
        stored = response()
        self.assertTrue(self.store.store(URL, [], stored))
        self.assertIs(self.store.lookup(URL, [(b"Accept", b"*/*")]), stored)
        self.assertIn(URL, self.store)
        self.assertIsNone(self.store.lookup(OTHER_URL, []))
        self.assertEqual(self.store.stored_bytes,
                         ENTRY_OVERHEAD_BYTES + len(URL) + accounted_size(stored, ()))

    def test_vary_selects_the_variant(self) -> None:
        """RFC 9111 §4.1: only a request with the same Vary-named values matches."""
        english = response(b"hello", VARY_LANGUAGE)
        self.store.store(URL, ENGLISH, english)
        self.assertIs(self.store.lookup(URL, [(b"accept-language", b" en ")]), english)
        self.assertIsNone(self.store.lookup(URL, FRENCH))
        self.assertIsNone(self.store.lookup(URL, []))
        self.assertIn(URL, self.store)

    def test_variants_of_one_url(self) -> None:
        """RFC 9111 §4.1: each set of Vary-named values keeps its own response."""
        english, french = response(b"hello", VARY_LANGUAGE), response(b"bonjour", VARY_LANGUAGE)
        self.store.store(URL, ENGLISH, english)
        self.store.store(URL, FRENCH, french)
        self.assertIs(self.store.lookup(URL, ENGLISH), english)
        self.assertIs(self.store.lookup(URL, FRENCH), french)
        self.assertEqual((self.store.entries, self.store.variants), (1, 2))
        self.assertEqual(
            self.store.stored_bytes,
            ENTRY_OVERHEAD_BYTES + len(URL)
            + accounted_size(english, (b"en",)) + accounted_size(french, (b"fr",)),
        )

    def test_a_new_vary_replaces_the_variants(self) -> None:
        """RFC 9111 §4.1: the most recent response's Vary chooses; older variants go."""
        self.store.store(URL, ENGLISH, response(b"hello", VARY_LANGUAGE))
        self.store.store(URL, FRENCH, response(b"bonjour", VARY_LANGUAGE))
        plain = response(b"hi", [(b"Vary", b"Accept")])
        self.store.store(URL, ENGLISH, plain)
        self.assertEqual(self.store.variants, 1)
        self.assertIs(self.store.lookup(URL, FRENCH), plain)
        self.assertEqual(self.store.stored_bytes,
                         ENTRY_OVERHEAD_BYTES + len(URL) + accounted_size(plain, (None,)))

    def test_same_request_replaces(self) -> None:
        """RFC 9111 §3: a newer response to the same request replaces the stored one."""
        self.store.store(URL, [], response(b"old"))
        newer = response(b"newer")
        self.store.store(URL, [], newer)
        self.assertIs(self.store.lookup(URL, []), newer)
        self.assertEqual(self.store.variants, 1)
        self.assertEqual(self.store.stored_bytes,
                         ENTRY_OVERHEAD_BYTES + len(URL) + accounted_size(newer, ()))

    def test_response_over_max_entry_bytes_is_not_stored(self) -> None:
        """A response bigger than max_entry_bytes is refused; the stored one stays."""
        small = response(b"small")
        self.store.store(URL, [], small)
        self.assertFalse(self.store.store(URL, [], response(b"x" * 10_000)))
        self.assertIs(self.store.lookup(URL, []), small)
        self.assertFalse(self.store.store(OTHER_URL, [], response(b"x" * 10_000)))
        self.assertNotIn(OTHER_URL, self.store)
        self.assertEqual(self.store.evictions, 0)

    def test_vary_star_is_not_stored(self) -> None:
        """RFC 9111 §4.1: a Vary of "*" never matches, so there is no key to store it under."""
        self.assertFalse(self.store.store(URL, [], response(headers=[(b"Vary", b"*")])))
        self.assertNotIn(URL, self.store)

    def test_purge_removes_every_variant(self) -> None:
        """Purging a URL removes all of its variants and their bytes."""
        self.store.store(URL, ENGLISH, response(b"hello", VARY_LANGUAGE))
        self.store.store(URL, FRENCH, response(b"bonjour", VARY_LANGUAGE))
        self.store.store(OTHER_URL, [], response())
        other_bytes = ENTRY_OVERHEAD_BYTES + len(OTHER_URL) + accounted_size(response(), ())
        self.assertEqual(self.store.purge(URL), 2)
        self.assertIsNone(self.store.lookup(URL, ENGLISH))
        self.assertEqual((self.store.entries, self.store.variants, self.store.stored_bytes),
                         (1, 1, other_bytes))
        self.assertEqual(self.store.purge(URL), 0)

    def test_purge_prefix_removes_the_urls_that_start_with_it(self) -> None:
        """Every URL with the prefix goes, with all its variants; the rest stay as they were."""
        self.store.store(URL, ENGLISH, response(b"hello", VARY_LANGUAGE))
        self.store.store(URL, FRENCH, response(b"bonjour", VARY_LANGUAGE))
        self.store.store(URL + b"?expiry=2027-01-28", [], response())
        self.store.store(OTHER_URL, [], response())
        other_bytes = ENTRY_OVERHEAD_BYTES + len(OTHER_URL) + accounted_size(response(), ())
        self.assertEqual(self.store.purge_prefix(URL), 3)
        self.assertEqual((self.store.entries, self.store.variants, self.store.stored_bytes),
                         (1, 1, other_bytes))
        self.assertEqual(self.store.purge_prefix(URL), 0)

    def test_purge_all(self) -> None:
        """Purging everything empties the store; evictions are not purges."""
        self.store.store(URL, ENGLISH, response(b"hello", VARY_LANGUAGE))
        self.store.store(OTHER_URL, [], response())
        self.assertEqual(self.store.purge_all(), 2)
        self.assertEqual((self.store.entries, self.store.variants, self.store.stored_bytes,
                          self.store.evictions), (0, 0, 0, 0))
        self.assertTrue(self.store.store(URL, [], response()))

    def test_rejects_bad_bounds(self) -> None:
        """A store that could not hold what it accepts is refused at construction."""
        self.assertRaises(ValueError, ResponseStore, 0, 0)
        self.assertRaises(ValueError, ResponseStore, 1000, 0)
        self.assertRaises(ValueError, ResponseStore, 1000, 1001)


class LeastRecentlyUsedTests(SynchronousTestCase):
    """Making room: the least recently used URLs go first."""

    def setUp(self) -> None:
        one = ENTRY_OVERHEAD_BYTES + len(b"http://s/0") + accounted_size(response(), ())
        self.store = ResponseStore(max_bytes=3 * one, max_entry_bytes=one)

    def test_oldest_goes_first(self) -> None:
        """A fourth URL pushes out the first."""
        for index in range(4):
            self.assertTrue(self.store.store(b"http://s/%d" % index, [], response()))
        self.assertNotIn(b"http://s/0", self.store)
        self.assertEqual((self.store.entries, self.store.evictions), (3, 1))
        self.assertLessEqual(self.store.stored_bytes, self.store.max_bytes)

    def test_a_hit_makes_it_recent(self) -> None:
        """A URL found by a lookup is kept over one stored after it but not used since."""
        for index in range(3):
            self.store.store(b"http://s/%d" % index, [], response())
        self.store.lookup(b"http://s/0", [])
        self.store.store(b"http://s/3", [], response())
        self.assertIn(b"http://s/0", self.store)
        self.assertNotIn(b"http://s/1", self.store)

    def test_a_miss_does_not_make_it_recent(self) -> None:
        """A lookup that matches no variant leaves the URL where it was."""
        self.store.store(b"http://s/0", ENGLISH, response(b"{}", VARY_LANGUAGE))
        for index in range(1, 3):
            self.store.store(b"http://s/%d" % index, [], response())
        self.store.lookup(b"http://s/0", FRENCH)
        self.store.store(b"http://s/3", [], response())
        self.assertNotIn(b"http://s/0", self.store)

    def test_restoring_makes_it_recent(self) -> None:
        """Storing a new response for a URL makes it the most recent."""
        for index in range(3):
            self.store.store(b"http://s/%d" % index, [], response())
        self.store.store(b"http://s/0", [], response())
        self.store.store(b"http://s/3", [], response())
        self.assertIn(b"http://s/0", self.store)
        self.assertNotIn(b"http://s/1", self.store)

    def test_variants_that_cannot_fit_together(self) -> None:
        """A URL whose variants together exceed max_bytes loses them all, and says so."""
        store = ResponseStore(max_bytes=5000, max_entry_bytes=2000)
        for language in (b"en", b"fr", b"de"):
            stored = store.store(URL, [(b"Accept-Language", language)],
                                 response(b"x" * 1000, VARY_LANGUAGE))
        self.assertFalse(stored)
        self.assertNotIn(URL, store)
        self.assertEqual((store.entries, store.variants, store.stored_bytes, store.evictions),
                         (0, 0, 0, 1))


class BoundedMemoryTests(SynchronousTestCase):
    """100,000 distinct keys through a 2 MiB store: accounted and real memory stay bounded."""

    MAX_BYTES = 2 * 2**20
    KEYS = 100_000
    TRACED = 5_000
    """The last keys are stored under tracemalloc, which makes allocating several times
    slower. They turn the store's contents over several times, so everything it holds at
    the end, hash tables included (they are reallocated as keys come and go), was
    allocated while traced."""

    SHARED_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60"))
    SHARED_VARY_HEADERS = (*SHARED_HEADERS, (b"Vary", b"Accept-Language"))
    SHARED_FRESHNESS = Freshness(60.0, 0.0, 0.0, ResponseDirectives(max_age=60))

    def arriving(self, index: int) -> tuple[bytes, list[tuple[bytes, bytes]], StoredResponse]:
        """A response as the upstream client would hand it over: every object its own.

        One in three varies on Accept-Language.
        """
        headers = [
            (bytes(bytearray(b"Content-Type")), bytes(bytearray(b"application/json"))),
            (bytes(bytearray(b"Cache-Control")), bytes(bytearray(b"max-age=60"))),
        ]
        request_headers: list[tuple[bytes, bytes]] = []
        if index % 3 == 0:
            headers.append((bytes(bytearray(b"Vary")), bytes(bytearray(b"Accept-Language"))))
            request_headers = [(b"Accept-Language", b"en-%d" % index)]
        now = float(index)
        stored = StoredResponse(200, bytes(bytearray(b"OK")), tuple(headers),
                                b"y" * (index % 2000), now - 0.5, now,
                                Freshness(60.0, 0.0, now, ResponseDirectives(max_age=60)))
        return self.url(index), request_headers, stored

    def arriving_cheaply(self, index: int) -> tuple[bytes, list[tuple[bytes, bytes]],
                                                     StoredResponse]:
        """The same response, sharing what does not change: quicker, for the untraced keys."""
        if index % 3 == 0:
            headers = self.SHARED_VARY_HEADERS
            request_headers = [(b"Accept-Language", b"en-%d" % index)]
        else:
            headers, request_headers = self.SHARED_HEADERS, []
        stored = StoredResponse(200, b"OK", headers, b"y" * (index % 2000), 0.0, 0.0,
                                self.SHARED_FRESHNESS)
        return self.url(index), request_headers, stored

    @staticmethod
    def url(index: int) -> bytes:
        return b"http://storage:8001/v1/items/%d?page=1" % index

    def test_accounted_and_real_memory_stay_bounded(self) -> None:
        """stored_bytes never exceeds max_bytes; real memory stays under max_bytes plus
        TABLE_SLACK_BYTES_PER_ENTRY per URL held."""
        store = ResponseStore(self.MAX_BYTES, 64 * 2**10)
        over_budget = 0
        for index in range(self.KEYS - self.TRACED):
            store.store(*self.arriving_cheaply(index))
            over_budget += store.stored_bytes > self.MAX_BYTES
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for index in range(self.KEYS - self.TRACED, self.KEYS):
                store.store(*self.arriving(index))
                over_budget += store.stored_bytes > self.MAX_BYTES
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        self.assertEqual(over_budget, 0)
        self.assertLess(store.entries, self.TRACED / 4)
        self.assertNotIn(self.url(self.KEYS - self.TRACED - 1), store)
        self.assertEqual(store.evictions, self.KEYS - store.entries)
        self.assertLessEqual(store.stored_bytes, self.MAX_BYTES)
        self.assertGreater(store.stored_bytes, self.MAX_BYTES - 64 * 2**10)
        self.assertLessEqual(held, self.MAX_BYTES + TABLE_SLACK_BYTES_PER_ENTRY * store.entries)
