"""Upstreams that refuse, hang, reset or talk garbage: honest 503s, nothing leaks."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.web.server import NOT_DONE_YET

from tests.support import RawUpstream, closed_port_url, listen, raw_exchange, wait_until


async def _assert_unavailable(response, message):
    body = await response.content()
    assert response.code == 503
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body)["error"] == message
    [retry_after] = response.headers.getRawHeaders(b"retry-after")
    assert int(retry_after) >= 1


@pytest.mark.parametrize(
    "env, method, path, message",
    [
        ("AUTH_SERVICE_URL", "POST", "/api/auth/login", "Auth service unavailable"),
        ("STORAGE_SERVICE_URL", "GET", "/api/data/products", "Storage service unavailable"),
        ("ANALYTICS_SERVICE_URL", "GET", "/api/analytics/pcr/NIFTY", "Analytics service unavailable"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_upstream_is_503(make_gateway, env, method, path, message):
    """A refused connection answers 503 with the service's message and Retry-After."""
    gateway = await make_gateway(**{env: closed_port_url()})
    await _assert_unavailable(await gateway.request(method, path), message)


@pytest_twisted.ensureDeferred
async def test_silent_upstream_times_out_and_is_cancelled(make_gateway, upstream):
    """An upstream that never answers costs a 503 after the timeout, and its connection is closed."""
    upstream.respond = lambda request, seen: NOT_DONE_YET
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, STORAGE_TIMEOUT="0.2")
    await _assert_unavailable(await gateway.get("/api/data/products"), "Storage service unavailable")
    await wait_until(lambda: upstream.connections_lost == 1)


def _reset_before_answer(transport, _):
    transport.abortConnection()


def _garbage(transport, _):
    transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe garbage\r\n\r\n")
    transport.loseConnection()


def _close_before_answer(transport, _):
    transport.loseConnection()


def _huge_header(transport, _):
    transport.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    transport.loseConnection()


@pytest.mark.parametrize("behaviour", [_reset_before_answer, _garbage, _close_before_answer, _huge_header])
@pytest_twisted.ensureDeferred
async def test_misbehaving_upstream_is_503(make_gateway, behaviour):
    """Reset, closed or invalid HTTP before a response: 503 and no connection left open."""
    raw = RawUpstream(behaviour)
    listening = listen(raw)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="2")
        await _assert_unavailable(await gateway.get("/api/data/products"), "Storage service unavailable")
        await wait_until(lambda: raw.open == 0)
    finally:
        await listening.port.stopListening()


def _headers_then(rest: bytes, close: bool):
    from twisted.internet import reactor

    def answer(transport, _):
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + rest)
        if close:
            # Reset only once the gateway has read the head: a reset discards
            # unread data, which would make this the reset-before-answer case.
            reactor.callLater(0.1, transport.abortConnection)

    return answer


@pytest.mark.parametrize("close", [True, False], ids=["reset-mid-body", "stall-mid-body"])
@pytest_twisted.ensureDeferred
async def test_body_interrupted_after_headers_closes_client_connection(make_gateway, close):
    """Once headers went out, a cut or stalled body ends in a closed connection, not a complete body."""
    raw = RawUpstream(_headers_then(b"partial", close))
    listening = listen(raw)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="0.3")
        received = await raw_exchange(
            gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Length: 100" in head
        assert body == b"partial"
        await wait_until(lambda: raw.open == 0)
        response = await gateway.get("/health")
        assert response.code == 200
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_slow_body_within_timeout_is_relayed(make_gateway, upstream):
    """A body whose chunks keep arriving within the timeout is relayed whole."""
    from twisted.internet import reactor

    def respond(request, seen):
        chunks = [b"a" * 10, b"b" * 10, b"c" * 10]

        def next_chunk():
            if chunks:
                request.write(chunks.pop(0))
                reactor.callLater(0.1, next_chunk)
            else:
                request.finish()

        next_chunk()
        return NOT_DONE_YET

    upstream.respond = respond
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, STORAGE_TIMEOUT="0.25")
    response = await gateway.get("/api/data/products")
    assert await response.content() == b"a" * 10 + b"b" * 10 + b"c" * 10
