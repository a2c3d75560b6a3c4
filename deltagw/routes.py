"""The route table: the single source of truth for the public API.

Routing (``deltagw.web.application``), the OpenAPI document, metric labels, timeouts and
the auth policy all read this table, so a route cannot exist without being
documented, timed and policed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

API_PREFIXES: tuple[str, ...] = ("/api", "/api/v1")
"""Every ``/api/...`` route is served under each of these prefixes."""


@dataclass(frozen=True)
class Service:
    """A backend service the gateway forwards to.

    Attributes:
        name: Key used in settings, logs and metrics (``auth``).
        title: Human name used in error messages ("Auth service unavailable").
    """

    name: str
    title: str

    @property
    def unavailable_message(self) -> str:
        return f"{self.title} service unavailable"


AUTH = Service("auth", "Auth")
STORAGE = Service("storage", "Storage")
ANALYTICS = Service("analytics", "Analytics")
SERVICES: tuple[Service, ...] = (AUTH, STORAGE, ANALYTICS)


@dataclass(frozen=True)
class QueryParam:
    """A documented query parameter (forwarding keeps every key regardless)."""

    name: str
    description: str
    type: str = "string"


@dataclass(frozen=True)
class Part:
    """One upstream call of a composed route (a Backend for Frontend).

    The call is the upstream half of an existing row, so it inherits that
    row's service, upstream path, timeout, breaker and auth group.

    Attributes:
        name: Key of the part in the combined document (``chain``).
        route: Name of the row whose upstream it calls (``data_chain``).
        query: Fixed query string sent with it (``limit=1``), without ``?``.
    """

    name: str
    route: str
    query: str = ""


@dataclass(frozen=True)
class Route:
    """One public route.

    Attributes:
        name: Stable identifier (metric label, OpenAPI operationId).
        group: Policy group: ``auth``, ``data``, ``analytics``, ``user``, ``meta``.
        method: HTTP method.
        path: Public path below the API prefix, with ``{param}`` placeholders
            (``/data/underlying/{product}``); for meta routes the full path.
        service: Upstream owner, or None when the gateway answers itself.
        upstream_path: Upstream path template, same placeholders as ``path``.
        summary: One line for the docs.
        query: Documented query parameters.
        pass_authorization: Forward the client's Authorization header
            (only logout needs it; everything else gets identity headers).
        versioned: Served under ``/api`` and ``/api/v1`` (False for meta routes
            that live outside ``/api``).
        subtree: Also answers every path below ``path`` (a Klein
            ``branch=True`` route): Swagger UI's asset files.
        parts: For a composed route (``service`` None): the upstream calls
            the gateway makes in parallel and combines into one answer
            (``deltagw.web.composition``).
    """

    name: str
    group: str
    method: str
    path: str
    service: Service | None
    upstream_path: str | None
    summary: str
    query: tuple[QueryParam, ...] = ()
    pass_authorization: bool = False
    versioned: bool = True
    subtree: bool = False
    parts: tuple[Part, ...] = ()
    params: tuple[str, ...] = field(init=False)
    public_paths: tuple[str, ...] = field(init=False)
    """Every public path template of this route (one per API prefix)."""
    template: str = field(init=False)
    """The canonical public template, used as the metric ``route`` label."""

    def __post_init__(self) -> None:
        # Derived once: the request path reads them on every request.
        object.__setattr__(self, "params", tuple(re.findall(r"{(\w+)}", self.path)))
        paths = (
            tuple(prefix + self.path for prefix in API_PREFIXES) if self.versioned else (self.path,)
        )
        object.__setattr__(self, "public_paths", paths)
        object.__setattr__(self, "template", paths[0])

    @property
    def composed(self) -> bool:
        """Whether the gateway answers by combining upstream calls (``parts``)."""
        return bool(self.parts)



_PRODUCT = "product"
_EXPIRY = QueryParam("expiry", "Option expiry date (YYYY-MM-DD); nearest when absent.")

ROUTES: tuple[Route, ...] = (
    Route("auth_register", "auth", "POST", "/auth/register", AUTH, "/register",
          "Register a new user and receive a token."),
    Route("auth_login", "auth", "POST", "/auth/login", AUTH, "/login",
          "Log in with email and password and receive a token."),
    Route("auth_logout", "auth", "POST", "/auth/logout", AUTH, "/logout",
          "Revoke the bearer token.", pass_authorization=True),
    Route("data_underlying", "data", "GET", "/data/underlying/{product}", STORAGE,
          "/underlying/{product}", "Underlying price ticks, newest first.",
          query=(
              QueryParam("start", "Earliest timestamp (ISO-8601).", "date-time"),
              QueryParam("end", "Latest timestamp (ISO-8601).", "date-time"),
              QueryParam("limit", "Number of ticks (1-1000, default 100).", "integer"),
          )),
    Route("data_chain", "data", "GET", "/data/chain/{product}", STORAGE,
          "/option/chain/{product}", "Option chain for one expiry.", query=(_EXPIRY,)),
    Route("data_products", "data", "GET", "/data/products", STORAGE, "/products",
          "Products with market data."),
    Route("analytics_pcr", "analytics", "GET", "/analytics/pcr/{product}", ANALYTICS,
          "/pcr/{product}", "Put/call ratios by open interest and volume.",
          query=(_EXPIRY,)),
    Route("analytics_volatility_surface", "analytics", "GET",
          "/analytics/volatility-surface/{product}", ANALYTICS,
          "/volatility-surface/{product}", "Implied volatility surface."),
    # Group "data": REQUIRE_AUTH=data protects it like the chain it shows;
    # a composed route also needs a token whenever any of its parts' rows
    # would (deltagw.policy.route_access.auth_policy), so it cannot leak them.
    Route("bff_overview", "data", "GET", "/bff/overview/{product}", None, None,
          "Dashboard overview: latest tick, chain summary and put/call ratios in one call.",
          parts=(
              Part("underlying", "data_underlying", query="limit=1"),
              Part("chain", "data_chain"),
              Part("pcr", "analytics_pcr"),
          )),
    Route("user_me", "user", "GET", "/user/me", None, None,
          "The identity behind the bearer token."),
    Route("health", "meta", "GET", "/health", None, None,
          "Liveness: the gateway process is serving.", versioned=False),
    Route("health_ready", "meta", "GET", "/health/ready", None, None,
          "Readiness: 200 with each upstream's circuit state; 503 while draining.",
          versioned=False),
    Route("docs", "meta", "GET", "/docs", None, None,
          "This OpenAPI document."),
    Route("docs_ui", "meta", "GET", "/docs/ui", None, None,
          "Swagger UI for the OpenAPI document.", subtree=True),
    Route("metrics", "meta", "GET", "/metrics", None, None,
          "Prometheus metrics (restricted by METRICS_ALLOW).", versioned=False),
    Route("admin_cache", "meta", "DELETE", "/admin/cache", None, None,
          "Forget stored answers: all, or one public path's (restricted by ADMIN_ALLOW).",
          query=(QueryParam(
              "path",
              "A public path to forget, with its query as clients send it "
              "(`/api/data/chain/NIFTY?expiry=2026-12-31`); a trailing `*` forgets every "
              "stored URL that starts with it (`/api/data/chain/NIFTY*`). Absent: everything.",
          ),),
          versioned=False),
)

ROUTES_BY_NAME: dict[str, Route] = {route.name: route for route in ROUTES}


def part_route(part: Part) -> Route:
    """The row whose upstream call ``part`` makes.

    Raises:
        KeyError: no such row, or it is not forwarded to a service.
    """
    route = ROUTES_BY_NAME[part.route]
    if route.service is None or route.upstream_path is None:
        raise KeyError(f"part {part.name!r}: route {part.route!r} has no upstream")
    return route


def _check_parts() -> None:
    """Fail at import on a composed row whose parts do not fit its path."""
    for route in ROUTES:
        for part in route.parts:
            target = part_route(part)
            missing = set(target.params) - set(route.params)
            if missing or route.service is not None:
                raise ValueError(f"{route.name}: part {part.name!r} cannot be composed")


_check_parts()
