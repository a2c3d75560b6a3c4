"""The cache key: which stored response a request may be answered with (RFC 9111 §2, §4.1).

The primary key is the upstream URL, whole query included; the method is
not part of it, so GET and HEAD find the same stored GET (RFC 9111 §4;
`deltagw.cache.storability` says why only GET is stored).

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


def primary_key(upstream_url: bytes) -> bytes:
    """The primary cache key of a request (RFC 9111 §2): its target URI.

    Args:
        upstream_url: The URL the gateway forwards to, with its whole query:
            ``?a=1&b=2`` and ``?b=2&a=1`` are different keys, since the
            upstream may read them differently.

    Returns:
        The URL as it is. The gateway builds it from its own settings and
        the request's path, so the same resource always gives the same
        bytes; no further normalisation (RFC 3986 §6) is attempted, and a
        spelling difference costs a miss, never a wrong answer.
    """
    return upstream_url


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
