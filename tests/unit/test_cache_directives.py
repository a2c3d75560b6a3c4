"""Tests for deltagw.cache.directives: Cache-Control and Vary, parsed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.directives import (
    MAX_DELTA_SECONDS,
    RequestDirectives,
    ResponseDirectives,
    Vary,
    delta_seconds,
    list_elements,
    parse_cache_control,
    parse_vary,
    request_directives,
    response_directives,
)
from deltagw.cache.fields import combined_value, field_lines

PROPERTY = settings(database=None, derandomize=True, deadline=None)
"""Hypothesis, repeatable and without a database in the working tree."""


def cache_control(*lines: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Cache-Control", line) for line in lines]


class ParseCacheControlTests(SynchronousTestCase):
    """The generic directive list (RFC 9111 §5.2)."""

    def test_names_are_case_insensitive(self) -> None:
        """RFC 9111 §5.2: directive names are tokens compared case-insensitively."""
        self.assertEqual(
            parse_cache_control([b"Max-Age=60, NO-STORE"]),
            {b"max-age": b"60", b"no-store": None},
        )

    def test_quoted_and_token_arguments_are_equal(self) -> None:
        """RFC 9111 §5.2: recipients accept a token or a quoted-string argument."""
        self.assertEqual(parse_cache_control([b'max-age="60"']), {b"max-age": b"60"})
        self.assertEqual(response_directives(cache_control(b'max-age="60"')).max_age, 60)

    def test_comma_inside_quoted_string_belongs_to_the_argument(self) -> None:
        """RFC 9110 §5.6.4: a quoted-string may hold commas; the list splits outside it."""
        self.assertEqual(
            parse_cache_control([b'no-cache="Set-Cookie, X-Trace", max-age=5']),
            {b"no-cache": b"Set-Cookie, X-Trace", b"max-age": b"5"},
        )

    def test_quoted_pairs_are_unescaped(self) -> None:
        """RFC 9110 §5.6.4: a backslash escapes the next octet in a quoted-string."""
        self.assertEqual(parse_cache_control([rb'ext="a\"b\\c", x']),
                         {b"ext": b'a"b\\c', b"x": None})

    def test_first_occurrence_wins(self) -> None:
        """RFC 9111 §4.2.1: of duplicate directives the first is used, across lines too."""
        self.assertEqual(parse_cache_control([b"max-age=60, max-age=0", b"max-age=5"]),
                         {b"max-age": b"60"})
        directives = response_directives(cache_control(b"max-age=60", b"max-age=0"))
        self.assertEqual(directives.max_age, 60)

    def test_whitespace_and_empty_elements_are_skipped(self) -> None:
        """RFC 9110 §5.6.1: empty list elements and OWS around elements do not count."""
        self.assertEqual(
            parse_cache_control([b" ,\tpublic ,, max-age = 30 ,"]),
            {b"public": None, b"max-age": b"30"},
        )

    def test_elements_that_are_not_tokens_are_skipped(self) -> None:
        """RFC 9111 §5.2: a directive is a token; anything else is not a directive."""
        self.assertEqual(parse_cache_control([b'"quoted", a b, =5, public']), {b"public": None})

    def test_unterminated_quote_runs_to_the_end(self) -> None:
        """A quoted-string without its closing quote swallows the rest of the line."""
        self.assertEqual(list_elements(b'a="x, b, c'), [b'a="x, b, c'])
        self.assertEqual(parse_cache_control([b'max-age="60, public']),
                         {b"max-age": b'"60, public'})
        self.assertEqual(response_directives(cache_control(b'max-age="60, public')),
                         ResponseDirectives(max_age=0))

    @PROPERTY
    @given(st.lists(st.binary(max_size=64), max_size=4))
    def test_never_raises_on_arbitrary_bytes(self, lines: list[bytes]) -> None:
        """Both directive readers accept anything a peer may send."""
        found = parse_cache_control(lines)
        for name in found:
            self.assertEqual(name, name.lower())
        response_directives(cache_control(*lines))
        request_directives(cache_control(*lines))

    @PROPERTY
    @given(st.lists(st.sampled_from([b"public", b"max-age=5", b'ext="a,b"', b" ", b"no-cache"]),
                    max_size=6))
    def test_split_agrees_with_a_plain_split_without_quotes(self, parts: list[bytes]) -> None:
        """Without quotes, the list splits exactly at its commas."""
        line = b",".join(parts)
        if b'"' not in line:
            self.assertEqual(list_elements(line), line.split(b","))
        else:
            self.assertEqual(len(list_elements(line)), len(parts))


class DeltaSecondsTests(SynchronousTestCase):
    """delta-seconds = 1*DIGIT (RFC 9111 §1.2.2)."""

    def test_digits(self) -> None:
        """Plain digits, leading zeros included, are a number of seconds."""
        self.assertEqual(delta_seconds(b"0"), 0)
        self.assertEqual(delta_seconds(b"0060"), 60)

    def test_not_digits_is_invalid(self) -> None:
        """RFC 9111 §1.2.2: a sign, a fraction, spaces or nothing are not delta-seconds."""
        for argument in (None, b"", b"-1", b"+1", b"1.5", b"1 0", b"abc", b"\xd9\xa3"):
            self.assertIsNone(delta_seconds(argument), argument)

    def test_too_large_is_two_to_the_31(self) -> None:
        """RFC 9111 §1.2.2: a value too large to hold is taken as 2^31."""
        self.assertEqual(delta_seconds(b"2147483648"), MAX_DELTA_SECONDS)
        self.assertEqual(delta_seconds(b"99999999999"), MAX_DELTA_SECONDS)
        self.assertEqual(delta_seconds(b"9" * 10_000), MAX_DELTA_SECONDS)
        self.assertEqual(delta_seconds(b"0" * 20 + b"7"), 7)

    @PROPERTY
    @given(st.integers(min_value=0, max_value=10**12))
    def test_round_trips_below_the_cap(self, seconds: int) -> None:
        """Any written non-negative integer reads back, capped at 2^31."""
        self.assertEqual(delta_seconds(str(seconds).encode()), min(seconds, MAX_DELTA_SECONDS))


class ResponseDirectivesTests(SynchronousTestCase):
    """The response directives a shared cache obeys (RFC 9111 §5.2.2)."""

    def test_no_cache_control_means_no_directives(self) -> None:
        """A response without Cache-Control has every directive off."""
        self.assertEqual(response_directives([(b"Content-Type", b"text/plain")]),
                         ResponseDirectives())

    def test_every_known_directive(self) -> None:
        """RFC 9111 §5.2.2 and RFC 5861 §3, §4: each directive lands in its attribute."""
        directives = response_directives(cache_control(
            b"no-store, no-cache, private, public, must-revalidate",
            b"proxy-revalidate, must-understand, max-age=10, s-maxage=20",
            b"stale-while-revalidate=30, stale-if-error=40",
        ))
        self.assertEqual(directives, ResponseDirectives(
            no_store=True, no_cache=True, private=True, public=True, must_revalidate=True,
            proxy_revalidate=True, must_understand=True, max_age=10, s_maxage=20,
            stale_while_revalidate=30, stale_if_error=40,
        ))

    def test_field_name_is_case_insensitive(self) -> None:
        """RFC 9110 §5.1: the field is found whatever the case of its name."""
        self.assertEqual(response_directives([(b"cache-CONTROL", b"max-age=7")]).max_age, 7)

    def test_invalid_lifetime_reads_as_zero(self) -> None:
        """RFC 9111 §4.2.1: a max-age or s-maxage that is not delta-seconds makes it stale."""
        for argument in (b"max-age=abc", b"max-age", b"max-age=-1", b"max-age=1.5"):
            self.assertEqual(response_directives(cache_control(argument)).max_age, 0, argument)
        self.assertEqual(response_directives(cache_control(b"s-maxage=soon")).s_maxage, 0)

    def test_invalid_stale_windows_read_as_zero(self) -> None:
        """RFC 5861: an unreadable stale window allows no stale use."""
        directives = response_directives(cache_control(
            b"stale-while-revalidate=x, stale-if-error=-5"
        ))
        self.assertEqual(directives.stale_while_revalidate, 0)
        self.assertEqual(directives.stale_if_error, 0)

    def test_absent_stale_if_error_is_none(self) -> None:
        """RFC 5861 §4: absent (None, the operator's default applies) differs from 0."""
        self.assertIsNone(response_directives(cache_control(b"max-age=5")).stale_if_error)

    def test_qualified_forms_read_as_unqualified(self) -> None:
        """RFC 9111 §5.2.2.4, §5.2.2.7: no-cache="f" and private="f" cover the whole response."""
        directives = response_directives(cache_control(b'no-cache="Set-Cookie", private="X"'))
        self.assertTrue(directives.no_cache)
        self.assertTrue(directives.private)

    def test_unknown_directives_are_ignored(self) -> None:
        """RFC 9111 §5.2.3: extension directives a cache does not know are ignored."""
        self.assertEqual(response_directives(cache_control(b"immutable, community=UCI, max-age=3")),
                         ResponseDirectives(max_age=3))

    def test_what_forbids_stale_use(self) -> None:
        """RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: these forbid serving stale."""
        for line in (b"no-cache", b"must-revalidate", b"proxy-revalidate", b"s-maxage=60"):
            self.assertTrue(response_directives(cache_control(line)).forbids_stale, line)
        for line in (b"max-age=60", b"public, stale-if-error=60", b""):
            self.assertFalse(response_directives(cache_control(line)).forbids_stale, line)


class RequestDirectivesTests(SynchronousTestCase):
    """The request directives (RFC 9111 §5.2.1)."""

    def test_no_cache_control_means_no_directives(self) -> None:
        """A request without Cache-Control asks nothing of the cache."""
        self.assertEqual(request_directives([]), RequestDirectives())

    def test_every_known_directive(self) -> None:
        """RFC 9111 §5.2.1: each directive lands in its attribute."""
        self.assertEqual(
            request_directives(cache_control(
                b"no-cache, no-store, only-if-cached, max-age=0, max-stale=30, min-fresh=10"
            )),
            RequestDirectives(no_cache=True, no_store=True, only_if_cached=True, max_age=0,
                              max_stale=30, min_fresh=10),
        )

    def test_max_stale_without_argument_accepts_any_staleness(self) -> None:
        """RFC 9111 §5.2.1.2: max-stale with no value accepts a stale response of any age."""
        self.assertEqual(request_directives(cache_control(b"max-stale")).max_stale,
                         MAX_DELTA_SECONDS)

    def test_invalid_arguments_never_widen_what_is_accepted(self) -> None:
        """RFC 9111 §4.2.1: an unreadable max-age is 0, max-stale absent, min-fresh the most."""
        self.assertEqual(
            request_directives(cache_control(b"max-age=x, max-stale=y, min-fresh=z")),
            RequestDirectives(max_age=0, max_stale=None, min_fresh=MAX_DELTA_SECONDS),
        )


class VaryTests(SynchronousTestCase):
    """Vary (RFC 9110 §12.5.5)."""

    def test_absent(self) -> None:
        """A response without Vary was not selected on any request field."""
        self.assertEqual(parse_vary([]), Vary())

    def test_names_are_lower_case_sorted_and_unique(self) -> None:
        """RFC 9110 §5.1: field names are case-insensitive; a list over lines is one list."""
        vary = parse_vary([(b"Vary", b"Origin, accept-encoding"), (b"VARY", b" Accept ,origin,")])
        self.assertEqual(vary, Vary(field_names=(b"accept", b"accept-encoding", b"origin")))

    def test_star(self) -> None:
        """RFC 9110 §12.5.5: "*" means no later request can be known to match."""
        self.assertTrue(parse_vary([(b"Vary", b"Accept, *")]).varies_on_anything)
        self.assertEqual(parse_vary([(b"Vary", b"*")]), Vary(varies_on_anything=True))

    def test_element_that_is_not_a_field_name_reads_as_star(self) -> None:
        """RFC 9111 §4.1: a Vary the cache cannot read cannot be matched."""
        self.assertTrue(parse_vary([(b"Vary", b"Accept Language")]).varies_on_anything)

    def test_empty_vary(self) -> None:
        """RFC 9110 §5.6.1: a Vary of empty elements names no field."""
        self.assertEqual(parse_vary([(b"Vary", b" , ")]), Vary())

    @PROPERTY
    @given(st.lists(st.binary(max_size=32), max_size=3))
    def test_never_raises_on_arbitrary_bytes(self, lines: list[bytes]) -> None:
        """Any Vary value reads as some field names or as "*"."""
        vary = parse_vary([(b"Vary", line) for line in lines])
        self.assertEqual(list(vary.field_names), sorted(set(vary.field_names)))


class FieldsTests(SynchronousTestCase):
    """Reading header pairs (RFC 9110 §5.1, §5.3)."""

    def test_field_lines_by_name_in_order(self) -> None:
        """RFC 9110 §5.1: every line of the field, whatever the name's case, in order."""
        headers = [(b"Accept", b"a"), (b"Host", b"h"), (b"ACCEPT", b" b ")]
        self.assertEqual(field_lines(headers, b"accept"), [b"a", b" b "])
        self.assertEqual(field_lines(headers, b"missing"), [])

    def test_combined_value(self) -> None:
        """RFC 9110 §5.3: lines combine with a comma, in order; absent is None, not empty."""
        self.assertEqual(combined_value([b" en ", b"fr\t"]), b"en, fr")
        self.assertEqual(combined_value([b""]), b"")
        self.assertIsNone(combined_value([]))
