"""Tests for deltagw.cache.storability: what a shared cache may store (RFC 9111 §3)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.fields import HeaderPairs
from deltagw.cache.freshness import freshness_of
from deltagw.cache.storability import Refusal, invalidates_stored, storage_refusal

NOW = 1_780_000_000.0

MAX_AGE = [(b"Cache-Control", b"max-age=60")]

BEARER = [(b"Authorization", b"Bearer abc.def.ghi")]


def refusal(
    response_headers: HeaderPairs = MAX_AGE,
    *,
    method: bytes = b"GET",
    status: int = 200,
    request_headers: HeaderPairs = (),
    default_ttl: float | None = None,
) -> Refusal | None:
    freshness = freshness_of(status, response_headers, NOW, NOW, default_ttl)
    return storage_refusal(method, status, request_headers, response_headers, freshness)


class StorageRefusalTests(SynchronousTestCase):
    """Each rule of RFC 9111 §3 for a shared cache, and the gateway's own."""

    def test_fresh_get_is_stored(self) -> None:
        """RFC 9111 §3: a final, understood 200 to a GET with max-age may be stored."""
        self.assertIsNone(refusal())

    def test_only_get_is_stored(self) -> None:
        """RFC 9111 §3 and §4: GET is stored; a HEAD is answered from a stored GET, not stored."""
        for method in (b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"):
            self.assertEqual(refusal(method=method), Refusal.METHOD, method)

    def test_final_statuses_with_explicit_lifetime(self) -> None:
        """RFC 9111 §3: any final status with an explicit lifetime may be stored."""
        for status in (200, 201, 302, 307, 400, 404, 500, 503, 599):
            self.assertIsNone(refusal(status=status), status)

    def test_not_final_partial_or_not_modified(self) -> None:
        """RFC 9111 §3: 1xx is not final; 206 and 304 need range and validation support."""
        for status in (100, 103, 206, 304, 600, 0):
            self.assertEqual(refusal(status=status), Refusal.STATUS, status)

    def test_must_understand(self) -> None:
        """RFC 9111 §5.2.2.3: stored only when the status is understood, and then no-store is
        ignored."""
        headers = [(b"Cache-Control", b"max-age=60, must-understand, no-store")]
        self.assertIsNone(refusal(headers, status=200))
        self.assertEqual(refusal(headers, status=201), Refusal.STATUS)
        self.assertEqual(refusal([(b"Cache-Control", b"max-age=60, must-understand")], status=418),
                         Refusal.STATUS)

    def test_no_store_in_response(self) -> None:
        """RFC 9111 §5.2.2.5: a response with no-store is never stored."""
        self.assertEqual(refusal([(b"Cache-Control", b"max-age=60, no-store")]), Refusal.NO_STORE)

    def test_no_store_in_request(self) -> None:
        """RFC 9111 §5.2.1.5: a request with no-store has its response stored nowhere."""
        self.assertEqual(refusal(request_headers=[(b"Cache-Control", b"no-store")]),
                         Refusal.NO_STORE)
        self.assertEqual(
            refusal([(b"Cache-Control", b"max-age=60, must-understand")],
                    request_headers=[(b"Cache-Control", b"no-store")]),
            Refusal.NO_STORE,
        )

    def test_private(self) -> None:
        """RFC 9111 §5.2.2.7: a shared cache never stores private, qualified or not."""
        self.assertEqual(refusal([(b"Cache-Control", b"private, max-age=60")]), Refusal.PRIVATE)
        self.assertEqual(refusal([(b"Cache-Control", b'private="X-User", max-age=60')]),
                         Refusal.PRIVATE)

    def test_no_cache(self) -> None:
        """RFC 9111 §5.2.2.4: no-cache needs validation before each use; this cache has none."""
        self.assertEqual(refusal([(b"Cache-Control", b"no-cache, max-age=60")]), Refusal.NO_CACHE)

    def test_vary_star(self) -> None:
        """RFC 9111 §4.1: a Vary of "*" never matches, so it is not stored."""
        self.assertEqual(refusal([*MAX_AGE, (b"Vary", b"Accept, *")]), Refusal.VARY_ANYTHING)
        self.assertIsNone(refusal([*MAX_AGE, (b"Vary", b"Accept")]))

    def test_set_cookie(self) -> None:
        """The gateway's choice (as nginx and Varnish by default): Set-Cookie is one client's."""
        self.assertEqual(refusal([*MAX_AGE, (b"set-cookie", b"session=1")]), Refusal.SET_COOKIE)
        self.assertEqual(refusal([(b"Cache-Control", b"public, s-maxage=60"),
                                  (b"Set-Cookie", b"a=b")]), Refusal.SET_COOKIE)

    def test_authorization_needs_permission(self) -> None:
        """RFC 9111 §3.5: a response to a request with Authorization is stored only with
        public, s-maxage or must-revalidate."""
        self.assertEqual(refusal(request_headers=BEARER), Refusal.AUTHORIZATION)
        self.assertEqual(refusal(request_headers=[(b"authorization", b"")]), Refusal.AUTHORIZATION)
        for allowing in (b"public, max-age=60", b"s-maxage=60", b"must-revalidate, max-age=60"):
            self.assertIsNone(refusal([(b"Cache-Control", allowing)], request_headers=BEARER),
                              allowing)

    def test_lifetime_needed(self) -> None:
        """RFC 9111 §3, §4.2.2: no stated lifetime and no operator default: not stored."""
        self.assertEqual(refusal([]), Refusal.NOT_FRESH)
        self.assertEqual(refusal([(b"Cache-Control", b"public")]), Refusal.NOT_FRESH)

    def test_zero_or_invalid_lifetime(self) -> None:
        """RFC 9111 §4.2.1: max-age=0, an invalid max-age, a past Expires, s-maxage=0: stale."""
        for headers in ([(b"Cache-Control", b"max-age=0")],
                        [(b"Cache-Control", b"max-age=never")],
                        [(b"Expires", b"0")],
                        [(b"Cache-Control", b"s-maxage=0, max-age=60")]):
            self.assertEqual(refusal(headers, default_ttl=60), Refusal.NOT_FRESH, headers)

    def test_operator_default_ttl(self) -> None:
        """RFC 9111 §4.2.2: the operator's TTL makes a heuristically cacheable status (RFC 9110
        §15.1) storable, or a public response of another status."""
        for status in (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501):
            self.assertIsNone(refusal([], status=status, default_ttl=30), status)
        for status in (201, 302, 400, 500, 503):
            self.assertEqual(refusal([], status=status, default_ttl=30), Refusal.NOT_FRESH, status)
        self.assertIsNone(refusal([(b"Cache-Control", b"public")], status=302, default_ttl=30))

    def test_first_refusal_in_order(self) -> None:
        """Of several reasons, the first in Refusal's order is given."""
        self.assertEqual(
            refusal([(b"Cache-Control", b"private, no-store")], method=b"POST", status=206),
            Refusal.METHOD,
        )
        self.assertEqual(refusal([(b"Cache-Control", b"private, no-store")]), Refusal.NO_STORE)


class InvalidationTests(SynchronousTestCase):
    """Unsafe methods invalidate what is stored (RFC 9111 §4.4)."""

    def test_unsafe_success_invalidates(self) -> None:
        """RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target URI."""
        for method, status in ((b"POST", 201), (b"PUT", 204), (b"DELETE", 200), (b"PATCH", 303)):
            self.assertTrue(invalidates_stored(method, status), method)

    def test_errors_and_safe_methods_do_not(self) -> None:
        """RFC 9111 §4.4: errors changed nothing, nor do safe methods (RFC 9110 §9.2.1)."""
        for method, status in ((b"POST", 400), (b"DELETE", 503), (b"GET", 200), (b"HEAD", 200),
                               (b"OPTIONS", 204)):
            self.assertFalse(invalidates_stored(method, status), method)
