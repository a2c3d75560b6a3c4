"""Which header fields cross the gateway, in which direction, and what it adds.

A proxy must not forward connection-specific fields (RFC 9110 §7.6.1), must
not let a client claim an identity or a forwarding chain it was not given,
and owns the request id and CORS fields of its own responses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container, Iterable

from twisted.web.http_headers import Headers

from deltagw.speedups import clean_fields

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""RFC 9110 §7.6.1 hop-by-hop fields (plus the non-standard Proxy-Connection)."""

_SET_BY_GATEWAY: frozenset[bytes] = frozenset(
    {
        # The agent writes Host and Content-Length for the upstream connection.
        b"host",
        b"content-length",
        # Twisted's server already answered any 100-continue expectation.
        b"expect",
        # Recomputed from the TCP peer; a client's own are believed only from
        # a trusted proxy (see chained).
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-request-id",
        # Re-issued by the gateway as a new span of the same trace.
        b"traceparent",
        b"tracestate",
    }
)

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

def connection_named(values: Iterable[bytes]) -> set[bytes]:
    """The field names the Connection header lines ``values`` list, lower-cased."""
    named: set[bytes] = set()
    for value in values:
        named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def is_hop_by_hop(name: bytes, named: Container[bytes]) -> bool:
    """True for a field that belongs to one connection, not to the message."""
    lower = name.lower()
    return lower in HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")


def _forwarded_value(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    if _TOKEN.match(raw):
        return raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@functools.lru_cache(maxsize=1024)
def forwarded_element(peer: str, proto: bytes, host: bytes) -> bytes:
    """One RFC 7239 element describing this hop (IPv6 addresses quoted and bracketed).

    Cached: a client sends the same Host from the same address request after
    request (``make bench``).
    """
    node = f"[{peer}]" if ":" in peer else peer
    parts = [b"for=" + _forwarded_value(node), b"proto=" + proto]
    if host:
        parts.append(b"host=" + _forwarded_value(host.decode("ascii", "replace")))
    return b";".join(parts)


def chained(incoming: list[bytes], ours: bytes, believed: bool) -> bytes:
    """A forwarding list (X-Forwarded-For, Forwarded) with this hop appended.

    A client's own list is kept only when the peer is a trusted proxy;
    otherwise anyone could forge the chain.
    """
    if incoming and believed:
        return b", ".join(incoming) + b", " + ours
    return ours


_CLIENT_ADDRESS_FIELDS: frozenset[bytes] = frozenset(
    {b"x-real-ip", b"true-client-ip", b"cf-connecting-ip", b"x-client-ip"}
)
"""Fields in which proxies and CDNs name the client: believed only from a trusted proxy."""


def upstream_request_headers(
    incoming: Headers,
    *,
    pass_authorization: bool,
    trusted_peer: bool,
    added: Iterable[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The header fields of the request the upstream receives, as ``(name, value)`` pairs.

    End-to-end fields are copied in order; ``added`` is appended. Dropped:
    hop-by-hop fields; the fields the gateway sets itself; any ``X-User-*``
    (identity comes only from a verified token); and, unless the peer is a
    trusted proxy, the other fields that name the client (``X-Real-IP``,
    ``X-Forwarded-Port``, ...). A name is judged with ``_`` read as ``-``:
    CGI, WSGI and PHP servers read ``X_User_ID`` as ``X-User-ID``.
    """
    named = connection_named(incoming.getRawHeaders(b"connection", ()))
    out = []
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if b"_" in lower:
            lower = lower.replace(b"_", b"-")
        if (
            is_hop_by_hop(lower, named)
            or lower in _SET_BY_GATEWAY
            or lower.startswith(b"x-user-")
            or (lower == b"authorization" and not pass_authorization)
            or (not trusted_peer and _names_the_client(lower))
        ):
            continue
        out.extend((name, value) for value in values)
    out.extend(added)
    return out


def _names_the_client(lower: bytes) -> bool:
    return lower in _CLIENT_ADDRESS_FIELDS or lower.startswith(b"x-forwarded-")


_NOT_COPIED: frozenset[bytes] = HOP_BY_HOP | {b"x-request-id", b"server"}
"""Response fields never taken from an upstream (besides `_NOT_COPIED_PREFIXES`)."""

_NOT_COPIED_PREFIXES = (b"proxy-", b"access-control-")


def copy_response_headers(upstream: Iterable[tuple[bytes, bytes]], out: Headers) -> None:
    """Copy the upstream's end-to-end response fields onto the client response.

    An upstream field replaces one the server set by itself (Date) and
    repeats of a name are all kept; Vary is merged with the gateway's own.
    Fields the gateway owns on its own responses (CORS, the request id,
    Server: what runs the upstream is not disclosed, as nginx and Envoy
    do) are not taken from the upstream. The upstream client has already removed the
    framing fields (Content-Length, Transfer-Encoding, Connection) and the
    fields Connection names, and no value holds a line break
    (``deltagw.upstream.client``), so none needs folding (`clean_fields`).
    """
    seen: set[bytes] = set()
    for name, value in upstream:
        lower = name.lower()
        # What is_hop_by_hop says of a field no Connection names, and the
        # gateway's own fields, in one look-up: this runs for every field
        # of every forwarded answer.
        if lower in _NOT_COPIED or lower.startswith(_NOT_COPIED_PREFIXES):
            continue
        if lower in seen or lower == b"vary":
            out.addRawHeader(name, value)
        else:
            clean_fields.set_field(out, name, value)
            seen.add(lower)
