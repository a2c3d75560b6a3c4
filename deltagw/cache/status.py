"""What the cache did, for the client (``Cache-Status``, ``Age``) and for the logs.

``Cache-Status`` (RFC 9211) tells a client, and whoever debugs it, whether
the answer came from the gateway's cache and, if not, why it went upstream:
``deltagw; hit; ttl=42`` or ``deltagw; fwd=uri-miss; stored``. The gateway
writes one list member, its own, and leaves any the upstream sent before it.

`CacheOutcome` is the same fact in four words, for the access log and a
metrics label: ``hit``, ``miss``, ``stale``, ``bypass``.

The constructors (`hit`, `forwarded`, `served_on_error`) are the only way
the gateway describes an answer, so the header and the log never disagree.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

from deltagw.cache.directives import MAX_DELTA_SECONDS

CACHE_NAME = "deltagw"
"""The gateway's name in Cache-Status (RFC 9211 §2: a token identifying the cache)."""

_LARGEST_INTEGER = 999_999_999_999_999
"""The largest Structured Field Integer (RFC 8941 §3.3.1)."""

UPSTREAM_ERROR_DETAIL = "upstream-error"
"""The ``detail`` of an answer served from the store because the upstream failed."""


class CacheOutcome(enum.Enum):
    """What the cache did for a request, as the access log and metrics name it."""

    HIT = "hit"
    """Answered from the store, fresh."""

    STALE = "stale"
    """Answered from the store, stale (max-stale, stale-while-revalidate, stale-if-error)."""

    MISS = "miss"
    """Went upstream because the store had nothing usable."""

    BYPASS = "bypass"
    """Went upstream without the store's help being possible or wanted: a method or
    route that is not cached, or a request that asked for a fresh answer (no-cache)."""


class Forward(enum.Enum):
    """Why a request went upstream: the ``fwd`` values of RFC 9211 §2.2."""

    BYPASS = "bypass"
    """The cache is not used for this request (a route or setting)."""

    METHOD = "method"
    """The method is not answered from the cache."""

    URI_MISS = "uri-miss"
    """Nothing stored for the URL."""

    VARY_MISS = "vary-miss"
    """Something stored for the URL, but not for these Vary-named fields."""

    MISS = "miss"
    """Nothing usable stored, when the two above cannot be told apart."""

    REQUEST = "request"
    """A fresh response was stored, but the request's directives refused it (no-cache,
    max-age, min-fresh)."""

    STALE = "stale"
    """The stored response was stale."""

    PARTIAL = "partial"
    """Only part of the response was stored."""


_BYPASSING = frozenset({Forward.BYPASS, Forward.METHOD, Forward.REQUEST})


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """What the cache did for one request; build it with `hit`, `forwarded` or `served_on_error`.

    Attributes:
        outcome: The word for logs and metrics.
        forward: Why it went upstream (RFC 9211 §2.2), or None for a hit.
        forward_status: The upstream's status when it differs from the one
            sent (RFC 9211 §2.3), or None.
        ttl: Seconds of freshness left in the response sent, negative when
            stale (RFC 9211 §2.4), or None.
        stored: The upstream's response was stored (RFC 9211 §2.5).
        collapsed: The upstream call was shared with other requests
            (RFC 9211 §2.6).
        detail: A token saying more (RFC 9211 §2.8), or None.
    """

    outcome: CacheOutcome
    forward: Forward | None = None
    forward_status: int | None = None
    ttl: int | None = None
    stored: bool = False
    collapsed: bool = False
    detail: str | None = None

    def header_value(self, cache_name: str = CACHE_NAME) -> bytes:
        """The gateway's member of the Cache-Status list (RFC 9211 §2).

        Args:
            cache_name: The cache's name, a Structured Field token (RFC 8941
                §3.3.4).

        Returns:
            ``cache_name`` and its parameters in the order RFC 9211 defines
            them; true Booleans as bare keys (RFC 8941 §4.1.1.2).
        """
        return _list_member(self, cache_name)


