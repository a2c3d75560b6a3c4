"""`clean_fields` sets fields exactly as ``setRawHeaders`` does, with or without the speedup.

Fields without a line break are what its callers pass (the upstream
client's parsed values, the gateway's formatted ones); these tests compare
the stock and the fast variant on such fields, field by field and in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.web.http_headers import Headers, InvalidHeaderName

from deltagw.speedups import clean_fields

FIELDS = [
    (b"RateLimit-Policy", b'"default";q=100;w=60'),
    (b"X-RateLimit-Remaining", b"99"),
    (b"content-type", b"application/json"),
    (b"ETag", b'"6933f9c8-258"'),
    (b"Content-MD5", b"Q2hlY2sgSW50ZWdyaXR5IQ=="),
    (b"x-request-id", b"upstream's"),
    (b"Date", b"Sat, 05 Dec 2026 18:22:17 GMT"),
    (b"Empty", b""),
    (b"Content-Type", b"text/plain"),
]


@pytest.fixture
def fast() -> Iterator[None]:
    service = clean_fields.CleanFields()
    service.startService()
    try:
        yield
    finally:
        service.stopService()


def _already_set() -> Headers:
    """What twisted.web has set before the gateway's fields: Date and Server."""
    headers = Headers()
    headers.setRawHeaders(b"Server", [b"deltagw"])
    headers.setRawHeaders(b"Date", [b"Sat, 05 Dec 2026 18:00:00 GMT"])
    return headers


def _stock() -> list[tuple[bytes, list[bytes]]]:
    headers = _already_set()
    for name, value in FIELDS:
        headers.setRawHeaders(name, [value])
    return [(name, list(values)) for name, values in headers.getAllRawHeaders()]


def _items(headers: Headers) -> list[tuple[bytes, list[bytes]]]:
    return [(name, list(values)) for name, values in headers.getAllRawHeaders()]


@pytest.mark.parametrize("speedup", [False, True])
def test_set_field_is_set_raw_headers(request: pytest.FixtureRequest, speedup: bool) -> None:
    """Same names (Twisted's spelling), values and order as setRawHeaders gives,
    a field set again keeping its place."""
    if speedup:
        request.getfixturevalue("fast")
    assert clean_fields.installed() is speedup
    headers = _already_set()
    for name, value in FIELDS:
        clean_fields.set_field(headers, name, value)
    assert _items(headers) == _stock()


@pytest.mark.parametrize("speedup", [False, True])
def test_set_fields_is_set_raw_headers(request: pytest.FixtureRequest, speedup: bool) -> None:
    if speedup:
        request.getfixturevalue("fast")
    headers = _already_set()
    clean_fields.set_fields(headers, FIELDS)
    assert _items(headers) == _stock()


@pytest.mark.parametrize("speedup", [False, True])
def test_a_name_that_is_not_a_token_is_refused(request: pytest.FixtureRequest, speedup: bool) -> None:
    """As setRawHeaders does: Twisted's name encoder judges the name either way."""
    if speedup:
        request.getfixturevalue("fast")
    with pytest.raises(InvalidHeaderName):
        clean_fields.set_field(Headers(), b"Bad Name", b"x")
    with pytest.raises(InvalidHeaderName):
        clean_fields.set_fields(Headers(), [(b"Bad\r\nName", b"x")])


class _StandIn:
    """Something with Headers' methods that is not a Headers."""

    def __init__(self) -> None:
        self.set: list[tuple[bytes, list[bytes]]] = []

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:  # noqa: N802 (Twisted's name)
        self.set.append((name, values))


def test_a_stand_in_for_headers_is_asked_to_set_them(fast: None) -> None:
    stand_in = _StandIn()
    clean_fields.set_field(stand_in, b"ETag", b'"x"')  # type: ignore[arg-type]
    clean_fields.set_fields(stand_in, [(b"Age", b"1")])  # type: ignore[arg-type]
    assert stand_in.set == [(b"ETag", [b'"x"']), (b"Age", [b"1"])]


def test_the_service_counts_its_starts(fast: None) -> None:
    """Two gateways in one process: the speedup stays on until both stop."""
    other = clean_fields.CleanFields()
    other.startService()
    other.startService()
    other.stopService()
    assert clean_fields.installed()
    other.stopService()
    assert clean_fields.installed()
