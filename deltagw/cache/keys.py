"""The cache key: which stored response a request may be answered with (RFC 9111 §2, §4.1).

The primary key is the upstream URL, whole query included, and the origin
the client asked for (scheme and host, as the gateway forwards them in
X-Forwarded-Proto and X-Forwarded-Host). The method is not part of it, so
GET and HEAD find the same stored GET (RFC 9111 §4;
`deltagw.cache.storability` says why only GET is stored).

The origin is there because the upstream sees it and may build its answer
from it (absolute links, redirects): without it, one request with a forged
Host could have the gateway store an answer every other client then gets
(web cache poisoning). nginx keys on the scheme (``$scheme`` in its default
``proxy_cache_key``), Varnish on the Host; this key does both. It costs a
second copy only for clients that name the gateway differently.

The secondary key is what the stored response's Vary names, read from the
request: RFC 9111 §4.1 lets a stored response answer only a request whose
Vary-named fields match those of the request that fetched it.

The request fields are the ones the upstream sees, not the client's: the
gateway removes some (any client's X-User-*, hop-by-hop fields) and adds
others (X-User-ID and X-User-Email from a verified token), and the
upstream chose its response from what it received. So a response with
``Vary: X-User-ID`` is kept per user, and one without it is shared by
every user: an upstream that personalises a response must either name the
identity field in Vary or mark the response ``private``.
"""

from __future__ import annotations

from deltagw.cache.fields import HeaderPairs, combined_value

SecondaryKey = tuple[bytes | None, ...]
"""One normalised value per Vary-named field, in the Vary's order; None for an absent field."""


def primary_key(upstream_url: bytes, asked_origin: bytes) -> bytes:
    """The primary cache key of a request (RFC 9111 §2): its target URI, and the origin asked.

    Args:
        upstream_url: The URL the gateway forwards to, with its whole query:
            ``?a=1&b=2`` and ``?b=2&a=1`` are different keys, since the
            upstream may read them differently.
        asked_origin: ``scheme://host`` as forwarded upstream (`asked_origin`).

    Returns:
        Both as they are, after the URL's `url_key_prefix`. The gateway builds
        the URL from its own settings and the request's path, so the same
        resource always gives the same bytes; no further normalisation (RFC
        3986 §6) is attempted, and a spelling difference costs a miss, never
        a wrong answer.
    """
    return url_key_prefix(upstream_url) + asked_origin


def url_key_prefix(upstream_url: bytes) -> bytes:
    """What the key of every request for ``upstream_url`` starts with, whatever its origin.

    A URL holds no space (RFC 3986 §2), so no other URL's keys share it.
    """
    return upstream_url + b" "


_ORIGIN_FIELDS = {b"x-forwarded-proto": 0, b"x-forwarded-host": 1}


def asked_origin(upstream_headers: HeaderPairs) -> bytes:
    """``scheme://host`` from the X-Forwarded-Proto and X-Forwarded-Host sent upstream."""
    parts = [b"", b""]
    for name, value in upstream_headers:
        index = _ORIGIN_FIELDS.get(name.lower())
        if index is not None:
            parts[index] = value
    return parts[0] + b"://" + parts[1]


def secondary_key(vary_names: tuple[bytes, ...], request_headers: HeaderPairs) -> SecondaryKey:
    """The secondary key of a request, for a response varying on ``vary_names`` (RFC 9111 §4.1).

    Two requests match when their keys are equal. Each field's lines are
    combined with ``", "`` after the whitespace around each is removed,
    two of the transformations RFC 9111 §4.1 allows; values are otherwise
    compared as they are (case included), since only the field's own
    definition could say which other spellings mean the same. Missing a
    possible equivalence costs a miss, never a wrong answer.

    An absent field (None) differs from a field that is present and empty
    (RFC 9111 §4.1: absent matches only absent).

    Args:
        vary_names: The stored response's `deltagw.cache.directives.Vary`
            field names: lower-case, sorted, each once.
        request_headers: The request's header fields as the upstream sees
            them (see the module docstring).

    Returns:
        One value per name, in the order of ``vary_names``; ``()`` when the
        response does not vary.
    """
    if not vary_names:
        return ()
    lines: dict[bytes, list[bytes]] = {name: [] for name in vary_names}
    for name, value in request_headers:
        wanted = lines.get(name.lower())
        if wanted is not None:
            wanted.append(value)
    return tuple(combined_value(lines[name]) for name in vary_names)
