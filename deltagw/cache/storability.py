"""Whether the gateway, a shared cache, may store a response (RFC 9111 §3, §3.5).

The rules of RFC 9111 §3, read for a shared cache, plus three choices of the
gateway's own:

- Only responses to GET are stored. A HEAD is answered from a stored GET
  (RFC 9111 §4: the stored response's method allows it, since a HEAD
  response is a GET response without content, RFC 9110 §9.3.2); a HEAD
  that misses is forwarded as HEAD and its response is not stored, since
  it has no content to answer a GET with. (nginx instead turns the HEAD
  into a GET upstream, ``proxy_cache_convert_head``; the caller may do
  that, and then stores a GET.)
- A response with Set-Cookie is never stored: the cookie is almost always
  one client's, and a cache that replays it hands a session to strangers.
  RFC 9111 does not forbid it; nginx and Varnish refuse it by default too.
- A response that may only be reused after validation (``no-cache``, or a
  lifetime of 0) is not stored: this core does not revalidate, so it could
  never answer with it. nginx and Varnish do not store them either.

A lifetime has to come from the response (s-maxage, max-age, Expires) or,
for a response that states none, from the operator's default TTL for the
route group; nothing is guessed from Last-Modified (see
`deltagw.cache.freshness`).
"""

from __future__ import annotations

import enum

from deltagw.cache.directives import parse_vary, request_directives
from deltagw.cache.fields import HeaderPairs, field_lines
from deltagw.cache.freshness import HEURISTICALLY_CACHEABLE_STATUSES, Freshness

STORED_METHODS: frozenset[bytes] = frozenset({b"GET"})
"""Methods whose responses are stored."""

ANSWERED_METHODS: frozenset[bytes] = frozenset({b"GET", b"HEAD"})
"""Methods a stored GET response may answer (RFC 9111 §4, RFC 9110 §9.3.2)."""

UNDERSTOOD_STATUSES: frozenset[int] = HEURISTICALLY_CACHEABLE_STATUSES | {302, 303, 307}
"""Statuses whose caching rules this cache implements, for must-understand (RFC 9111 §5.2.2.3).

Not 206 or 304: the cache neither combines ranges nor revalidates.
"""

SAFE_METHODS: frozenset[bytes] = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
"""RFC 9110 §9.2.1: the methods that do not ask for a change on the server."""


class Refusal(enum.Enum):
    """Why a response was not stored; the value is its name in logs."""

    METHOD = "method"
    """Not a GET."""

    STATUS = "status"
    """Not a final status, 206 or 304, or not understood under must-understand (RFC 9111 §3)."""

    NO_STORE = "no_store"
    """no-store in the request (§5.2.1.5) or the response (§5.2.2.5)."""

    PRIVATE = "private"
    """private: one user's response, never in a shared cache (§5.2.2.7)."""

    NO_CACHE = "no_cache"
    """no-cache: reusable only after validation, which this cache does not do (§5.2.2.4)."""

    VARY_ANYTHING = "vary_anything"
    """Vary: * (or a Vary that cannot be read): no request can be known to match (§4.1)."""

    SET_COOKIE = "set_cookie"
    """Set-Cookie: the gateway's choice, see the module docstring."""

    AUTHORIZATION = "authorization"
    """The request carried credentials and the response did not say it may be shared (§3.5)."""

    NOT_FRESH = "not_fresh"
    """No lifetime stated and none given by the operator, or a lifetime of 0 (§4.2.1)."""


def storage_refusal(
    method: bytes,
    status: int,
    request_headers: HeaderPairs,
    response_headers: HeaderPairs,
    freshness: Freshness,
) -> Refusal | None:
    """Decide whether a response may be stored (RFC 9111 §3, §3.5).

    Args:
        method: The request method (``b"GET"``).
        status: The upstream's status.
        request_headers: The request's header fields as the client sent
            them. Authorization must be seen here even when the gateway does
            not forward it: the gateway turns a token into X-User-ID for the
            upstream, and the response is still that user's.
        response_headers: The upstream's response header fields.
        freshness: The response's freshness (`freshness_of`, with the
            operator's default TTL for the route group).

    Returns:
        None when it may be stored, else the first `Refusal` that applies,
        in the order listed there.
    """
    directives = freshness.directives
    if method not in STORED_METHODS:
        return Refusal.METHOD
    if not 200 <= status <= 599 or status in (206, 304):
        return Refusal.STATUS
    if directives.must_understand and status not in UNDERSTOOD_STATUSES:
        return Refusal.STATUS
    if request_directives(request_headers).no_store:
        return Refusal.NO_STORE
    # A cache that understands the status ignores a response's no-store that
    # comes with must-understand (§5.2.2.3): no-store is there for caches
    # that do not.
    if directives.no_store and not directives.must_understand:
        return Refusal.NO_STORE
    if directives.private:
        return Refusal.PRIVATE
    if directives.no_cache:
        return Refusal.NO_CACHE
    if parse_vary(response_headers).varies_on_anything:
        return Refusal.VARY_ANYTHING
    if field_lines(response_headers, b"set-cookie"):
        return Refusal.SET_COOKIE
    if field_lines(request_headers, b"authorization") and not (
        directives.public or directives.s_maxage is not None or directives.must_revalidate
    ):
        return Refusal.AUTHORIZATION
    if freshness.lifetime <= 0:
        return Refusal.NOT_FRESH
    return None


def invalidates_stored(method: bytes, status: int) -> bool:
    """Whether a response to a request invalidates what is stored for its URL (RFC 9111 §4.4).

    An unsafe method that succeeded (2xx or 3xx) may have changed the
    resource, so the stored responses for its target URI go (the caller
    purges them with `deltagw.cache.store.ResponseStore.purge`). RFC 9111
    §4.4 also names the URLs in Location and Content-Location when they
    share the target's origin; for the gateway's routes those are other
    routes, which the caller knows and this function does not.
    """
    return method not in SAFE_METHODS and 200 <= status <= 399
