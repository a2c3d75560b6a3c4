"""`RequestFields` reads as twisted.web's `Headers` reads the same field lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from deltagw.web.head_request import RequestFields

_NAMES = [b"Host", b"host", b"HOST", b"Cache-Control", b"cache-control", b"traceparent",
          b"TraceParent", b"X-Forwarded-For", b"x-forwarded-for", b"Vary-Me", b"Accept",
          b"accept-encoding", b"X_Odd_Name", b"te", b"a", b"www-authenticate"]
_VALUES = [b"1", b"", b"a, b", b"max-age=0", b"gzip", b"10.0.0.1"]

_FIELDS = st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=12)


@settings(max_examples=500, derandomize=True)
@given(_FIELDS)
def test_reads_as_twisted_web_headers_read(fields):
    """Every read the gateway makes gives what a `Headers` filled line by line gives."""
    theirs = Headers()
    for name, value in fields:
        theirs.addRawHeader(name, value)
    ours = RequestFields(fields)
    assert list(ours.getAllRawHeaders()) == list(theirs.getAllRawHeaders())
    for name in _NAMES + [b"absent"]:
        assert ours.getRawHeaders(name) == theirs.getRawHeaders(name)
        assert ours.getRawHeaders(name, []) == theirs.getRawHeaders(name, [])
        assert ours.hasHeader(name) == theirs.hasHeader(name)
