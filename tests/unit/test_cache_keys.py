"""Tests for deltagw.cache.keys: the primary and the secondary cache key (RFC 9111 §2, §4.1)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from deltagw.cache.directives import parse_vary
from deltagw.cache.keys import asked_origin, primary_key, secondary_key, url_key_prefix
from deltagw.upstream.forwarding import upstream_request_headers

PROPERTY = settings(database=None, derandomize=True, deadline=None)
"""Hypothesis, repeatable and without a database in the working tree."""

ACCEPT_AND_LANGUAGE = (b"accept", b"accept-language")


class PrimaryKeyTests(SynchronousTestCase):
    """The target URI (RFC 9111 §2), and the origin the client asked for."""

    ORIGIN = b"https://api.example"

    def test_whole_query_is_part_of_it(self) -> None:
        """RFC 9111 §2: the key is the target URI, query included, in its own order."""
        self.assertEqual(
            primary_key(b"http://storage:8001/v1/chain?symbol=NIFTY&expiry=1", self.ORIGIN),
            b"http://storage:8001/v1/chain?symbol=NIFTY&expiry=1 https://api.example")
        self.assertNotEqual(primary_key(b"http://storage/v1?a=1&b=2", self.ORIGIN),
                            primary_key(b"http://storage/v1?b=2&a=1", self.ORIGIN))
        self.assertNotEqual(primary_key(b"http://storage/v1?a=1", self.ORIGIN),
                            primary_key(b"http://storage/v1", self.ORIGIN))

    def test_another_origin_is_another_key_under_the_same_prefix(self) -> None:
        """A forged Host cannot reach another client's key; a purge by URL reaches every origin."""
        url = b"http://storage/v1/products"
        ours, forged = (primary_key(url, b"https://api.example"),
                        primary_key(url, b"https://evil.example"))
        self.assertNotEqual(ours, forged)
        self.assertTrue(ours.startswith(url_key_prefix(url)))
        self.assertTrue(forged.startswith(url_key_prefix(url)))
        self.assertFalse(primary_key(url + b"s", b"https://api.example").startswith(
            url_key_prefix(url)))

    def test_the_origin_is_what_the_upstream_is_told(self) -> None:
        """X-Forwarded-Proto and X-Forwarded-Host as sent upstream, in any case; absent: empty."""
        self.assertEqual(asked_origin([(b"Accept", b"*/*"), (b"X-Forwarded-Proto", b"https"),
                                       (b"x-forwarded-host", b"api.example:8443")]),
                         b"https://api.example:8443")
        self.assertEqual(asked_origin([]), b"://")


class SecondaryKeyTests(SynchronousTestCase):
    """The request fields the stored response's Vary names (RFC 9111 §4.1)."""

    def test_no_vary_no_secondary_key(self) -> None:
        """RFC 9111 §4.1: a response without Vary matches every request for its URL."""
        self.assertEqual(secondary_key((), [(b"Accept", b"text/html")]), ())

    def test_values_in_vary_order(self) -> None:
        """RFC 9111 §4.1: one value per Vary-named field."""
        self.assertEqual(
            secondary_key(ACCEPT_AND_LANGUAGE,
                          [(b"Accept-Language", b"en"), (b"Host", b"x"), (b"Accept", b"*/*")]),
            (b"*/*", b"en"),
        )

    def test_names_are_case_insensitive(self) -> None:
        """RFC 9110 §5.1: the field is found whatever the case of its name."""
        self.assertEqual(secondary_key((b"accept",), [(b"ACCEPT", b"a")]),
                         secondary_key((b"accept",), [(b"accept", b"a")]))

    def test_lines_combined_and_whitespace_stripped(self) -> None:
        """RFC 9111 §4.1: combining field lines and removing whitespace do not change a match."""
        self.assertEqual(
            secondary_key((b"accept",),
                          [(b"Accept", b" text/html "), (b"Accept", b"\tapplication/json")]),
            secondary_key((b"accept",), [(b"Accept", b"text/html, application/json")]),
        )

    def test_absent_differs_from_empty(self) -> None:
        """RFC 9111 §4.1: an absent field matches only an absent field."""
        self.assertEqual(secondary_key((b"accept",), []), (None,))
        self.assertEqual(secondary_key((b"accept",), [(b"Accept", b"")]), (b"",))
        self.assertNotEqual(secondary_key((b"accept",), []),
                            secondary_key((b"accept",), [(b"Accept", b"")]))

    def test_different_values_differ(self) -> None:
        """RFC 9111 §4.1: a request with other values for a Vary-named field does not match."""
        self.assertNotEqual(secondary_key((b"accept-language",), [(b"Accept-Language", b"en")]),
                            secondary_key((b"accept-language",), [(b"Accept-Language", b"fr")]))

    def test_gateway_identity_fields_are_part_of_it_when_vary_names_them(self) -> None:
        """RFC 9111 §4.1: the key is read from the fields the upstream received. The gateway
        sets X-User-ID from the verified token (and drops any a client sent), so a response
        with Vary: X-User-ID is kept per user."""
        vary = parse_vary([(b"Vary", b"X-User-ID")]).field_names

        def as_upstream_sees(client_fields: list[tuple[bytes, bytes]],
                             user: bytes) -> list[tuple[bytes, bytes]]:
            incoming = Headers()
            for name, value in client_fields:
                incoming.addRawHeader(name, value)
            return upstream_request_headers(incoming, pass_authorization=False, trusted_peer=False,
                                             added=[(b"X-User-ID", user)])

        alice = secondary_key(vary, as_upstream_sees([(b"X-User-ID", b"bob")], b"alice"))
        bob = secondary_key(vary, as_upstream_sees([], b"bob"))
        self.assertEqual(alice, (b"alice",))
        self.assertEqual(bob, (b"bob",))
        # Without Vary naming it, the identity is not part of the key: shared by all users.
        self.assertEqual(secondary_key((), as_upstream_sees([], b"alice")), ())

    @PROPERTY
    @given(st.lists(st.tuples(st.sampled_from([b"Accept", b"accept", b"X-Other", b"Origin"]),
                              st.binary(max_size=8)), max_size=6))
    def test_one_value_per_name_and_never_raises(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Any fields give exactly one entry per Vary-named field."""
        key = secondary_key((b"accept", b"origin"), headers)
        self.assertEqual(len(key), 2)
        self.assertEqual(key[0] is None, not any(n.lower() == b"accept" for n, _ in headers))
