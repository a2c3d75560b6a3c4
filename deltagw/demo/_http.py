"""JSON plumbing shared by the demo backends.

Every answer of a backend, errors included, is a JSON document with
``Content-Type: application/json``; the gateway relays upstream bodies
unchanged, so a plain-text or HTML error page here would reach clients.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from deltagw.demo.market import ExpiryChain, Market, ProductMarket
from deltagw.logs import get_logger

_log = get_logger(component="demo")


class ApiError(Exception):
    """A request the backend refuses, with the status and message to answer.

    Args:
        status: HTTP status code.
        message: Human-readable reason, sent as ``{"error": message}``.
        headers: Extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_body(
    request: IRequest, status: int, body: object, cache_control: bytes | None = None
) -> bytes:
    """Set the status and JSON content type, and encode ``body``.

    Args:
        request: The request being answered.
        status: HTTP status code.
        body: A JSON-serialisable value.
        cache_control: The answer's ``Cache-Control`` (RFC 9111 §5.2.2),
            as a real market-data service would send it; None sends none.

    Returns:
        The encoded body, for a Klein handler to return.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    if cache_control is not None:
        request.setHeader(b"Cache-Control", cache_control)
    return json.dumps(body).encode("utf-8")


def read_json_object(request: IRequest) -> dict[str, Any]:
    """Parse the request body as a JSON object.

    twisted.web has already buffered the whole body in ``request.content``,
    so reading it here does not block the reactor.

    Raises:
        ApiError: 400 when the body is not a JSON object.
    """
    try:
        value = json.loads(request.content.read())
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "Request body must be JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return value


def query_arg(request: IRequest, name: str) -> str | None:
    """Return the single value of query parameter ``name``, or None.

    A repeated parameter is refused rather than silently picking one of its
    values, since the client's intent is then ambiguous.

    Raises:
        ApiError: 400 when the parameter is repeated or not UTF-8.
    """
    values = request.args.get(name.encode("ascii"), [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{name} must be given at most once")
    value: bytes = values[0]
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} must be UTF-8") from None


def install_json_errors(app: Klein) -> None:
    """Register handlers on ``app`` that turn every error into JSON.

    Klein tries handlers in registration order, so the catch-all for
    unexpected exceptions comes last. Each handler's first argument is the
    instance the app is bound to (Klein's protocol names it ``self``); they
    do not use it.
    """

    @app.handle_errors(ApiError)
    def api_error(self: object, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        for header, value in error.headers.items():
            request.setHeader(header.encode("ascii"), value.encode("ascii"))
        return json_body(request, error.status, {"error": error.message})

    @app.handle_errors(NotFound)
    def not_found(self: object, request: IRequest, failure: Failure) -> bytes:
        return json_body(request, 404, {"error": "Not found"})

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self: object, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        # RFC 9110 §15.5.6: a 405 response must list the allowed methods.
        allowed = ", ".join(sorted(error.valid_methods or ()))
        request.setHeader(b"Allow", allowed.encode("ascii"))
        return json_body(request, 405, {"error": "Method not allowed"})

    @app.handle_errors(Exception)
    def unexpected(self: object, request: IRequest, failure: Failure) -> bytes:
        # The traceback goes to the log, never to the client.
        _log.err("demo_unhandled_error", _stuff=failure)
        return json_body(request, 500, {"error": "Internal server error"})


def find_product(market: Market, name: str) -> ProductMarket:
    """Look up a product named in a URL.

    Raises:
        ApiError: 404 for a product the market does not list.
    """
    try:
        return market.products[name]
    except KeyError:
        raise ApiError(404, f"Unknown product: {name}") from None


def find_chain(product: ProductMarket, expiry: str) -> ExpiryChain:
    """Look up the chain for an ``expiry`` query parameter.

    A malformed date is the client's mistake (400); a well-formed date on
    which nothing expires names a resource that does not exist (404).

    Raises:
        ApiError: 400 for a value that is not an ISO date (YYYY-MM-DD), 404
            for a date that is not a listed expiry.
    """
    try:
        day = date.fromisoformat(expiry)
    except ValueError:
        raise ApiError(400, "expiry must be a date (YYYY-MM-DD)") from None
    chain = product.chain(day)
    if chain is None:
        raise ApiError(404, f"Unknown expiry for {product.spec.name}: {expiry}")
    return chain
