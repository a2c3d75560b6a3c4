"""What a client sends is read strictly (RFC 9110, RFC 9112): refused at once, in JSON.

The framer's rules are checked on bytes directly; then, through the real
gateway on loopback with raw sockets, that a refusal is a JSON answer that
h11 (an independent parser) reads, that the connection is closed, and that
nothing reached the upstream.
"""

from __future__ import annotations

import json

import h11
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from deltagw.web.request_framing import MAX_HEAD_BYTES, RequestFramer
from tests.support import raw_exchange, wait_until

GET = b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\n\r\n"


def _post(fields: bytes, body: bytes = b"") -> bytes:
    return b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\n" + fields + b"\r\n" + body


REFUSED = {
    # Transfer-Encoding (RFC 9112 §6.1, §6.3)
    "te-identity-with-length": (_post(b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n", b"{}"), 400),
    "te-chunked-then-identity": (_post(b"Transfer-Encoding: chunked, identity\r\n"), 400),
    "te-split-over-two-lines": (
        _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"), 400),
    "te-xchunked": (_post(b"Transfer-Encoding: xchunked\r\n"), 400),
    "te-gzip-chunked": (_post(b"Transfer-Encoding: gzip, chunked\r\n"), 501),
    "te-and-content-length": (
        _post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"0\r\n\r\n"), 400),
    "te-in-http-1-0": (
        b"POST /api/auth/login HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-space-before-colon": (_post(b"Transfer-Encoding : chunked\r\n"), 400),
    "te-obs-fold": (_post(b"X-A: 1\r\n Transfer-Encoding: chunked\r\n"), 400),
    "te-vertical-tab": (_post(b"Transfer-Encoding:\x0bchunked\r\n"), 400),
    # Content-Length (RFC 9110 §8.6)
    "length-signed": (_post(b"Content-Length: +2\r\n", b"{}"), 400),
    "length-hex": (_post(b"Content-Length: 0x2\r\n", b"{}"), 400),
    "length-differing": (_post(b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"), 400),
    "length-list": (_post(b"Content-Length: 2, 3\r\n", b"{}"), 400),
    "length-overflow": (_post(b"Content-Length: 99999999999999999999999\r\n"), 400),
    "length-over-limit": (_post(b"Content-Length: 1001\r\n"), 413),
    "length-over-limit-expect-continue": (
        _post(b"Content-Length: 5000\r\nExpect: 100-continue\r\n"), 413),
    # chunks (RFC 9112 §7.1)
    "chunk-size-0x": (_post(b"Transfer-Encoding: chunked\r\n", b"0x2\r\n{}\r\n0\r\n\r\n"), 400),
    "chunk-size-signed": (_post(b"Transfer-Encoding: chunked\r\n", b"+2\r\n{}\r\n0\r\n\r\n"), 400),
    "chunk-size-17-digits": (
        _post(b"Transfer-Encoding: chunked\r\n", b"0" * 16 + b"2\r\n{}\r\n0\r\n\r\n"), 400),
    "chunk-size-space": (_post(b"Transfer-Encoding: chunked\r\n", b" 2\r\n{}\r\n0\r\n\r\n"), 400),
    "chunk-without-crlf": (_post(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n"), 400),
    "chunk-bad-extension": (
        _post(b"Transfer-Encoding: chunked\r\n", b"2;a=\x01\r\n{}\r\n0\r\n\r\n"), 400),
    "chunked-over-limit": (
        _post(b"Transfer-Encoding: chunked\r\n", b"3e8\r\n" + b"x" * 1000 + b"\r\n2\r\n"), 413),
    # the head (RFC 9112 §2, §3, §5)
    "no-host": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "bad-host": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
    "nul-in-value": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n", 400),
    "control-in-value": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nX-A: a\x01b\r\n\r\n", 400),
    "vertical-tab-in-value": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nX-A: a\x0bb\r\n\r\n", 400),
    "delete-in-value": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nX-A: a\x7f\r\n\r\n", 400),
    "control-in-name": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nX\x01: b\r\n\r\n", 400),
    "bare-lf": (b"GET /api/data/underlying/NIFTY HTTP/1.1\nHost: gw\r\n\r\n", 400),
    "bare-cr": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\rX: 1\r\n\r\n", 400),
    "name-not-a-token": (b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nBad Name: x\r\n\r\n", 400),
    "lowercase-method": (b"get /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "mixed-case-method": (b"Get /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "lowercase-version": (b"GET /api/data/underlying/NIFTY http/1.1\r\nHost: gw\r\n\r\n", 400),
    "http-2-0": (b"GET /api/data/underlying/NIFTY HTTP/2.0\r\nHost: gw\r\n\r\n", 505),
    "request-line-too-long": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
    "header-line-too-long": (b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: " + b"a" * 1_000_000 + b"\r\n\r\n", 431),
    "too-many-fields": (b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
}


@pytest.mark.parametrize(("data", "status"), list(REFUSED.values()), ids=list(REFUSED))
def test_framer_refuses(data, status):
    """Each shape is refused with its status, whether it comes whole or byte by byte."""
    whole = RequestFramer(max_body_bytes=1000)
    passed = whole.feed(data)
    assert whole.rejected is not None and whole.rejected.status == status
    # Nothing of a refused head passes; of a refused body, only what came before.
    assert passed == b"" or (data.startswith(passed) and b"\r\n\r\n" in passed)
    assert len(passed) < len(data)
    trickled = RequestFramer(max_body_bytes=1000)
    step = 1 if len(data) < 3000 else 997
    for i in range(0, len(data), step):
        trickled.feed(data[i : i + step])
        if trickled.rejected is not None:
            break
    assert trickled.rejected is not None and trickled.rejected.status == status


@pytest.mark.parametrize(
    "data",
    [
        GET,
        b"\r\n" + GET,
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw:8000\r\nX-A: \tb \x80\xff\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n",
        _post(b"Content-Length: 2\r\n", b"{}"),
        _post(b"Transfer-Encoding: chunked\r\n", b"2;name=value\r\n{}\r\n0\r\nX-T: 1\r\n\r\n"),
        _post(b"Transfer-Encoding: Chunked\r\n", b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"),
        GET + _post(b"Content-Length: 2\r\n", b"{}") + GET,
    ],
    ids=["get", "leading-blank-line", "http-1-0-without-host", "odd-but-valid-values", "ipv6-host",
         "content-length", "chunked-with-extension-and-trailer", "chunked-at-the-limit",
         "pipelined"],
)
def test_framer_passes_valid_requests_unchanged(data):
    """Valid requests pass byte for byte, whole or trickled, and nothing is held after them."""
    framer = RequestFramer(max_body_bytes=1000)
    assert framer.feed(data) == data and framer.rejected is None
    assert not framer.receiving
    trickled = RequestFramer(max_body_bytes=1000)
    assert b"".join(trickled.feed(data[i : i + 1]) for i in range(len(data))) == data
    assert trickled.rejected is None and not trickled.receiving


def test_framer_holds_an_incomplete_head_and_passes_earlier_requests():
    """A head is handed on only once whole; a refused request does not take the
    valid requests before it with it."""
    framer = RequestFramer(max_body_bytes=1000)
    assert framer.feed(GET + GET[:10]) == GET
    assert framer.receiving
    assert framer.feed(GET[10:]) == GET
    assert framer.feed(GET + b"get / HTTP/1.1\r\nHost: gw\r\n\r\n") == GET
    assert framer.rejected.status == 400


def test_framer_tells_the_last_head_it_read():
    """Its request line and fields (values without the whitespace around them, as
    twisted.web reads them), and how many heads it has read."""
    framer = RequestFramer(max_body_bytes=1000)
    framer.feed(b"GET /a?b HTTP/1.1\r\nHost: gw\r\naccept:\t */* \r\nX-Empty:\r\n\r\n")
    assert (framer.request_line, framer.heads_read) == (b"GET /a?b HTTP/1.1", 1)
    assert framer.fields == [(b"Host", b"gw"), (b"accept", b"*/*"), (b"X-Empty", b"")]
    framer.feed(GET + GET)
    assert (framer.request_line, framer.heads_read) == (GET.split(b"\r\n")[0], 3)


def test_framer_refuses_a_long_head_before_it_ends():
    """Past MAX_HEAD_BYTES the head is refused without waiting for its end."""
    framer = RequestFramer(max_body_bytes=1000)
    framer.feed(b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: " + b"a" * MAX_HEAD_BYTES)
    assert framer.rejected.status == 431


def _h11_response(raw: bytes) -> tuple[h11.Response, bytes]:
    """Read one response with h11, as a client would; fails on anything invalid."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "gw")]))
    client.receive_data(raw)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return response, body
        else:
            raise AssertionError(f"incomplete response: {event!r}")


@pytest.mark.parametrize(("data", "status"), list(REFUSED.values()), ids=list(REFUSED))
@pytest_twisted.ensureDeferred
async def test_gateway_refuses_in_json_and_forwards_nothing(make_gateway, upstream, data, status):
    """The gateway answers the refusal at once in JSON that h11 reads, closes the
    connection, forwards nothing, and serves the next client."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=upstream.url, STORAGE_SERVICE_URL=upstream.url,
        MAX_BODY_BYTES="1000", CLIENT_TIMEOUT="30",
    )
    raw = await raw_exchange(gateway.port_number, data, timeout=5)
    response, body = _h11_response(raw)
    assert response.status_code == status
    assert (b"connection", b"close") in response.headers
    assert json.loads(body)["status"] == status
    assert upstream.seen == []
    assert (await gateway.get("/health")).code == 200


class _Client(protocol.Protocol):
    """A raw client that records what it receives and when the server closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_pipelined_refusal_waits_for_the_answer_before_it(make_gateway, upstream):
    """A refused request pipelined behind a valid one is answered after it, in order."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    client = _Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), client)
    client.transport.write(GET + b"get / HTTP/1.1\r\nHost: gw\r\n\r\n")
    await client.closed
    first, _, rest = client.received.partition(b"HTTP/1.1 400 ")
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert b"case-sensitive" in rest
    assert len(upstream.seen) == 1


@pytest_twisted.ensureDeferred
async def test_declared_body_over_limit_is_413_before_it_is_sent(make_gateway, upstream):
    """A Content-Length over MAX_BODY_BYTES is answered 413 while the client has sent
    only the head: no 100 Continue, no wait for CLIENT_TIMEOUT."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    gateway = await make_gateway(AUTH_SERVICE_URL=upstream.url, MAX_BODY_BYTES="1000",
                                 CLIENT_TIMEOUT="60")
    client = _Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), client)
    client.transport.write(_post(b"Content-Length: 10000000\r\nExpect: 100-continue\r\n"))
    await client.closed  # long before CLIENT_TIMEOUT
    assert client.received.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"100 Continue" not in client.received
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(make_gateway, upstream):
    """A chunked body is answered 413 once its chunk sizes pass MAX_BODY_BYTES,
    while the client is still sending it."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    gateway = await make_gateway(AUTH_SERVICE_URL=upstream.url, MAX_BODY_BYTES="1000")
    client = _Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), client)
    client.transport.write(_post(b"Transfer-Encoding: chunked\r\n", b"400\r\n" + b"x" * 100))
    await wait_until(lambda: client.received)
    assert client.received.startswith(b"HTTP/1.1 413 ")
    await client.closed
    assert upstream.seen == []
