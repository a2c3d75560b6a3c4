"""Upstream answers with broken framing, through the real gateway: 503, never passed on.

Each answer is written byte for byte by a raw upstream on loopback. What the
gateway sends upstream is read back with h11, an independent parser, so the
forward client is held to RFC 9112 on both of its sides.
"""

from __future__ import annotations

import json

import h11
import pytest
import pytest_twisted

from tests.support import RawUpstream, listen, wait_until

INVALID_ANSWERS = {
    "content-length-overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    "content-length-differing": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "content-length-signed": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "bare-cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "name-not-a-token": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
    "lowercase-version": b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "four-digit-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "unsolicited-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    "endless-1xx": b"HTTP/1.1 100 Continue\r\n\r\n" * 50 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "transfer-encoding-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "transfer-encoding-chunked-identity": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "chunk-size-0x": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
}


async def _answer_with(make_gateway, answer: bytes):
    """A gateway whose storage upstream writes ``answer``; returns (gateway, upstream, listening)."""
    raw = RawUpstream(lambda transport, _: transport.write(answer))
    listening = listen(raw)
    gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="2")
    return gateway, raw, listening


@pytest.mark.parametrize("answer", list(INVALID_ANSWERS.values()), ids=list(INVALID_ANSWERS))
@pytest_twisted.ensureDeferred
async def test_invalid_upstream_answer_is_503_and_never_passed_on(make_gateway, answer):
    """An answer that breaks RFC 9110/9112 is the documented 503 with Retry-After:
    nothing of it reaches the client, and the upstream connection is dropped."""
    gateway, raw, listening = await _answer_with(make_gateway, answer)
    try:
        response = await gateway.get("/api/data/underlying/NIFTY")
        body = await response.content()
        assert response.code == 503, body
        assert json.loads(body)["error"] == "Storage service unavailable"
        [retry_after] = response.headers.getRawHeaders(b"retry-after")
        assert int(retry_after) >= 1
        assert response.headers.getRawHeaders(b"x-a") is None
        assert b"ok" not in body
        await wait_until(lambda: raw.open == 0)
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_invalid_upstream_answer_is_logged_as_invalid_response(make_gateway, access_log):
    """The access log names the failure an invalid upstream answer, not a gateway error."""
    gateway, _, listening = await _answer_with(make_gateway, INVALID_ANSWERS["name-not-a-token"])
    try:
        response = await gateway.get("/api/data/underlying/NIFTY")
        await response.content()
        await wait_until(lambda: len(access_log) == 1)
        [logged] = access_log
        assert logged["status_code"] == 503
        assert logged["upstream_failure"] == "invalid_response"
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_both_framings_are_read_by_transfer_encoding(make_gateway):
    """Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and the
    Content-Length is not passed on: the client sees the chunked body's bytes."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    gateway, raw, listening = await _answer_with(make_gateway, answer)
    try:
        response = await gateway.get("/api/data/underlying/NIFTY")
        assert response.code == 200
        assert await response.content() == b"{}"
        assert response.headers.getRawHeaders(b"content-length") != [b"100"]
        await wait_until(lambda: raw.open == 0)  # not trusted with another request
    finally:
        await listening.port.stopListening()


def _recording_upstream():
    """A raw upstream that keeps every request's bytes and answers 200 once the
    whole request (head and Content-Length body) is in."""
    seen: list[bytes] = []

    def answer(transport, data: bytes) -> None:
        seen.append(data)
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        transport.loseConnection()

    return RawUpstream(answer), seen


def _h11_request(data: bytes) -> tuple[h11.Request, bytes]:
    """Parse one request with h11 as a server would; raises on anything invalid."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request), request
    body = b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            raise AssertionError(f"incomplete request: {event!r} in {data!r}")


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("GET", "/api/data/underlying/NIFTY", None, {}),
        ("GET", "/api/data/products?limit=5&q=a%20b&x=%E2%82%AC", None, {}),
        ("HEAD", "/api/data/underlying/NIFTY", None, {}),
        ("POST", "/api/auth/login", b'{"email": "a@b.c", "password": "x"}',
         {"Content-Type": "application/json"}),
        ("GET", "/api/data/underlying/NIFTY", None,
         {"X-Request-ID": "abc-123", "Accept": "application/json",
          "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
    ],
    ids=["get", "get-query", "head", "post-body", "traced"],
)
@pytest_twisted.ensureDeferred
async def test_what_the_gateway_sends_upstream_parses_with_h11(make_gateway, method, path, body,
                                                               headers):
    """Every request head the forward client writes is valid HTTP/1.1 to h11,
    with the body and the forwarding fields the gateway means to send."""
    raw, seen = _recording_upstream()
    listening = listen(raw)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url,
                                     AUTH_SERVICE_URL=listening.url)
        response = await gateway.request(method, path, data=body, headers=headers)
        await response.content()
        assert response.code == 200
        await wait_until(lambda: len(seen) == 1)
        request, sent_body = _h11_request(seen[0])
        assert request.method == method.encode()
        assert request.http_version == b"1.1"
        names = [name for name, _ in request.headers]
        assert names.count(b"host") == 1
        assert b"x-forwarded-for" in names
        assert b"transfer-encoding" not in names
        assert sent_body == (body or b"")
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_body_failing_before_its_first_byte_is_a_clean_503(make_gateway):
    """An answer whose connection closes after the head, before any body byte,
    is still a 503 the client can read: twisted.web has written nothing yet,
    and none of the upstream's fields is kept."""

    def head_then_close(transport, _):
        transport.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n")
        transport.loseConnection()

    raw = RawUpstream(head_then_close)
    listening = listen(raw)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="2")
        response = await gateway.get("/api/data/underlying/NIFTY")
        body = json.loads(await response.content())
        assert response.code == 503 and body["error"] == "Storage service unavailable"
        assert response.headers.getRawHeaders(b"x-a") is None
        assert response.headers.getRawHeaders(b"x-request-id") is not None
    finally:
        await listening.port.stopListening()
