"""Cache-Control (RFC 9111 §5.2) and Vary (RFC 9110 §12.5.5), parsed.

Both fields come from the upstream or the client, so the parsers never
raise: what cannot be read is ignored or, where ignoring it could make the
cache serve something it should not, read in the most restrictive way
(RFC 9111 §4.2.1: "the most restrictive directive should be honored").

- Directive names are tokens compared case-insensitively; an argument is a
  token or a quoted-string, and both forms are accepted for every directive
  (RFC 9111 §5.2).
- A directive given twice keeps its first argument (RFC 9111 §4.2.1 allows
  the first occurrence or treating the response as stale).
- Unknown directives are ignored (RFC 9111 §5.2.3).
- A delta-seconds argument that is not 1*DIGIT is invalid. On a response's
  max-age or s-maxage it makes the response stale (RFC 9111 §4.2.1
  encourages that), i.e. a lifetime of 0, which the cache does not store;
  on a request it makes the stored response unusable (see
  `RequestDirectives`). A value too large to hold becomes 2^31
  (RFC 9111 §1.2.2).
- The qualified forms ``no-cache="field"`` and ``private="field"`` are read
  as the unqualified ones, the stricter reading, and the common one (RFC
  9111 §5.2.2.4 and §5.2.2.7 note it): the cache does not strip fields from
  a stored response, so the directive covers all of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from deltagw.cache.fields import OPTIONAL_WHITESPACE, HeaderPairs, field_lines
from deltagw.http_syntax import is_token

MAX_DELTA_SECONDS = 2**31
"""The value of a delta-seconds too large to hold (RFC 9111 §1.2.2)."""

_QUOTED_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"\Z', re.DOTALL)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_LONGEST_EXACT_DELTA = len(str(MAX_DELTA_SECONDS))
_QUOTE = 0x22
_BACKSLASH = 0x5C
_COMMA = 0x2C


def parse_cache_control(lines: Iterable[bytes]) -> dict[bytes, bytes | None]:
    """Read the directives of Cache-Control field lines (RFC 9111 §5.2).

    Args:
        lines: The values of the field's lines, in order.

    Returns:
        Each directive's lower-case name and its argument (unquoted), or
        None for a directive without one. The first occurrence of a name
        wins; elements whose name is not a token are skipped.
    """
    found: dict[bytes, bytes | None] = {}
    for line in lines:
        for element in list_elements(line):
            name, equals, argument = element.partition(b"=")
            name = name.strip(OPTIONAL_WHITESPACE).lower()
            if not is_token(name) or name in found:
                continue
            found[name] = unquoted(argument) if equals else None
    return found


def list_elements(line: bytes) -> list[bytes]:
    """Split a field line at the commas outside quoted strings (RFC 9110 §5.6.1).

    A comma inside a quoted-string (``no-cache="a, b"``) belongs to the
    argument. An unterminated quote runs to the end of the line.
    """
    if b'"' not in line:
        return line.split(b",")
    elements = []
    start = 0
    quoted = escaped = False
    for index, byte in enumerate(line):
        if escaped:
            escaped = False
        elif quoted:
            if byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                quoted = False
        elif byte == _QUOTE:
            quoted = True
        elif byte == _COMMA:
            elements.append(line[start:index])
            start = index + 1
    elements.append(line[start:])
    return elements


def unquoted(argument: bytes) -> bytes:
    """A directive argument without its quotes and quoted-pair escapes (RFC 9110 §5.6.4).

    A token comes back stripped of whitespace; a malformed quoted-string
    comes back as it is, quotes included, so that it reads as no valid
    number.
    """
    argument = argument.strip(OPTIONAL_WHITESPACE)
    match = _QUOTED_STRING.match(argument)
    if match is None:
        return argument
    return _QUOTED_PAIR.sub(rb"\1", match.group(1))


def delta_seconds(argument: bytes | None) -> int | None:
    """Read a delta-seconds argument (RFC 9111 §1.2.2).

    Args:
        argument: The directive's argument, unquoted; None when it had none.

    Returns:
        The number of seconds, at most `MAX_DELTA_SECONDS`; None when the
        argument is missing or is not 1*DIGIT (a sign, a fraction,
        whitespace inside).
    """
    if argument is None or not argument.isdigit():
        return None
    if len(argument.lstrip(b"0")) > _LONGEST_EXACT_DELTA:
        # int() of a very long string is slow, and refused past 4300 digits.
        return MAX_DELTA_SECONDS
    return min(int(argument), MAX_DELTA_SECONDS)


def _seconds_or(found: dict[bytes, bytes | None], name: bytes, invalid: int) -> int | None:
    """A delta-seconds directive: None when absent, ``invalid`` when unreadable."""
    if name not in found:
        return None
    seconds = delta_seconds(found[name])
    return invalid if seconds is None else seconds


@dataclass(frozen=True, slots=True)
class ResponseDirectives:
    """The Cache-Control directives of a response that a shared cache obeys (RFC 9111 §5.2.2).

    Attributes:
        no_store: Never store it (§5.2.2.5).
        no_cache: Never reuse it without validation (§5.2.2.4); qualified
            or not.
        private: Meant for one user: a shared cache never stores it
            (§5.2.2.7); qualified or not.
        public: May be stored even where it otherwise may not, e.g. for a
            request with Authorization (§5.2.2.9).
        must_revalidate: Never reused stale (§5.2.2.2).
        proxy_revalidate: Never reused stale by a shared cache (§5.2.2.8).
        must_understand: Stored only by a cache that understands its status
            (§5.2.2.3).
        max_age: Freshness lifetime in seconds (§5.2.2.1); 0 when invalid.
        s_maxage: Freshness lifetime for shared caches (§5.2.2.10); 0 when
            invalid. Its presence also forbids stale reuse.
        stale_while_revalidate: Seconds after it goes stale during which it
            may be served while a fresh one is fetched (RFC 5861 §3); 0 when
            absent or invalid.
        stale_if_error: Seconds after it goes stale during which it may be
            served when the upstream fails (RFC 5861 §4); None when absent
            (the operator's default then applies), 0 when invalid.
    """

    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    max_age: int | None = None
    s_maxage: int | None = None
    stale_while_revalidate: int = 0
    stale_if_error: int | None = None

    @property
    def forbids_stale(self) -> bool:
        """Whether the response may never be served stale (RFC 9111 §4.2.4).

        no-cache, must-revalidate, proxy-revalidate and s-maxage (which
        "incorporates the semantics of proxy-revalidate" for a shared cache,
        §5.2.2.10) each forbid it. They win over stale-while-revalidate and
        stale-if-error in the same response, the most restrictive reading
        (§4.2.1), and over the operator's defaults.
        """
        return (
            self.no_cache
            or self.must_revalidate
            or self.proxy_revalidate
            or self.s_maxage is not None
        )


def response_directives(headers: HeaderPairs) -> ResponseDirectives:
    """The Cache-Control directives of a response's header fields (RFC 9111 §5.2.2)."""
    found = parse_cache_control(field_lines(headers, b"cache-control"))
    if not found:
        return _NO_RESPONSE_DIRECTIVES
    return ResponseDirectives(
        no_store=b"no-store" in found,
        no_cache=b"no-cache" in found,
        private=b"private" in found,
        public=b"public" in found,
        must_revalidate=b"must-revalidate" in found,
        proxy_revalidate=b"proxy-revalidate" in found,
        must_understand=b"must-understand" in found,
        max_age=_seconds_or(found, b"max-age", invalid=0),
        s_maxage=_seconds_or(found, b"s-maxage", invalid=0),
        stale_while_revalidate=_seconds_or(found, b"stale-while-revalidate", invalid=0) or 0,
        stale_if_error=_seconds_or(found, b"stale-if-error", invalid=0),
    )


_NO_RESPONSE_DIRECTIVES = ResponseDirectives()


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """The Cache-Control directives of a request (RFC 9111 §5.2.1).

    An unreadable argument never widens what the client accepts: an invalid
    max-age reads as 0, an invalid max-stale as absent and an invalid
    min-fresh as `MAX_DELTA_SECONDS`, so the stored response is not used
    and the request goes upstream.

    Attributes:
        no_cache: Use no stored response without validation (§5.2.1.4).
        no_store: Store neither this request nor its response (§5.2.1.5).
        only_if_cached: Answer from the cache or with 504 (§5.2.1.7).
        max_age: Accept no response older than this (§5.2.1.1).
        max_stale: Accept a response stale by at most this; without an
            argument, stale by any amount, `MAX_DELTA_SECONDS` (§5.2.1.2).
        min_fresh: Accept only a response still fresh for this long
            (§5.2.1.3).
    """

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    max_stale: int | None = None
    min_fresh: int | None = None


def request_directives(headers: HeaderPairs) -> RequestDirectives:
    """The Cache-Control directives of a request's header fields (RFC 9111 §5.2.1).

    Pragma is not read: RFC 9111 §5.4 deprecates it, and the gateway's
    clients are not HTTP/1.0 caches.
    """
    found = parse_cache_control(field_lines(headers, b"cache-control"))
    if not found:
        return _NO_REQUEST_DIRECTIVES
    if b"max-stale" in found and found[b"max-stale"] is None:
        max_stale: int | None = MAX_DELTA_SECONDS
    else:
        max_stale = delta_seconds(found.get(b"max-stale"))
    return RequestDirectives(
        no_cache=b"no-cache" in found,
        no_store=b"no-store" in found,
        only_if_cached=b"only-if-cached" in found,
        max_age=_seconds_or(found, b"max-age", invalid=0),
        max_stale=max_stale,
        min_fresh=_seconds_or(found, b"min-fresh", invalid=MAX_DELTA_SECONDS),
    )


_NO_REQUEST_DIRECTIVES = RequestDirectives()


@dataclass(frozen=True, slots=True)
class Vary:
    """A response's Vary field (RFC 9110 §12.5.5).

    Attributes:
        field_names: The request fields the response was selected on,
            lower-case, each once, sorted (so ``Accept, Origin`` and
            ``origin, accept`` are the same Vary).
        varies_on_anything: ``*`` was listed: something other than request
            fields chose the response, so no later request can be known to
            match (RFC 9111 §4.1); an element that is not a field name is
            read the same way, since the cache cannot tell what it names.
    """

    field_names: tuple[bytes, ...] = ()
    varies_on_anything: bool = False


def parse_vary(headers: HeaderPairs) -> Vary:
    """The Vary of a response's header fields (RFC 9110 §12.5.5).

    Vary is a list, possibly over several lines; empty elements are
    skipped (RFC 9110 §5.6.1).
    """
    lines = field_lines(headers, b"vary")
    if not lines:
        return _NO_VARY
    names: set[bytes] = set()
    for line in lines:
        for element in line.split(b","):
            name = element.strip(OPTIONAL_WHITESPACE).lower()
            if not name:
                continue
            if name == b"*" or not is_token(name):
                return _VARY_ANYTHING
            names.add(name)
    return Vary(field_names=tuple(sorted(names)))


_NO_VARY = Vary()
_VARY_ANYTHING = Vary(varies_on_anything=True)
