"""CORS is answered by the gateway, per CORS_ORIGINS, whatever upstreams say."""

from __future__ import annotations

import pytest_twisted

PREFLIGHT = {
    b"Origin": [b"https://app.example"],
    b"Access-Control-Request-Method": [b"POST"],
    b"Access-Control-Request-Headers": [b"authorization, content-type"],
}


@pytest_twisted.ensureDeferred
async def test_preflight_answered_without_upstream(gateway, upstream):
    """OPTIONS gets 204 with the Allow-* fields and no upstream is contacted."""
    response = await gateway.request("OPTIONS", "/api/auth/login", headers=PREFLIGHT)
    await response.content()
    headers = response.headers
    assert response.code == 204
    assert headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert headers.getRawHeaders(b"access-control-allow-methods") == [b"OPTIONS, POST"]
    assert b"Authorization" in headers.getRawHeaders(b"access-control-allow-headers")[0]
    assert headers.getRawHeaders(b"access-control-max-age") == [b"600"]
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_preflight_for_unknown_path_is_404(gateway, upstream):
    """A preflight for a path that does not exist is a JSON 404."""
    response = await gateway.request("OPTIONS", "/api/nothing", headers=PREFLIGHT)
    await response.content()
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_wildcard_origin_and_upstream_cors_dropped(gateway, upstream):
    """With `*` every response allows any origin, and an upstream's Access-Control-* never passes."""

    def respond(request, seen):
        request.setHeader(b"Access-Control-Allow-Origin", b"https://evil.example")
        request.setHeader(b"Access-Control-Allow-Credentials", b"true")
        return b"{}"

    upstream.respond = respond
    response = await gateway.get("/api/data/products", headers={b"Origin": [b"https://app.example"]})
    await response.content()
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert response.headers.getRawHeaders(b"access-control-allow-credentials") is None


@pytest_twisted.ensureDeferred
async def test_listed_origin_echoed_with_vary(make_gateway, upstream):
    """With a list, a listed origin is echoed with Vary: Origin; others get no allow header."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, CORS_ORIGINS="https://app.example, https://admin.example"
    )

    def respond(request, seen):
        request.setHeader(b"Vary", b"Accept-Encoding")
        return b"{}"

    upstream.respond = respond
    listed = await gateway.get("/api/data/products", headers={b"Origin": [b"https://admin.example"]})
    await listed.content()
    assert listed.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://admin.example"]
    assert listed.headers.getRawHeaders(b"vary") == [b"Origin", b"Accept-Encoding"]
    other = await gateway.get("/api/data/products", headers={b"Origin": [b"https://evil.example"]})
    await other.content()
    assert other.headers.getRawHeaders(b"access-control-allow-origin") is None
    assert other.headers.getRawHeaders(b"vary")[0] == b"Origin"


@pytest_twisted.ensureDeferred
async def test_errors_carry_cors_and_request_id(make_gateway):
    """Gateway-made errors carry the CORS and X-Request-ID fields too."""
    gateway = await make_gateway()
    response = await gateway.get("/api/unknown", headers={b"Origin": [b"https://app.example"]})
    await response.content()
    assert response.code == 404
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert response.headers.getRawHeaders(b"x-request-id")
