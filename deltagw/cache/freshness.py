"""How long a response stays fresh, how old it is, and when a stored one may answer.

Freshness (RFC 9111 §4.2) is worked out once, when the response arrives:
`freshness_of` reads its lifetime and its corrected initial age from the
header fields and the two clock readings around the upstream call, and the
stored response keeps the result. Answering a later request is then
arithmetic on ``reactor.seconds()``, no header read again.

The cache never guesses a lifetime from Last-Modified (RFC 9111 §4.2.2
allows it, but an API's responses are not documents that age slowly). The
only lifetime it gives a response that states none is the operator's
default TTL for the route group, and only where RFC 9111 §4.2.2 allows a
heuristic one: a heuristically cacheable status, or ``public``.

Stale responses (RFC 9111 §4.2.4) are served only where someone allowed
it: the client (max-stale), the upstream (stale-while-revalidate,
stale-if-error, RFC 5861) or the operator (a default stale-if-error window,
the "out-of-band contract" §4.2.4 names), and never when the response
forbids it (`ResponseDirectives.forbids_stale`).

A request with only-if-cached (RFC 9111 §5.2.1.7) whose stored response may
not be used (`StoredUse.FORWARD`, or nothing stored) is answered with
`ONLY_IF_CACHED_STATUS` instead of being forwarded.
"""

from __future__ import annotations

import calendar
import enum
import re
import time
from dataclasses import dataclass

from deltagw.cache.directives import (
    MAX_DELTA_SECONDS,
    RequestDirectives,
    ResponseDirectives,
    delta_seconds,
    response_directives,
)
from deltagw.cache.fields import OPTIONAL_WHITESPACE, HeaderPairs, field_lines

HEURISTICALLY_CACHEABLE_STATUSES: frozenset[int] = frozenset(
    {200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501}
)
"""Statuses a cache may give a lifetime the response does not state (RFC 9110 §15.1).

206 is in RFC 9110's list but left out: the cache does not combine or serve
ranges, so it never stores a partial response.
"""

STALE_IF_ERROR_STATUSES: frozenset[int] = frozenset({500, 502, 503, 504})
"""Upstream statuses that count as an error for stale-if-error (RFC 5861 §4)."""

ONLY_IF_CACHED_STATUS = 504
"""The answer to only-if-cached when no stored response will do (RFC 9111 §5.2.1.7)."""

_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = (b"jan", b"feb", b"mar", b"apr", b"may", b"jun",
           b"jul", b"aug", b"sep", b"oct", b"nov", b"dec")
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"(\d\d):(\d\d):(\d\d)"
_IMF_FIXDATE = re.compile(_DAY + rb", (\d\d) " + _MONTH + rb" (\d{4}) " + _TIME + rb" GMT\Z",
                          re.IGNORECASE)
_RFC850_DATE = re.compile(_LONG_DAY + rb", (\d\d)-" + _MONTH + rb"-(\d\d) " + _TIME + rb" GMT\Z",
                          re.IGNORECASE)
_ASCTIME_DATE = re.compile(_DAY + rb" " + _MONTH + rb" ([ \d]\d) " + _TIME + rb" (\d{4})\Z",
                           re.IGNORECASE)


def parse_http_date(value: bytes, now: float) -> float | None:
    """Read an HTTP-date (RFC 9110 §5.6.7) as seconds since the epoch.

    All three formats are read: IMF-fixdate, and the obsolete RFC 850 and
    asctime ones a recipient must still accept. The day name is not checked
    against the date.

    Args:
        value: The field value.
        now: The current time, for an RFC 850 two-digit year: one that would
            lie more than 50 years ahead is the most recent past year with
            the same last two digits (RFC 9110 §5.6.7).

    Returns:
        The time, or None when ``value`` is no valid date (the caller decides
        what that means: an Expires that is not a date is in the past,
        RFC 9111 §5.3).
    """
    value = value.strip(OPTIONAL_WHITESPACE)
    if match := _IMF_FIXDATE.match(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _ASCTIME_DATE.match(value):
        month, day, hour, minute, second, year = match.groups()
    elif match := _RFC850_DATE.match(value):
        day, month, year, hour, minute, second = match.groups()
        year = str(_full_year(int(year), now)).encode()
    else:
        return None
    return _timestamp(int(year), _MONTHS.index(month.lower()) + 1, int(day),
                      int(hour), int(minute), int(second))


def _full_year(two_digits: int, now: float) -> int:
    this_year = time.gmtime(now).tm_year
    year = this_year - this_year % 100 + two_digits
    return year - 100 if year > this_year + 50 else year


def _timestamp(
    year: int, month: int, day: int, hour: int, minute: int, second: int
) -> float | None:
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    # Second 60 is a leap second (RFC 9110 §5.6.7).
    if hour > 23 or minute > 59 or second > 60:
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second)))


