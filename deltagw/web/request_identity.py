"""Who the client is and which request it is: request ids, trace context, client address.

The request id and trace context are continued from the client when well
formed (W3C Trace Context), else started here; the client address is the
TCP peer unless a trusted proxy (TRUSTED_PROXIES) vouches for another.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from deltagw.config import Network

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")


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


def _is_trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def is_trusted_peer(peer: str, trusted: tuple[Network, ...]) -> bool:
    """Whether the TCP peer is a proxy whose forwarding headers are believed."""
    return bool(trusted) and _is_trusted(peer, trusted)


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
