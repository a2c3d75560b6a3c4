"""Which header fields cross the gateway, in which direction, and what it adds.

A proxy must not forward connection-specific fields (RFC 9110 §7.6.1), must
not let a client claim an identity or a forwarding chain it was not given,
and owns the request id and CORS fields of its own responses.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Container, Iterable
from dataclasses import dataclass

from twisted.web.http_headers import Headers

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

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


_ENTROPY_POOL_BYTES = 4096
_entropy = b""
_entropy_used = 0


def random_hex(size: int) -> bytes:
    """``size`` random bytes from the OS, as ``2 * size`` hex digits.

    Taken from a pool that ``os.urandom`` refills 4 KiB at a time: a request
    needs three ids (request, trace, span), and each ``os.urandom`` call is a
    ``getrandom()`` system call.
    """
    global _entropy, _entropy_used
    if _entropy_used + size > len(_entropy):
        _entropy = os.urandom(_ENTROPY_POOL_BYTES)
        _entropy_used = 0
    start = _entropy_used
    _entropy_used += size
    return _entropy[start : start + size].hex().encode("ascii")


def request_id(incoming: bytes | None) -> bytes:
    """The client's request id when it is well-formed, else a fresh one."""
    if incoming is not None and _REQUEST_ID.match(incoming):
        return incoming
    # 128 random bits as 32 hex digits, the shape of a uuid4().hex; going
    # through uuid.UUID cost several times as much per request.
    return random_hex(16)


@dataclass(frozen=True)
class TraceContext:
    """The W3C Trace Context the gateway continues (or starts) for a request."""

    trace_id: bytes
    flags: bytes
    tracestate: list[bytes]

    def traceparent(self) -> bytes:
        """A traceparent naming a new span of this trace (the gateway's own)."""
        return b"00-%s-%s-%s" % (self.trace_id, random_hex(8), self.flags)


def trace_context(traceparent: list[bytes], tracestate: list[bytes]) -> TraceContext:
    """Continue a valid incoming trace, or start a new one (W3C Trace Context §3.2).

    tracestate belongs to the incoming trace, so it is kept only when the
    traceparent was valid.
    """
    if not traceparent:
        # The common case: no incoming trace, start one (``random_hex``
        # directly: ``secrets.token_hex`` only wraps it, at a cost).
        return TraceContext(random_hex(16), b"00", [])
    if len(traceparent) == 1:
        match = _TRACEPARENT.match(traceparent[0])
        if match:
            version, trace_id, parent_id, flags, rest = match.groups()
            if (
                version != b"ff"
                and not (version == b"00" and rest)
                and trace_id != b"0" * 32
                and parent_id != b"0" * 16
            ):
                return TraceContext(trace_id, flags, tracestate)
    return TraceContext(random_hex(16), b"00", [])


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


def _is_trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def is_trusted_peer(peer: str, trusted: tuple[Network, ...]) -> bool:
    """Whether the TCP peer is a proxy whose forwarding headers are believed."""
    return bool(trusted) and _is_trusted(peer, trusted)


def chained(incoming: list[bytes], ours: bytes, believed: bool) -> bytes:
    """A forwarding list (X-Forwarded-For, Forwarded) with this hop appended.

    A client's own list is kept only when the peer is a trusted proxy;
    otherwise anyone could forge the chain.
    """
    if incoming and believed:
        return b", ".join(incoming) + b", " + ours
    return ours


def client_address(
    peer: str, incoming: list[bytes], trusted: tuple[Network, ...]
) -> str:
    """The address of the client as far as the gateway can believe it.

    That is the TCP peer, unless the peer is a trusted proxy: then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy.
    """
    if not incoming or not _is_trusted(peer, trusted):
        return peer
    entries = [e.strip() for value in incoming for e in value.split(b",")]
    for entry in reversed(entries):
        address = entry.decode("ascii", "replace")
        if not _is_trusted(address, trusted):
            return address if _is_ip(address) else peer
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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


_NOTHING_NAMED: frozenset[bytes] = frozenset()


def copy_response_headers(upstream: Iterable[tuple[bytes, bytes]], out: Headers) -> None:
    """Copy the upstream's end-to-end response fields onto the client response.

    An upstream field replaces one the server set by itself (Date) and
    repeats of a name are all kept; Vary is merged with the gateway's own.
    Fields the gateway owns on its own responses (CORS, the request id,
    Server: what runs the upstream is not disclosed, as nginx and Envoy
    do) are not taken from the upstream. The upstream client has already removed the
    framing fields (Content-Length, Transfer-Encoding, Connection) and the
    fields Connection names (``deltagw.upstream.client``).
    """
    seen: set[bytes] = set()
    for name, value in upstream:
        lower = name.lower()
        if (
            is_hop_by_hop(lower, _NOTHING_NAMED)
            or lower.startswith(b"access-control-")
            or lower == b"x-request-id"
            or lower == b"server"
        ):
            continue
        if lower in seen or lower == b"vary":
            out.addRawHeader(name, value)
        else:
            out.setRawHeaders(name, [value])
            seen.add(lower)