def freshness_lifetime(
    status: int,
    directives: ResponseDirectives,
    date: float,
    expires: float | None,
    default_ttl: float | None,
) -> float:
    """How long a response stays fresh in a shared cache (RFC 9111 §4.2.1).

    Args:
        status: The response's status.
        directives: Its Cache-Control directives.
        date: Its Date, or the time it was received when it has none or an
            invalid one (RFC 9110 §6.6.1).
        expires: Its Expires, or None when absent; an Expires that is not a
            date must be passed as a time in the past (RFC 9111 §5.3).
        default_ttl: The operator's lifetime for responses that state none,
            or None for no such default.

    Returns:
        Seconds: s-maxage, else max-age, else Expires minus Date (an
        Expires at or before Date gives 0), else the operator's default for
        a heuristically cacheable status or a ``public`` response
        (RFC 9111 §4.2.2), else 0.
    """
    if directives.s_maxage is not None:
        return float(directives.s_maxage)
    if directives.max_age is not None:
        return float(directives.max_age)
    if expires is not None:
        return max(0.0, expires - date)
    heuristic_allowed = status in HEURISTICALLY_CACHEABLE_STATUSES or directives.public
    if default_ttl is not None and heuristic_allowed:
        return max(0.0, default_ttl)
    return 0.0


def corrected_initial_age(
    age_value: float, date_value: float, request_time: float, response_time: float
) -> float:
    """The age of a response when it arrived (RFC 9111 §4.2.3).

    The larger of two estimates: the apparent age, our receipt time minus
    its Date, which counts the time spent behind caches that send no Age
    (and, as well, any lag of the upstream's clock behind ours); and the
    Age it carried plus the time the call took.

    Args:
        age_value: Its Age, 0 when absent.
        date_value: Its Date (the receipt time when it has none).
        request_time: ``reactor.seconds()`` when the request was sent upstream.
        response_time: ``reactor.seconds()`` when the response arrived.

    Returns:
        Seconds, never negative.
    """
    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value + response_delay)


def age_value(headers: HeaderPairs) -> float:
    """A response's Age (RFC 9111 §5.1) as a number for §4.2.3.

    Returns:
        0 when absent; `MAX_DELTA_SECONDS` (stale on arrival) when the first
        line is not delta-seconds, since a response whose age cannot be
        known cannot be known to be fresh (RFC 9111 §4.2.1).
    """
    lines = field_lines(headers, b"age")
    if not lines:
        return 0.0
    seconds = delta_seconds(lines[0].strip(OPTIONAL_WHITESPACE))
    return float(MAX_DELTA_SECONDS if seconds is None else seconds)


@dataclass(frozen=True, slots=True)
class Freshness:
    """What a stored response's freshness rests on, worked out when it arrived.

    Attributes:
        lifetime: Seconds it stays fresh (RFC 9111 §4.2.1).
        initial_age: Its corrected initial age (RFC 9111 §4.2.3).
        response_time: ``reactor.seconds()`` when it arrived.
        directives: Its Cache-Control directives, for the stale rules.
    """

    lifetime: float
    initial_age: float
    response_time: float
    directives: ResponseDirectives

    def current_age(self, now: float) -> float:
        """Its age now (RFC 9111 §4.2.3): the initial age plus the time held.

        A clock that stepped back (``reactor.seconds()`` is wall time) adds
        nothing rather than making it younger, so the age is never negative.
        """
        return self.initial_age + max(0.0, now - self.response_time)

    def remaining(self, now: float) -> float:
        """Seconds of freshness left now: negative once stale (the RFC 9211 ``ttl``)."""
        return self.lifetime - self.current_age(now)

    def is_fresh(self, now: float) -> bool:
        """RFC 9111 §4.2: fresh while its lifetime exceeds its current age."""
        return self.lifetime > self.current_age(now)


def freshness_of(
    status: int,
    headers: HeaderPairs,
    request_time: float,
    response_time: float,
    default_ttl: float | None = None,
) -> Freshness:
    """Work out a response's freshness as it arrives (RFC 9111 §4.2).

    Args:
        status: The upstream's status.
        headers: The upstream's response header fields.
        request_time: ``reactor.seconds()`` when the request was sent.
        response_time: ``reactor.seconds()`` when the response arrived.
        default_ttl: The operator's lifetime for responses that state none
            (see `freshness_lifetime`), or None.

    Returns:
        Its `Freshness`. Duplicate Date or Expires lines: the first is used
        (RFC 9111 §4.2.1).
    """
    directives = response_directives(headers)
    date_lines = field_lines(headers, b"date")
    date = parse_http_date(date_lines[0], response_time) if date_lines else None
    if date is None:
        date = response_time
    expires_lines = field_lines(headers, b"expires")
    expires = None
    if expires_lines:
        # An Expires that is no date, "0" for one, is already expired (RFC 9111 §5.3).
        expires = parse_http_date(expires_lines[0], response_time)
        if expires is None:
            expires = float("-inf")
    return Freshness(
        lifetime=freshness_lifetime(status, directives, date, expires, default_ttl),
        initial_age=corrected_initial_age(age_value(headers), date, request_time, response_time),
        response_time=response_time,
        directives=directives,
    )


