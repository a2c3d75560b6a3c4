"""The OpenAPI document, generated from the route table alone.

Nothing here lists routes: every path, method, parameter, security
requirement and error answer is derived from ``deltagw.routes.ROUTES`` and
the same policy functions the edge enforces (``auth_policy``,
``RateLimits.policy``), so a route added to the table is documented the
moment it exists and a policy change shows up in the document by itself.

What the table cannot say (the shape of a success body) comes from small
mappings keyed by route name, with a sensible default for rows they do not
know. The gateway relays upstream bodies unchanged, so the upstream shapes
below describe the reference backends (``deltagw.demo``) loosely: listed
properties, none required, extra properties allowed.

The document is OpenAPI 3.0.3 rather than 3.1: the bundled Swagger UI (4.x,
``swagger-ui-bundle``) renders 3.0 documents only, and nothing here needs 3.1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from deltagw import __version__
from deltagw.policy.rate_limits import RateLimits
from deltagw.policy.route_access import OPTIONAL, REQUIRED, auth_policy
from deltagw.routes import QueryParam, Route

OPENAPI_VERSION = "3.0.3"

Schema = dict[str, Any]

TAGS: dict[str, tuple[str, str]] = {
    "auth": ("Authentication", "Accounts and tokens (forwarded to the auth service)."),
    "data": ("Data", "Market data (forwarded to the storage service)."),
    "analytics": ("Analytics", "Derived analytics (forwarded to the analytics service)."),
    "user": ("User", "The caller's identity (answered by the gateway)."),
    "meta": ("Meta", "The gateway itself: health, documentation, metrics."),
}
"""Route group -> (tag name, tag description). Unknown groups get their own
name, capitalised, as tag."""

BEARER = "bearerAuth"

_REF = "#/components/{}/{}"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": _REF.format(kind, name)}


def _object(properties: dict[str, Schema], required: Sequence[str] = (),
            description: str | None = None, loose: bool = True) -> Schema:
    """A JSON object schema; ``loose`` allows properties beyond those listed."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = loose
    if description:
        schema["description"] = description
    return schema


_STRING: Schema = {"type": "string"}
_NUMBER: Schema = {"type": "number"}
_INTEGER: Schema = {"type": "integer"}
_DATE: Schema = {"type": "string", "format": "date"}
# The reference auth service numbers its users (an SQLite rowid); /api/user/me
# carries the same id as a string, since it comes from the token's "sub".
_PUBLIC_USER = _object({"id": _INTEGER, "email": _STRING, "name": _STRING})
_ATM_QUOTE = _object({
    "last_price": {"type": "number", "nullable": True},
    "iv": {"type": "number", "nullable": True},
})


def _nullable(schema: Schema) -> Schema:
    """``schema`` or null (OpenAPI 3.0 spells it ``nullable``)."""
    return {**schema, "nullable": True}


_OPTION_QUOTE = _object({
    "strike": _NUMBER, "last_price": _NUMBER, "bid": _NUMBER, "ask": _NUMBER,
    "volume": _INTEGER, "open_interest": _INTEGER, "iv": _NUMBER,
})


class Success:
    """The documented success answer of a route.

    Attributes:
        status: Success status code (``"200"``, ``"201"``).
        media_type: Content type of the body.
        schema: Body schema.
        description: One line for the docs.
    """

    def __init__(self, description: str, schema: Schema, status: str = "200",
                 media_type: str = "application/json") -> None:
        self.status = status
        self.media_type = media_type
        self.schema = schema
        self.description = description


_UPSTREAM_NOTE = " Relayed unchanged from the {} service; the shape shown is the reference backend's."

_PCR_FIELDS: dict[str, Any] = {
    "expiry": {"type": "string", "format": "date", "nullable": True},
    "pcr_oi": _NUMBER,
    "pcr_volume": _NUMBER,
    "total_call_oi": _INTEGER,
    "total_put_oi": _INTEGER,
    "total_call_volume": _INTEGER,
    "total_put_volume": _INTEGER,
}
"""The analytics service's put/call ratios (also the overview's ``pcr`` part)."""


