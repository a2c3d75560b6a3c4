"""RFC 9110 syntax checks shared by the request framer and the forward client.

Both run for every request, so the checks are made of what CPython does in
C: ``bytes.translate`` and ``bytes.count`` over a whole head instead of a
regular expression with look-arounds, and field names, which repeat from
one message to the next, are checked once and remembered.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
"""A token (RFC 9110 §5.6.2): what field names and methods are made of."""

_KNOWN_TOKENS: set[bytes] = set()
_MAX_KNOWN_TOKENS = 1024
"""Tokens seen valid, kept up to a bound so that no peer can grow the set."""

_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~%!$&'()*+,;=]*)(?::[0-9]{0,5})?\Z"
)
"""uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP literal or a reg-name."""

CONTROLS = bytes(range(0x00, 0x09)) + b"\x0b\x0c" + bytes(range(0x0E, 0x20)) + b"\x7f"
"""Control characters other than HTAB, CR and LF."""


def is_token(text: bytes) -> bool:
    """Whether ``text`` is a token (RFC 9110 §5.6.2)."""
    if text in _KNOWN_TOKENS:
        return True
    if _TOKEN.match(text) is None:
        return False
    if len(_KNOWN_TOKENS) < _MAX_KNOWN_TOKENS:
        _KNOWN_TOKENS.add(text)
    return True


def has_controls(data: bytes) -> bool:
    """Whether ``data`` holds a control character other than HTAB, CR or LF."""
    return len(data.translate(None, CONTROLS)) != len(data)


def has_bare_cr(data: bytes) -> bool:
    """Whether ``data`` holds a CR that does not start a CRLF."""
    return data.count(b"\r") != data.count(b"\r\n")


def is_host(value: bytes) -> bool:
    """Whether ``value`` is a valid Host: ``uri-host [":" port]`` (RFC 9110 §7.2).

    A port has at most five digits and is at most 65535.
    """
    if _HOST.match(value) is None:
        return False
    _, colon, port = value.rpartition(b":")
    if colon and not value.endswith(b"]") and port and int(port) > 65535:
        return False
    return True
