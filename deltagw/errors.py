"""The gateway's own error answers: one JSON shape, one place that writes it.

Clients and the seed's front end read ``{"error": "<message>"}`` with
``Content-Type: application/json``; README's error table fixes each status and message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.web.http import RESPONSES
from twisted.web.iweb import IRequest

from deltagw.routes import Service

_PHRASES = {
    **RESPONSES,
    # RFC 9110 §15 names some differently from twisted.web's table.
    205: b"Reset Content",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    426: b"Upgrade Required",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    # RFC 6585, which twisted.web's table lacks.
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (RFC 9110 §15, RFC 6585)."""
    return _PHRASES.get(status, b"Error")


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
    """Over budget; the headers say when to come back."""

    status = 429
    message = "Rate limit exceeded"
    outcome = "rate_limited"


class RateLimiterUnavailable(GatewayError):
    """Redis could not decide and the limiter fails closed."""

    status = 503
    message = "Rate limit service unavailable"
    outcome = "rate_limiter_unavailable"

    def __init__(self) -> None:
        super().__init__(headers=[(b"Retry-After", str(RETRY_AFTER_SECONDS).encode("ascii"))])


class PayloadTooLarge(GatewayError):
    status = 413
    message = "Request body too large"
    outcome = "body_too_large"


_OUTCOME_OF_REASON = {
    "circuit_open": "circuit_open",
    "shed": "shed",
    "body_timeout": "upstream_timeout",
    "body_reset": "upstream_reset",
}


def upstream_outcome(reason: str) -> str:
    """The access log ``outcome`` of an upstream failure reason."""
    return _OUTCOME_OF_REASON.get(reason, f"upstream_{reason}")


class UpstreamUnavailable(GatewayError):
    """The upstream could not give an answer: refused, reset, timed out, ...

    Attributes:
        service: The service that failed.
        reason: Short machine-readable cause (``timeout``, ``refused``, ...).
        answered_status: The status of an answer the upstream did give but
            the gateway did not relay (``reason`` ``declined``: a 5xx that a
            stored copy answers in place of, RFC 5861 §4); None when no
            answer came.
    """

    status = 503

    def __init__(
        self,
        service: Service,
        reason: str,
        retry_after: int = RETRY_AFTER_SECONDS,
        answered_status: int | None = None,
    ) -> None:
        super().__init__(
            service.unavailable_message,
            headers=[(b"Retry-After", str(max(1, retry_after)).encode("ascii"))],
        )
        self.service = service
        self.reason = reason
        self.answered_status = answered_status
        self.outcome = upstream_outcome(reason)


class AuthServiceUnavailable(UpstreamUnavailable):
    """A token could not be verified: 503, so the client retries instead of
    logging in again."""

    def __init__(self, service: Service, reason: str) -> None:
        super().__init__(service, reason)
        self.outcome = "auth_unavailable"


def json_body(document: object) -> bytes:
    """Compact JSON, as every gateway-made body is encoded."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def json_response(
    request: IRequest, document: object, content_type: bytes = b"application/json"
) -> bytes:
    """Encode a gateway-made JSON answer and set its Content-Type and Content-Length.

    With the length known, twisted.web sends the body as it is instead of
    chunking it.
    """
    body = json_body(document)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


PROBLEM_JSON = b"application/problem+json"


def problem_document(status: int, message: str, instance: str | None) -> dict[str, object]:
    """The error body: the seed's ``error`` member plus RFC 9457 members.

    ``type`` is ``about:blank``, so ``title`` is the status phrase (RFC 9457
    §4.2.1); ``instance`` is the request id, which the logs carry too.
    """
    document: dict[str, object] = {
        "error": message,
        "type": "about:blank",
        "title": reason_phrase(status).decode("ascii"),
        "status": status,
        "detail": message,
    }
    if instance:
        document["instance"] = instance
    return document


def wants_problem_json(accept: bytes | None) -> bool:
    """Whether the client's Accept header asks for application/problem+json."""
    return accept is not None and PROBLEM_JSON in accept.lower()


def write_error(request: IRequest, error: GatewayError) -> bytes:
    """Set the status and headers of ``error`` on ``request``; return its body."""
    request.setResponseCode(error.status, reason_phrase(error.status))
    for name, value in error.headers:
        request.setHeader(name, value)
    request_id = getattr(request, "request_id", b"").decode("ascii") or None
    content_type = PROBLEM_JSON if wants_problem_json(request.getHeader(b"accept")) else b"application/json"
    return json_response(
        request, problem_document(error.status, error.message, request_id), content_type
    )


class CompositionUnavailable(GatewayError):
    """No part of a composed route could be had (503, ``Retry-After``)."""

    status = 503
    outcome = "upstream_all_failed"

    def __init__(self, titles: list[str], retry_after: int) -> None:
        noun = "service" if len(titles) == 1 else "services"
        super().__init__(
            f"{' and '.join(titles)} {noun} unavailable",
            headers=[(b"Retry-After", str(max(1, retry_after)).encode("ascii"))],
        )