SUCCESS: dict[str, Success] = {
    "auth_register": Success(
        "Registered and logged in.",
        _object({"message": _STRING, "token": _STRING, "user": _PUBLIC_USER}),
        status="201",
    ),
    "auth_login": Success("Logged in.", _object({"token": _STRING, "user": _PUBLIC_USER})),
    "auth_logout": Success("The token is revoked.", _object({"message": _STRING})),
    "data_products": Success(
        "Products with market data.", _object({"products": {"type": "array", "items": _STRING}})
    ),
    "data_underlying": Success("Underlying price ticks, newest first.", _object({
        "product": _STRING,
        "count": _INTEGER,
        "ticks": {"type": "array", "items": _object({
            "product": _STRING, "price": _NUMBER, "timestamp": {"type": "string", "format": "date-time"},
        })},
    })),
    "data_chain": Success("The option chain of one expiry.", _object({
        "product": _STRING,
        "spot": _NUMBER,
        "expiries": {"type": "array", "items": _DATE},
        "expiry": _DATE,
        "calls": {"type": "array", "items": _OPTION_QUOTE},
        "puts": {"type": "array", "items": _OPTION_QUOTE},
    })),
    "analytics_pcr": Success("Put/call ratios.", _object({"product": _STRING, **_PCR_FIELDS})),
    "analytics_volatility_surface": Success("Implied volatility by expiry and strike.", _object({
        "product": _STRING,
        "expiries": {"type": "array", "items": _DATE},
        "strikes": {"type": "array", "items": _NUMBER},
        "surface": {"type": "array", "items": {}},
    })),
    "bff_overview": Success(
        "The overview, composed by the gateway from parallel calls to storage and "
        "analytics. A part that failed is null and named in `errors`; the answer is "
        "404 only when every part answered 404, 503 only when no part succeeded.",
        _object({
            "product": _STRING,
            "underlying": _nullable(_object({
                "price": {"type": "number", "nullable": True},
                "timestamp": {"type": "string", "format": "date-time", "nullable": True},
            }, required=("price", "timestamp"))),
            "chain": _nullable(_object({
                "spot": {"type": "number", "nullable": True},
                "expiry": {"type": "string", "format": "date", "nullable": True},
                "expiries": {"type": "integer", "nullable": True,
                             "description": "Number of listed expiries."},
                "strikes": {"type": "integer", "description": "Number of strikes."},
                "atm": _nullable(_object({
                    "strike": _NUMBER,
                    "call": _nullable(_ATM_QUOTE),
                    "put": _nullable(_ATM_QUOTE),
                }, required=("strike", "call", "put"), description="The strike nearest spot.")),
                "total_call_oi": _INTEGER,
                "total_put_oi": _INTEGER,
            }, required=("spot", "expiry", "strikes", "atm", "total_call_oi", "total_put_oi"))),
            "pcr": _nullable(_object(dict(_PCR_FIELDS))),
            "errors": {"type": "array", "items": _object({
                "part": {"type": "string", "enum": ["underlying", "chain", "pcr"]},
                "service": {"type": "string", "enum": ["storage", "analytics"]},
                "reason": {"type": "string", "description": (
                    'Why the part is missing: "status <code>" for an upstream answer '
                    'that was not 2xx, else "timeout", "refused", "reset", "unreachable", '
                    '"invalid_response", "circuit_open", "shed", "body_timeout", ...'
                )},
            }, required=("part", "service", "reason"), loose=False)},
        }, required=("product", "underlying", "chain", "pcr", "errors")),
    ),
    "user_me": Success(
        "The verified identity.",
        _object({"user_id": _STRING, "email": _STRING}, required=("user_id", "email"), loose=False),
    ),
    "health": Success(
        "The gateway process is serving.",
        _object({"status": {"type": "string", "enum": ["healthy"]}, "service": _STRING,
                 "version": {"type": "string", "description": "The deltagw version serving."}},
                required=("status", "service", "version"), loose=False),
    ),
    "health_ready": Success(
        "The gateway is ready to serve traffic.",
        _object({"status": _STRING}, required=("status",)),
    ),
    "docs": Success(
        "This OpenAPI document.",
        {"type": "object", "additionalProperties": True,
         "description": "An OpenAPI 3.0 document."},
    ),
    "docs_ui": Success(
        "Swagger UI for this document (HTML; its assets are served below this path).",
        _STRING, media_type="text/html",
    ),
    "metrics": Success(
        "Prometheus metrics in the text exposition format.",
        _STRING, media_type="text/plain; version=0.0.4",
    ),
    "admin_cache": Success(
        "How many stored answers were forgotten (each variant of a URL counts one).",
        _object({"purged": _INTEGER}, required=("purged",), loose=False),
    ),
}
"""Success answers by route name. Rows not listed get `_default_success`."""

