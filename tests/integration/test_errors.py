"""Every gateway-made error is JSON; RFC 9457 members ride along; bugs leak nothing."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.support import wait_until


@pytest.mark.parametrize(
    "accept, content_type",
    [
        (None, b"application/json"),
        (b"application/json", b"application/json"),
        (b"application/problem+json", b"application/problem+json"),
        (b"application/problem+json, application/json;q=0.9", b"application/problem+json"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_body_carries_problem_details(make_gateway, accept, content_type):
    """Errors keep {"error"} and add type/title/status/detail/instance; problem+json on request."""
    gateway = await make_gateway()
    headers = {b"Accept": [accept]} if accept else {}
    response = await gateway.get("/api/nowhere", headers=headers)
    body = json.loads(await response.content())
    assert response.code == 404
    assert response.headers.getRawHeaders(b"content-type") == [content_type]
    [request_id] = response.headers.getRawHeaders(b"x-request-id")
    assert body == {
        "error": "Not found",
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "Not found",
        "instance": request_id.decode(),
    }


@pytest_twisted.ensureDeferred
async def test_method_not_allowed_lists_allowed_methods(make_gateway):
    """A wrong method on an existing route is a JSON 405 with an Allow header."""
    gateway = await make_gateway()
    response = await gateway.request("DELETE", "/api/data/products")
    body = json.loads(await response.content())
    assert response.code == 405 and body["error"] == "Method not allowed"
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD, OPTIONS"]


@pytest_twisted.ensureDeferred
async def test_bug_is_500_without_traceback(make_gateway, upstream):
    """An exception inside the gateway is a JSON 500; the traceback goes to the log only."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    gateway.service.gateway.proxy.forward = broken
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = await gateway.get("/api/data/products")
        text = (await response.content()).decode()
        await wait_until(lambda: any("unhandled_error" in str(e.get("message")) for e in events))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 500
    assert json.loads(text)["error"] == "Internal server error"
    assert "secret internals" not in text and "Traceback" not in text
    logged = next(str(e["message"][0]) for e in events if "unhandled_error" in str(e.get("message")))
    assert "secret internals" in logged
    assert (await gateway.get("/health")).code == 200


STANDARD_PHRASES = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
"""RFC 9110 §15 and RFC 6585 §4-5, written out here rather than read from the code."""


def _error_classes(cls: type) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _error_classes(sub)]


def test_every_status_the_gateway_writes_has_its_standard_phrase_and_title():
    """Each GatewayError's status, and each status the framer refuses with, reads as RFC 9110/6585 names it."""
    from deltagw.errors import GatewayError, problem_document, reason_phrase
    from deltagw.web.site import _REFUSAL_OUTCOMES

    statuses = {c.status for c in _error_classes(GatewayError)} | set(_REFUSAL_OUTCOMES) | {400, 408}
    assert {401, 429, 503} <= statuses
    for status in sorted(statuses):
        assert reason_phrase(status) == STANDARD_PHRASES[status], status
        assert problem_document(status, "x", None)["title"] == STANDARD_PHRASES[status].decode()