class StoredUse(enum.Enum):
    """What a stored response may do for a request."""

    FRESH = "fresh"
    """Answer with it: fresh, and fresh enough for the request."""

    STALE_ALLOWED = "stale_allowed"
    """Answer with it although stale: the request's max-stale accepts it (RFC 9111 §5.2.1.2)."""

    STALE_WHILE_REVALIDATE = "stale_while_revalidate"
    """Answer with it although stale, and fetch a fresh one behind it (RFC 5861 §3)."""

    FORWARD = "forward"
    """Do not answer with it: forward the request (and see `may_serve_stale_on_error`)."""


def use_of_stored(freshness: Freshness, request: RequestDirectives, now: float) -> StoredUse:
    """Decide whether a stored response may answer a request (RFC 9111 §4, §4.2.4, §5.2.1).

    Args:
        freshness: The stored response's freshness.
        request: The request's Cache-Control directives.
        now: ``reactor.seconds()``.

    Returns:
        `StoredUse.FRESH` when fresh and fresh enough for the request.
        When stale: `StoredUse.STALE_ALLOWED` within the request's max-stale
        (§5.2.1.2), else `StoredUse.STALE_WHILE_REVALIDATE` within the
        response's window, unless the request has max-age or min-fresh,
        which ask for a fresh response when max-stale does not accompany
        them (§5.2.1.1, §5.2.1.3). Otherwise `StoredUse.FORWARD`: the
        request asks for validation (no-cache, §5.2.1.4), the response is
        older than the request's max-age or fresh for less than its
        min-fresh, it is stale beyond what is allowed, or it forbids stale
        use (§4.2.4).
    """
    if request.no_cache:
        return StoredUse.FORWARD
    age = freshness.current_age(now)
    if request.max_age is not None and age > request.max_age:
        return StoredUse.FORWARD
    remaining = freshness.lifetime - age
    if remaining > 0:
        if request.min_fresh is not None and remaining < request.min_fresh:
            return StoredUse.FORWARD
        return StoredUse.FRESH
    if freshness.directives.forbids_stale or request.min_fresh is not None:
        return StoredUse.FORWARD
    staleness = -remaining
    if request.max_stale is not None:
        # The client's own bound on staleness; the upstream's window does
        # not widen it.
        return StoredUse.STALE_ALLOWED if staleness <= request.max_stale else StoredUse.FORWARD
    if request.max_age is not None:
        return StoredUse.FORWARD
    if _within(staleness, freshness.directives.stale_while_revalidate):
        return StoredUse.STALE_WHILE_REVALIDATE
    return StoredUse.FORWARD


def may_serve_stale_on_error(
    freshness: Freshness, now: float, default_stale_if_error: float = 0.0
) -> bool:
    """Whether a stored response may answer when the forwarded request failed (RFC 5861 §4).

    "Failed" is the caller's call: no response (refused, timed out, circuit
    open) or one of `STALE_IF_ERROR_STATUSES`.

    The request's own directives are not consulted: RFC 5861 §4 lets the
    response be used "regardless of other freshness information", and a
    stored answer serves the client better than the gateway's 503. That is
    also what nginx (``proxy_cache_use_stale error``) and Varnish (grace) do,
    neither of which reads a client's Cache-Control.

    Args:
        freshness: The stored response's freshness.
        now: ``reactor.seconds()``.
        default_stale_if_error: The operator's window in seconds for
            responses without a stale-if-error directive. A response's own
            directive wins, even a shorter one: the upstream knows its data.

    Returns:
        True while it is still fresh (the request only preferred a newer
        one); when stale, True within the stale-if-error window unless the
        response forbids stale use (RFC 9111 §4.2.4: must-revalidate and
        the like hold even when the upstream is down).
    """
    remaining = freshness.remaining(now)
    if remaining > 0:
        return True
    if freshness.directives.forbids_stale:
        return False
    window = freshness.directives.stale_if_error
    if window is None:
        window = default_stale_if_error
    return _within(-remaining, window)


def _within(staleness: float, window: float) -> bool:
    """Stale by no more than a window; a window of 0 allows nothing."""
    return window > 0 and staleness <= window