REQUEST_BODIES: dict[str, Schema] = {
    "auth_register": _object(
        {"email": {"type": "string", "format": "email"},
         "password": {"type": "string", "minLength": 8, "format": "password"},
         # The reference auth service trims the name and refuses it empty.
         "name": {"type": "string", "minLength": 1, "pattern": r"\S"}},
        required=("email", "password", "name"),
    ),
    "auth_login": _object(
        {"email": {"type": "string", "format": "email"},
         "password": {"type": "string", "format": "password"}},
        required=("email", "password"),
    ),
}
"""JSON request bodies by route name (forwarded byte for byte)."""

EXTRA_RESPONSES: dict[str, dict[str, str]] = {
    "auth_register": {"409": "Email already registered (auth service)."},
    "auth_login": {"401": "Wrong email or password (auth service)."},
    "health_ready": {"503": "Not ready: a dependency is unavailable."},
    "metrics": {"404": "Not found (the client is outside METRICS_ALLOW)."},
    "admin_cache": {
        "404": "The path names no cached route, or the client is outside ADMIN_ALLOW.",
    },
}
"""Route-specific error answers the policies below cannot infer."""

PATH_PARAMS: dict[str, tuple[str, str]] = {
    "product": ("Product symbol as listed by /api/data/products.", "NIFTY"),
}
"""Description and example of path parameters by name (default: plain string)."""

PATH_VALUE_PATTERN = r"^\.?(?:[^./\\\x00-\x1f\x7f]+\.)*[^./\\\x00-\x1f\x7f]+\.?$"
"""What the gateway lets through as a path parameter value.

The positive form of ``deltagw.web.application._UNSAFE_PARAM``: no control character,
``/`` or ``\\``, no ``..`` anywhere, and not ``.`` alone — every other value
is forwarded, and these are answered 400 by the gateway itself. Written
without look-arounds so that every generator and validator reads it alike
(tests/system/test_schemathesis.py checks that the two agree).
"""

_DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"

QUERY_PARAMS: dict[str, Schema] = {
    "expiry": {"type": "string", "format": "date", "pattern": _DATE_PATTERN},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    "path": {"type": "string", "pattern": "^/"},
}
"""Query parameter schemas by name, where the reference backends (or the
gateway's own routes) accept less than the route table's plain type says.
The gateway itself forwards every query string whole."""

_QUERY_TYPES: dict[str, Schema] = {
    "string": _STRING,
    "integer": _INTEGER,
    "number": _NUMBER,
    "boolean": {"type": "boolean"},
    "date": _DATE,
    "date-time": {"type": "string", "format": "date-time"},
}


def _default_success(route: Route) -> Success:
    if route.service is not None:
        return Success(
            f"Answer of the {route.service.name} service.",
            {"type": "object", "additionalProperties": True},
        )
    return Success("OK.", {"type": "object", "additionalProperties": True})


def _header(description: str, schema: Schema) -> Schema:
    return {"description": description, "schema": schema}


def _error_content() -> dict[str, Any]:
    schema = _ref("schemas", "Error")
    return {"application/json": {"schema": schema},
            "application/problem+json": {"schema": dict(schema)}}


