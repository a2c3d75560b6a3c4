"""Set response fields whose values hold no line break without folding them again.

``Headers.setRawHeaders`` runs every value through twisted.web's fold of CR
and LF into spaces (its guard against response splitting, Twisted #9420) and
copies the values into a new list. A proxied answer sets a dozen fields whose
values cannot hold a line break: the upstream's, which the upstream client
refused or split at every CR and LF (``deltagw.upstream.client``), and the
gateway's own, formatted from numbers and checked names. For those the fold
changes nothing, so while a `CleanFields` service runs (SPEEDUPS) `set_field`
stores the value in ``Headers._rawHeaders`` under the name
``Headers`` itself would use: Twisted's canonical spelling, from its own
name encoder, which also refuses a name that is not a token.

Relies on (checked by ``tests/integration/test_speedups_shape.py``):
``Headers._rawHeaders``, a dict from the canonical name to the list of
values, and ``http_headers._nameEncoder.encode``, which gives that name.

Without the service (SPEEDUPS=0) `set_field` calls ``setRawHeaders``.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers, _nameEncoder

from deltagw.speedups.switch import Switch

_canonical = _nameEncoder.encode


class CleanFields(Switch):
    """While running, `set_field` stores values without folding them."""


def installed() -> bool:
    """Whether `set_field` currently skips Twisted's fold."""
    return CleanFields.running_count > 0


def set_field(headers: Headers, name: bytes, value: bytes) -> None:
    """``headers.setRawHeaders(name, [value])`` for a value with no CR or LF.

    The caller vouches for the value: with a line break in it, the field
    would be written as it is instead of folded. Anything but a stock
    ``Headers`` (a stand-in with the same methods) is asked to set it.
    """
    if CleanFields.running_count and type(headers) is Headers:
        headers._rawHeaders[_canonical(name)] = [value]
    else:
        headers.setRawHeaders(name, [value])


def set_fields(headers: Headers, fields: Iterable[tuple[bytes, bytes]]) -> None:
    """`set_field` for each ``(name, value)``, in order."""
    if CleanFields.running_count and type(headers) is Headers:
        raw = headers._rawHeaders
        for name, value in fields:
            raw[_canonical(name)] = [value]
    else:
        set_raw = headers.setRawHeaders
        for name, value in fields:
            set_raw(name, [value])
