"""A response's header fields, written as twisted.web writes a `Headers`.

`deltagw.web.early_hits` answers a request without a twisted.web Request;
the code that fills in the response fields is the same as for any other
answer (the edge's, the limiter's, the cache's), and it is given this in
place of ``request.responseHeaders``. So the two paths differ only in the
last step, turning the fields into bytes, and that step follows
twisted.web's: a field set again keeps its place, one added to repeats
its name's line, names are written in twisted.web's canonical spelling
(``X-Request-Id``, ``ETag``), in the order each name first appeared
(``tests/integration/test_early_hits.py`` compares the bytes of both paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

_T = TypeVar("_T")

_MAX_SPELLINGS = 10_000
"""Field names whose spelling is remembered (twisted.web bounds its own the same way)."""

_spellings: dict[bytes, bytes] = {}

_date_of_second: tuple[int, bytes] = (-1, b"")


def http_date(seconds: float) -> bytes:
    """The Date field twisted.web writes at ``seconds``, asked of it once a second."""
    global _date_of_second
    second = int(seconds)
    if second != _date_of_second[0]:
        _date_of_second = (second, datetimeToString(second))
    return _date_of_second[1]


def canonical_name(name: bytes) -> bytes:
    """``name`` spelled as twisted.web writes it, asked of twisted.web itself once."""
    spelled = _spellings.get(name)
    if spelled is None:
        fields = Headers()
        fields.addRawHeader(name, b"")
        ((spelled, _),) = fields.getAllRawHeaders()
        if len(_spellings) < _MAX_SPELLINGS:
            _spellings[name] = spelled
    return spelled


class ResponseFields:
    """The part of twisted.web's `Headers` that answers use, rendered to bytes.

    Values are taken as they are: every value set on an early answer was
    read from a request head the framer checked (no CR, LF or other
    control), from a stored upstream answer the upstream client checked
    the same way, or made by the gateway.
    """

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: dict[bytes, list[bytes]] = {}

    def setRawHeaders(self, name: bytes, values: Sequence[bytes]) -> None:  # noqa: N802
        # The remembered spelling looked up here: this runs for every field of every answer.
        self._lines[_spellings.get(name) or canonical_name(name)] = list(values)

    def addRawHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        spelled = _spellings.get(name) or canonical_name(name)
        self._lines.setdefault(spelled, []).append(value)

    def removeHeader(self, name: bytes) -> None:  # noqa: N802
        self._lines.pop(canonical_name(name), None)

    def hasHeader(self, name: bytes) -> bool:  # noqa: N802
        return canonical_name(name) in self._lines

    def getRawHeaders(self, name: bytes, default: _T | None = None) -> list[bytes] | _T | None:  # noqa: N802
        return self._lines.get(canonical_name(name)) or default

    def head(self, version: bytes, code: int, reason: bytes) -> list[bytes]:
        """The status line and the field lines, ending with the empty line."""
        out = [version, b" %d " % code, reason, b"\r\n"]
        for name, values in self._lines.items():
            for value in values:
                out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")
        return out