def _components() -> dict[str, Any]:
    rate_headers = {
        "RateLimit-Policy": _ref("headers", "RateLimit-Policy"),
        "RateLimit": _ref("headers", "RateLimit"),
        "X-RateLimit-Limit": _ref("headers", "X-RateLimit-Limit"),
        "X-RateLimit-Remaining": _ref("headers", "X-RateLimit-Remaining"),
        "X-RateLimit-Reset": _ref("headers", "X-RateLimit-Reset"),
    }

    def error(description: str, **headers: Any) -> Schema:
        response: Schema = {
            "description": description,
            "headers": {"X-Request-ID": _ref("headers", "X-Request-ID"), **headers},
            "content": _error_content(),
        }
        return response

    return {
        "schemas": {
            "Error": _object(
                {
                    "error": {"type": "string", "description": "What went wrong."},
                    # RFC 9457 problem details members (deltagw.errors.problem_document).
                    "type": {"type": "string", "description": "Problem type (about:blank)."},
                    "title": {"type": "string", "description": "The status phrase."},
                    "status": {"type": "integer", "description": "The HTTP status."},
                    "detail": {"type": "string", "description": "Same as error."},
                    "instance": {"type": "string", "description": "The request id."},
                },
                required=("error",),
                description="Every error the gateway itself answers has this shape, as "
                            "application/json or, when the client's Accept asks for it, "
                            "application/problem+json (RFC 9457). Clients may rely on "
                            "`error` alone.",
            ),
        },
        "headers": {
            "X-Request-ID": _header(
                "The request's id (the client's own when it is 1-128 characters of "
                "[A-Za-z0-9._:-], else a fresh one); also sent upstream.", _STRING),
            "Retry-After": _header("Seconds to wait before retrying.", _INTEGER),
            "RateLimit-Policy": _header(
                "Quota policy (draft-ietf-httpapi-ratelimit-headers): "
                '"<name>";q=<quota>;w=<window seconds>.', _STRING),
            "RateLimit": _header(
                'Remaining quota: "<name>";r=<remaining>;t=<seconds until more>.', _STRING),
            "X-RateLimit-Limit": _header("Requests allowed per window.", _INTEGER),
            "X-RateLimit-Remaining": _header("Requests left in the bucket.", _INTEGER),
            "X-RateLimit-Reset": _header("Seconds until the bucket is full again.", _INTEGER),
            "WWW-Authenticate": _header("Bearer challenge (RFC 6750 §3).", _STRING),
            "Cache-Status": _header(
                "What the gateway's shared cache did (RFC 9211): `deltagw; hit; ttl=41`, "
                "`deltagw; fwd=uri-miss; stored`, `deltagw; fwd=stale; ttl=-3; "
                "detail=upstream-error`, ...", _STRING),
            "Age": _header(
                "Seconds since the stored answer was generated upstream (RFC 9111 §5.1); "
                "sent with answers from the cache.", _INTEGER),
            "Allow": _header("Methods the path supports.", _STRING),
        },
        "responses": {
            "BadRequest": error("Malformed request: a bad path value, query or JSON body."),
            "Unauthorized": error(
                'No valid bearer token: "Missing Authorization header" or "Invalid token".',
                **{"WWW-Authenticate": _ref("headers", "WWW-Authenticate")},
            ),
            "NotFound": error("No such route, or no such resource upstream."),
            "MethodNotAllowed": error(
                "The path exists but not with this method.",
                Allow=_ref("headers", "Allow"),
            ),
            "PayloadTooLarge": error("The request body is over MAX_BODY_BYTES."),
            "RateLimited": error(
                '"Rate limit exceeded".',
                **{"Retry-After": _ref("headers", "Retry-After")}, **rate_headers,
            ),
            "ServiceUnavailable": error(
                'A service the route needs cannot answer ("<Auth|Storage|Analytics> service '
                'unavailable", "Rate limit service unavailable"); retry later.',
                **{"Retry-After": _ref("headers", "Retry-After")},
            ),
            "InternalError": error('"Internal server error": a bug in the gateway.'),
        },
        "securitySchemes": {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "The token returned by /api/auth/register or /api/auth/login.",
            },
        },
    }


def _parameters(route: Route) -> list[Schema]:
    parameters: list[Schema] = []
    for name in route.params:
        description, example = PATH_PARAMS.get(name, (f"The {name}.", None))
        parameter: Schema = {
            "name": name, "in": "path", "required": True,
            "description": description,
            "schema": {"type": "string", "pattern": PATH_VALUE_PATTERN},
        }
        if example is not None:
            parameter["example"] = example
        parameters.append(parameter)
    for query in route.query:
        parameters.append(_query_parameter(query))
    return parameters


def _query_parameter(query: QueryParam) -> Schema:
    return {
        "name": query.name, "in": "query", "required": False,
        "description": query.description,
        "schema": dict(QUERY_PARAMS.get(query.name) or _QUERY_TYPES.get(query.type, _STRING)),
    }


