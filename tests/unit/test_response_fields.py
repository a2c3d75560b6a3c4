"""`ResponseFields` writes what twisted.web writes for the same calls on a `Headers`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers

from deltagw.web.response_fields import ResponseFields, canonical_name, http_date

_NAMES = [b"Date", b"date", b"DATE", b"Vary", b"vary", b"ETag", b"etag", b"X-Request-ID",
          b"x-request-id", b"Content-MD5", b"www-authenticate", b"RateLimit-Policy",
          b"cache-status", b"Age", b"X_Odd_Name", b"te", b"a"]
_VALUES = [b"1", b"", b"Origin", b"deltagw; hit", b'"v1"', b"a, b"]

_CALLS = st.lists(st.tuples(
    st.sampled_from(["setRawHeaders", "addRawHeader", "removeHeader"]),
    st.sampled_from(_NAMES),
    st.lists(st.sampled_from(_VALUES), min_size=1, max_size=3),
), max_size=20)


def _twisted_web_writes(headers: Headers) -> bytes:
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    return channel.transport.value()


@settings(max_examples=500, derandomize=True, database=None)
@given(_CALLS)
def test_the_same_calls_give_the_bytes_twisted_web_writes(calls):
    """Any sequence of set, add and remove, with names in any spelling."""
    reference, ours = Headers(), ResponseFields()
    for method, name, values in calls:
        for fields in (reference, ours):
            if method == "setRawHeaders":
                fields.setRawHeaders(name, values)
            elif method == "addRawHeader":
                fields.addRawHeader(name, values[0])
            else:
                fields.removeHeader(name)
    assert b"".join(ours.head(b"HTTP/1.1", 200, b"OK")) == _twisted_web_writes(reference)
    for name in _NAMES:
        assert ours.hasHeader(name) == reference.hasHeader(name)
        assert ours.getRawHeaders(name) == reference.getRawHeaders(name)


def test_a_name_is_spelled_as_twisted_web_spells_it():
    assert [canonical_name(n) for n in (b"x-request-id", b"etag", b"WWW-AUTHENTICATE")] == [
        b"X-Request-Id", b"ETag", b"WWW-Authenticate"]


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=10))
def test_http_date_is_twisted_webs_date_of_that_second(moments):
    """The once-a-second Date is twisted.web's own, also when the second goes back."""
    for moment in moments:
        assert http_date(moment) == datetimeToString(int(moment))