@functools.lru_cache(maxsize=1024)
def _list_member(status: CacheStatus, cache_name: str) -> bytes:
    """`CacheStatus.header_value`, written once for each status: the answers
    of one second share a handful."""
    parts = [cache_name]
    if status.forward is None:
        parts.append("hit")
    else:
        parts.append(f"fwd={status.forward.value}")
        if status.forward_status is not None:
            parts.append(f"fwd-status={status.forward_status}")
    if status.ttl is not None:
        parts.append(f"ttl={status.ttl}")
    if status.stored:
        parts.append("stored")
    if status.collapsed:
        parts.append("collapsed")
    if status.detail is not None:
        parts.append(f"detail={status.detail}")
    return "; ".join(parts).encode("ascii")


def ttl_seconds(remaining: float) -> int:
    """Seconds of freshness left, as the integer RFC 9211 §2.4 asks for.

    Rounded down, so a response not past its lifetime reads 0 or more and
    one past it -1 or less; bounded to what a Structured Field Integer holds.
    """
    return math.floor(max(-_LARGEST_INTEGER, min(_LARGEST_INTEGER, remaining)))


def hit(remaining: float | None = None) -> CacheStatus:
    """An answer from the store, without going upstream (RFC 9211 §2.1).

    Args:
        remaining: The stored response's seconds of freshness left
            (`deltagw.cache.freshness.Freshness.remaining`), or None to
            leave ``ttl`` out.

    Returns:
        ``deltagw; hit; ttl=N``, or ``deltagw; hit``; the outcome is
        `CacheOutcome.STALE` when ``remaining`` says it is stale (0 or less).
    """
    if remaining is None:
        return CacheStatus(CacheOutcome.HIT)
    return _answer_from_store(remaining > 0, ttl_seconds(remaining))


@functools.lru_cache(maxsize=1024)
def _answer_from_store(fresh: bool, ttl: int) -> CacheStatus:
    """`hit`'s status, made once for each ttl: a hot key's hits within a
    second share one (a `CacheStatus` cannot be changed)."""
    return CacheStatus(CacheOutcome.HIT if fresh else CacheOutcome.STALE, ttl=ttl)


def forwarded(
    forward: Forward,
    *,
    stored: bool = False,
    collapsed: bool = False,
    remaining: float | None = None,
) -> CacheStatus:
    """An answer from the upstream (RFC 9211 §2.2).

    Args:
        forward: Why it went upstream.
        stored: Whether the upstream's response was stored.
        collapsed: Whether the upstream call was shared (`deltagw.cache.coalescing`).
        remaining: The new response's freshness left, or None to leave
            ``ttl`` out.

    Returns:
        E.g. ``deltagw; fwd=uri-miss; stored``. The outcome is
        `CacheOutcome.BYPASS` for bypass, method and request (the store was
        not or could not be asked), `CacheOutcome.MISS` otherwise.
    """
    outcome = CacheOutcome.BYPASS if forward in _BYPASSING else CacheOutcome.MISS
    ttl = None if remaining is None else ttl_seconds(remaining)
    return CacheStatus(outcome, forward=forward, ttl=ttl, stored=stored, collapsed=collapsed)


def served_on_error(
    forward: Forward, remaining: float, forward_status: int | None = None
) -> CacheStatus:
    """A stored answer sent because the upstream failed (RFC 5861 §4).

    Args:
        forward: Why it had gone upstream (`Forward.STALE` for stale-if-error).
        remaining: The stored response's freshness left, negative when stale.
        forward_status: The upstream's error status, or None when it gave
            no response at all (refused, timed out, circuit open).

    Returns:
        E.g. ``deltagw; fwd=stale; fwd-status=503; ttl=-12;
        detail=upstream-error``; the outcome is `CacheOutcome.STALE` when
        stale, `CacheOutcome.HIT` when still fresh.
    """
    outcome = CacheOutcome.HIT if remaining > 0 else CacheOutcome.STALE
    return CacheStatus(outcome, forward=forward, forward_status=forward_status,
                       ttl=ttl_seconds(remaining), detail=UPSTREAM_ERROR_DETAIL)


def age_header_value(current_age: float) -> bytes:
    """The Age field value of an answer from the store (RFC 9111 §5.1, §4.2.3).

    Args:
        current_age: The stored response's current age
            (`deltagw.cache.freshness.Freshness.current_age`).

    Returns:
        Whole seconds, rounded down as Varnish does; never negative, and
        2^31 at most (RFC 9111 §1.2.2).
    """
    seconds = math.floor(min(MAX_DELTA_SECONDS, max(0.0, current_age)))
    return str(seconds).encode("ascii")
