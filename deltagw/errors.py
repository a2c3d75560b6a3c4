"""The gateway's own error answers: one JSON shape, one place that writes it.

Clients and the seed's front end read ``{"error": "<message>"}`` with
``Content-Type: application/json``; DESIGN §3 fixes each status and message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.web.iweb import IRequest

from deltagw.routes import Service

RETRY_AFTER_SECONDS = 5
"""How long a client should wait after a 503 that has no better estimate."""


class GatewayError(Exception):
    """An answer the gateway gives instead of (or before) an upstream's.

    Attributes:
        status: HTTP status code.
        message: The ``error`` member of the JSON body.
        headers: Extra response header fields.
        outcome: Why the request ended, for the access log.
    """

    status = 500
    message = "Internal server error"
    outcome = "error"

    def __init__(
        self,
        message: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.headers = list(headers)


class BadRequest(GatewayError):
    status = 400
    message = "Bad request"
    outcome = "bad_request"


class NotFound(GatewayError):
    status = 404
    message = "Not found"
    outcome = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    message = "Method not allowed"
    outcome = "method_not_allowed"

    def __init__(self, allowed: Iterable[str]) -> None:
        super().__init__(headers=[(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))])


class Unauthorized(GatewayError):
    """No usable bearer token (RFC 6750 §3: the challenge says which)."""

    status = 401
    message = "Invalid token"
    outcome = "unauthorized"

    def __init__(self, message: str | None = None, token_given: bool = True) -> None:
        challenge = b'Bearer realm="deltastream"'
        if token_given:
            challenge += b', error="invalid_token"'
        super().__init__(message, headers=[(b"WWW-Authenticate", challenge)])


class RateLimited(GatewayError):
    """Over budget; the headers say when to come back (issue 5)."""

    status = 429
    message = "Rate limit exceeded"
    outcome = "rate_limited"


class PayloadTooLarge(GatewayError):
    status = 413
    message = "Request body too large"
    outcome = "body_too_large"


class UpstreamUnavailable(GatewayError):
    """The upstream could not give an answer: refused, reset, timed out, ...

    Attributes:
        service: The service that failed.
        reason: Short machine-readable cause (``timeout``, ``refused``, ...).
    """

    status = 503

    def __init__(self, service: Service, reason: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(
            service.unavailable_message,
            headers=[(b"Retry-After", str(max(1, retry_after)).encode("ascii"))],
        )
        self.service = service
        self.reason = reason
        self.outcome = f"upstream_{reason}"


class AuthServiceUnavailable(UpstreamUnavailable):
    """A token could not be verified: 503, so the client retries instead of
    logging in again."""

    def __init__(self, service: Service, reason: str) -> None:
        super().__init__(service, reason)
        self.outcome = "auth_unavailable"


def json_body(document: object) -> bytes:
    """Compact JSON, as every gateway-made body is encoded."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def write_error(request: IRequest, error: GatewayError) -> bytes:
    """Set the status and headers of ``error`` on ``request``; return its body."""
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in error.headers:
        request.setHeader(name, value)
    return json_body({"error": error.message})