def _operation(route: Route, operation_id: str, require_auth: frozenset[str]) -> Schema:
    policy = auth_policy(route, require_auth)
    limited = RateLimits.policy(route) is not None
    # Logout's token is judged by the auth service, not the gateway, but the
    # client must still send one.
    needs_token = policy == REQUIRED or route.pass_authorization

    success = SUCCESS.get(route.name) or _default_success(route)
    ok: Schema = {
        "description": success.description
        + (_UPSTREAM_NOTE.format(route.service.name) if route.service is not None else ""),
        "headers": {"X-Request-ID": _ref("headers", "X-Request-ID")},
        "content": {success.media_type: {"schema": success.schema}},
    }
    if limited:
        ok["headers"]["RateLimit-Policy"] = _ref("headers", "RateLimit-Policy")
        ok["headers"]["RateLimit"] = _ref("headers", "RateLimit")
    if route.service is not None and route.method == "GET" and not route.composed:
        # Forwarded GETs go through the shared cache.
        ok["headers"]["Cache-Status"] = _ref("headers", "Cache-Status")
        ok["headers"]["Age"] = _ref("headers", "Age")
    responses: dict[str, Any] = {success.status: ok}

    if route.params or route.query or route.name in REQUEST_BODIES:
        responses["400"] = _ref("responses", "BadRequest")
    if needs_token:
        responses["401"] = _ref("responses", "Unauthorized")
    if route.params:
        responses["404"] = _ref("responses", "NotFound")
    if route.method in ("POST", "PUT", "PATCH"):
        responses["413"] = _ref("responses", "PayloadTooLarge")
    if limited:
        responses["429"] = _ref("responses", "RateLimited")
    # 503: the upstream is down; the auth service is down while a required
    # token is verified; Redis is down and the limiter fails closed.
    if route.service is not None or policy == REQUIRED or limited:
        responses["503"] = _ref("responses", "ServiceUnavailable")
    for status, description in EXTRA_RESPONSES.get(route.name, {}).items():
        responses.setdefault(status, {"description": description, "content": _error_content()})
    responses["default"] = _ref("responses", "InternalError")

    tag = TAGS.get(route.group, (route.group.capitalize(), ""))[0]
    operation: Schema = {
        "operationId": operation_id,
        "summary": route.summary,
        "tags": [tag],
        "responses": dict(sorted(responses.items())),
    }
    parameters = _parameters(route)
    if parameters:
        operation["parameters"] = parameters
    if route.name in REQUEST_BODIES:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": REQUEST_BODIES[route.name]}},
        }
    if needs_token:
        operation["security"] = [{BEARER: []}]
    elif policy == OPTIONAL:
        # Either no token at all, or a bearer token (which then identifies
        # the caller to the upstream and to the rate limiter).
        operation["security"] = [{}, {BEARER: []}]
    else:
        operation["security"] = []
    return operation


def openapi_document(
    routes: Sequence[Route], require_auth: frozenset[str], server_url: str
) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the gateway.

    Args:
        routes: The route table (``deltagw.routes.ROUTES``).
        require_auth: Groups that REQUIRE_AUTH puts behind a token; it
            decides which operations require ``bearerAuth`` and list 401.
        server_url: Base URL clients reach the gateway at, without a path
            (``https://api.example.com``), or ``/`` for the document's own
            origin (see `server_url`).

    Returns:
        A JSON-serialisable dict.

    Raises:
        ValueError: two rows document the same method on the same path, or
            their operationIds collide.
    """
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    used_groups: list[str] = []
    for route in routes:
        if route.group not in used_groups:
            used_groups.append(route.group)
        # Each row once, under its first prefix; the /api/v1 alias is
        # named in the description rather than listed twice.
        path, method = route.template, route.method.lower()
        if method in paths.get(path, {}):
            raise ValueError(f"{route.method} {path} is in the route table twice")
        if route.name in operation_ids:
            raise ValueError(f"operationId {route.name!r} is not unique")
        operation_ids.add(route.name)
        paths.setdefault(path, {})[method] = _operation(route, route.name, require_auth)

    ordered_groups = [g for g in TAGS if g in used_groups] + [g for g in used_groups if g not in TAGS]
    tags = []
    for group in ordered_groups:
        name, description = TAGS.get(group, (group.capitalize(), ""))
        tags.append({"name": name, "description": description} if description else {"name": name})

    # Deep-copied so that a caller changing the document cannot change the
    # module's shared schemas (several operations share one schema object).
    return copy.deepcopy({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "DeltaStream API gateway",
            "version": __version__,
            "description": (
                "The single entry point of the DeltaStream platform. Every /api route is "
                "also served under /api/v1 (the same operation: replace the /api prefix "
                "with /api/v1). Upstream answers (status, body, end-to-end "
                "headers) are relayed unchanged; the gateway's own errors are JSON "
                '`{"error": "..."}`. A known path with the wrong method answers 405 with '
                "an `Allow` header; OPTIONS answers CORS preflights."
            ),
        },
        "servers": [{"url": server_url}],
        "tags": tags,
        "paths": paths,
        "components": _components(),
    })


def server_url(public_url: str | None, secure: bool, host: bytes | None, local: str) -> str:
    """The ``servers`` URL of the document served for one request.

    PUBLIC_URL when it is set. Otherwise the request's Host only when it
    names the address the connection arrived at (``local``, as
    ``host:port``): any other Host is the client's to invent, and would be
    reflected into a document a cache may keep and give to others. Else
    ``/``, the document's own origin, which is always right for Swagger UI
    served by the same gateway.
    """
    if public_url is not None:
        return public_url
    if host is not None and host.decode("ascii", "replace") == local:
        return f"{'https' if secure else 'http'}://{local}"
    return "/"
