"""The Klein application, built from the route table.

Each row of ``deltagw.routes.ROUTES`` becomes one Klein route per API prefix
plus an OPTIONS route for its preflight; errors of every kind are turned into
the gateway's JSON error answers in one place (``handle_errors``).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from deltagw import __version__
from deltagw.cache.storability import ANSWERED_METHODS
from deltagw.config import Settings
from deltagw.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    Unauthorized,
    json_response,
    write_error,
)
from deltagw.http_syntax import is_host
from deltagw.logs import get_logger
from deltagw.metrics import Metrics
from deltagw.policy.buckets import Decision
from deltagw.policy.client_networks import client_allowed
from deltagw.policy.rate_limits import RateLimits
from deltagw.policy.route_access import Authenticator
from deltagw.policy.token_verifiers import Identity
from deltagw.routes import ROUTES, Route
from deltagw.speedups import clean_fields
from deltagw.upstream.client import Header
from deltagw.upstream.forwarding import chained, forwarded_element, upstream_request_headers
from deltagw.upstream.proxy import Proxy
from deltagw.web.before_routing import EdgeResource
from deltagw.web.composition import Composer
from deltagw.web.cors import CorsPolicy
from deltagw.web.head_request import HeadRequest
from deltagw.web.openapi import openapi_document, server_url
from deltagw.web.request_identity import is_trusted_peer
from deltagw.web.route_lookup import DirectRoutes, RouteIndex
from deltagw.web.shared_cache import SharedCache
from deltagw.web.site import GatewayRequest
from deltagw.web.swagger_ui import SwaggerUIResource

_log = get_logger(component="app")

_UNSAFE_PARAM = re.compile(r"[\x00-\x1f\x7f/\\]|^\.{1,2}$|\.\.")


def klein_path(template: str) -> str:
    """``/data/chain/{product}`` in werkzeug's syntax: ``/data/chain/<product>``."""
    return re.sub(r"{(\w+)}", r"<\1>", template)


def upstream_path(route: Route, params: dict[str, str]) -> str:
    """The upstream path with each parameter percent-encoded.

    Raises:
        BadRequest: a value that could climb or split the upstream path.
    """
    assert route.upstream_path is not None
    return _filled_path(route.upstream_path, tuple(params.items()))


@functools.lru_cache(maxsize=1024)
def _filled_path(template: str, params: tuple[tuple[str, str], ...]) -> str:
    # Cached: clients ask for the same few products again and again, and the
    # checks and quoting cost more than the lookup (``make bench``).
    for name, value in params:
        if _UNSAFE_PARAM.search(value):
            raise BadRequest(f"Invalid path parameter: {name}")
    return template.format(**{k: quote(v, safe="") for k, v in params})


def set_rate_limit_fields(request: GatewayRequest | HeadRequest, decision: Decision) -> None:
    """Put a limiter's decision on the response (RateLimit and X-RateLimit-*)."""
    clean_fields.set_fields(request.responseHeaders, decision.headers())


def _asked_origin(
    request: GatewayRequest | HeadRequest, seen_proto: bytes, seen_host: bytes, believed: bool
) -> tuple[bytes, bytes]:
    """The scheme and host the client asked for: as seen, or as a trusted proxy
    says (a host only if it is a valid one)."""
    if not believed:
        return seen_proto, seen_host
    proto = request.getHeader(b"x-forwarded-proto")
    forwarded_host = request.getHeader(b"x-forwarded-host")
    if forwarded_host is None or not is_host(forwarded_host):
        forwarded_host = seen_host
    return seen_proto if proto is None else proto, forwarded_host


class Gateway:
    """The gateway's routes; collaborators are passed in so tests can swap them.

    Args:
        settings: The validated configuration.
        reactor: Supplies time (``seconds``/``callLater``) and networking.
        proxy: Forwards requests to upstreams.
        authenticator: Verifies bearer tokens per the route's policy.
        limits: Token buckets the request spends from.
        metrics: Where requests are counted (a private one when not given).
        readiness: Answers /health/ready: (status, document).
    """

    app = Klein()

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        proxy: Proxy,
        authenticator: Authenticator,
        limits: RateLimits,
        metrics: Metrics | None = None,
        readiness: Callable[[], tuple[int, dict[str, Any]]] | None = None,
        cache: SharedCache | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.proxy = proxy
        self.authenticator = authenticator
        self.limits = limits
        self.cache = cache
        self.cors = CorsPolicy(settings.cors_origins)
        self.metrics = metrics if metrics is not None else Metrics()
        # The drain service answers readiness; without one (a bare
        # Gateway in a test) the gateway is ready while it serves.
        self.readiness = readiness or (lambda: (200, {"status": "ready", "upstreams": {}}))
        self.docs_ui = SwaggerUIResource(spec_url="/api/docs", base_path="/api/docs/ui")
        self.composer = Composer(settings, reactor, proxy, self.metrics, upstream_path)
        self._local = {
            "health": self._health,
            "health_ready": self._health_ready,
            "user_me": self._user_me,
            "docs": self._docs,
            "docs_ui": self._docs_ui,
            "metrics": self._metrics,
            "admin_cache": self._admin_cache,
        }

    def resource(self) -> IResource:
        """The root resource to serve: the edge wrapped around the routes."""
        routed = DirectRoutes(ROUTE_INDEX, self.dispatch, self.answer_failure, self.app.resource())
        return EdgeResource(routed, self.reactor, self.cors)

    async def dispatch(self, route: Route, request: GatewayRequest, params: dict[str, str]) -> Any:
        """Run one matched route: answered here, or forwarded upstream."""
        request.route = route.template
        identity = await self._admit(route, request)
        if route.composed:
            # Backend for Frontend: the parts are called in parallel,
            # each as a forwarded call of its own row would be.
            return await self.composer.compose(
                route, request, params,
                lambda part_row: self.upstream_headers(request, part_row, identity),
            )
        if route.service is None:
            return self._local[route.name](request, identity)
        url = self.upstream_url(route, request.uri, params)
        headers = self.upstream_headers(request, route, identity)
        timeout = self.settings.upstream_timeout(route.service.name)
        if self.cache is not None and request.method in ANSWERED_METHODS:
            await self.cache.forward(request, route, url, headers, timeout)
            return None
        relayed = await self.proxy.forward(
            request, route.service, url, headers, timeout, request.note_upstream
        )
        await request.relay_ended(relayed.ending)
        return None

    async def _admit(self, route: Route, request: GatewayRequest) -> Identity | None:
        """Identify the caller, and spend the request's rate-limit token.

        A request with a verified identity spends from its user's budget,
        any other from its address's, a 401 included. Every token
        verification the cache cannot answer is charged to the address
        first: a client rotating bogus tokens meets 429 after its budget's
        worth of verifications, as it would without a token (nginx's
        limit_req runs before auth_request for the same reason).
        """
        address_spent = False

        async def spend_address() -> None:
            nonlocal address_spent
            address_spent = True
            await self._spend(route, request, None)

        try:
            identity = await self.authenticator.identify(request, route, spend_address)
        except Unauthorized:
            if not address_spent:
                await self._spend(route, request, None)
            raise
        if identity is not None:
            request.log_fields["user_id"] = identity.user_id
            await self._spend(route, request, identity)
        elif not address_spent:
            await self._spend(route, request, None)
        return identity

    async def _spend(self, route: Route, request: GatewayRequest, identity: Identity | None) -> None:
        """Spend one token of the user's budget, or of the address's without one."""
        try:
            decision = await self.limits.check(route, request.client_address, identity)
        except RateLimited:
            self.metrics.rate_limited(route.group)
            raise
        if decision is not None:
            set_rate_limit_fields(request, decision)

    def upstream_headers(
        self, request: GatewayRequest | HeadRequest, route: Route, identity: Identity | None
    ) -> list[Header]:
        """The header fields of one upstream request made for ``request``.

        Built afresh per upstream call: each gets its own trace span id.
        """
        peer = getattr(request.getClientAddress(), "host", "-")
        trusted_peer = is_trusted_peer(peer, self.settings.trusted_proxies)
        added = self._forwarding_fields(request, peer, trusted_peer)
        if identity is not None:
            added += [
                (b"X-User-ID", identity.user_id.encode("utf-8")),
                (b"X-User-Email", identity.email.encode("utf-8")),
            ]
        return upstream_request_headers(
            request.requestHeaders,
            pass_authorization=route.pass_authorization,
            trusted_peer=trusted_peer,
            added=added,
        )

    def upstream_url(self, route: Route, target: bytes, params: dict[str, str]) -> str:
        """The URL a request for ``target`` is forwarded to, with its query.

        Raises:
            BadRequest: a path parameter that could climb or split the upstream path.
        """
        url = self.settings.upstream_url(route.service.name) + upstream_path(route, params)
        _, question, query = target.partition(b"?")
        if question and query:
            url += "?" + query.decode("ascii")
        return url

    def asked_origin(self, request: GatewayRequest | HeadRequest) -> bytes:
        """``scheme://host`` as X-Forwarded-Proto and X-Forwarded-Host tell the upstream.

        What `deltagw.cache.keys.asked_origin` reads back from `upstream_headers`,
        without making the other fields.
        """
        peer = getattr(request.getClientAddress(), "host", "-")
        proto, host = _asked_origin(
            request,
            b"https" if request.isSecure() else b"http",
            request.getHeader(b"host") or b"",
            is_trusted_peer(peer, self.settings.trusted_proxies),
        )
        return proto + b"://" + host

    def _forwarding_fields(
        self, request: GatewayRequest | HeadRequest, peer: str, believed: bool
    ) -> list[tuple[bytes, bytes]]:
        """X-Forwarded-*, Forwarded (RFC 7239), the request id and trace context.

        A trusted proxy's own forwarding fields are continued (a host only
        if it is a valid one); anyone else's are replaced by what the gateway
        saw itself. The Host seen was checked with the request head.
        """
        headers = request.requestHeaders
        seen_proto = b"https" if request.isSecure() else b"http"
        seen_host = request.getHeader(b"host") or b""
        proto, host = _asked_origin(request, seen_proto, seen_host, believed)
        this_hop = forwarded_element(peer, seen_proto, seen_host)
        fields = [
            (
                b"X-Forwarded-For",
                chained(headers.getRawHeaders(b"x-forwarded-for", []), peer.encode(), believed),
            ),
            (b"X-Forwarded-Proto", proto),
            (b"X-Forwarded-Host", host),
            (b"Forwarded", chained(headers.getRawHeaders(b"forwarded", []), this_hop, believed)),
            (b"X-Request-ID", request.request_id),
            (b"traceparent", request.trace.traceparent()),
        ]
        fields.extend((b"tracestate", value) for value in request.trace.tracestate)
        return fields

    def _health(self, request: GatewayRequest, identity: Identity | None) -> bytes:
        return json_response(request, {
            "status": "healthy", "service": self.settings.service_name, "version": __version__,
        })

    def _health_ready(self, request: GatewayRequest, identity: Identity | None) -> bytes:
        status, document = self.readiness()
        request.setResponseCode(status)
        return json_response(request, document)

    def _user_me(self, request: GatewayRequest, identity: Identity) -> bytes:
        return json_response(request, {"user_id": identity.user_id, "email": identity.email})

    def _docs(self, request: GatewayRequest, identity: Identity | None) -> bytes:
        document = openapi_document(
            ROUTES,
            self.settings.require_auth,
            server_url(
                self.settings.public_url, request.isSecure(), request.getHeader(b"host"),
                _authority(request.getHost()),
            ),
        )
        return json_response(request, document)

    def _docs_ui(self, request: GatewayRequest, identity: Identity | None) -> IResource:
        # A branch route: Klein has put /api/docs/ui in prepath and the rest
        # (an asset name, or nothing for the page) in postpath.
        return self.docs_ui

    def _metrics(self, request: GatewayRequest, identity: Identity | None) -> bytes:
        if not client_allowed(request.client_address, self.settings.metrics_allow):
            raise NotFound()
        body, content_type = self.metrics.render()
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    def _admin_cache(self, request: GatewayRequest, identity: Identity | None) -> bytes:
        """Forget stored answers: all of them, or those of the public ``path`` asked for."""
        if not client_allowed(request.client_address, self.settings.admin_allow):
            raise NotFound()
        paths = request.args.get(b"path")
        if paths is not None and len(paths) != 1:
            raise BadRequest("Give at most one path to purge")
        target, prefix = (None, False) if paths is None else self._stored_url(paths[0])
        purged = 0 if self.cache is None else self.cache.purge(target, prefix)
        _log.msg("cache_purged", path=None if paths is None else paths[0].decode("latin-1"),
                 purged=purged)
        request.setHeader(b"Cache-Control", b"no-store")
        return json_response(request, {"purged": purged})

    def _stored_url(self, path: bytes) -> tuple[bytes, bool]:
        """The upstream URL a public path is stored under, and whether it ends in ``*``.

        Raises:
            NotFound: the path names no forwarded GET route, so nothing
                can be stored under it.
        """
        prefix = path.endswith(b"*")
        public, question, query = path.removesuffix(b"*").partition(b"?")
        found = ROUTE_INDEX.match(b"GET", public) if path.isascii() else None
        if found is None or found[0].service is None:
            raise NotFound("The path names no cached route")
        route, params = found
        url = self.upstream_url(route, public + b"?" + query if query else public, params)
        if question and prefix and not query:
            url += "?"
        return url.encode("ascii"), prefix

    def preflight(self, request: GatewayRequest, template: str, methods: list[str]) -> bytes:
        """Answer OPTIONS (a CORS preflight) without contacting an upstream."""
        # The template, never the raw path: it is the metrics' route label.
        request.route = template
        return self.cors.preflight(request, methods)

    def answer_failure(self, request: GatewayRequest, failure: Failure) -> bytes:
        """The JSON error answer for a failed handler: its own, or a 500 for a bug."""
        if failure.check(GatewayError):
            return self._gateway_error(request, failure)
        return self._bug(request, failure)

    @app.handle_errors(GatewayError)
    def _gateway_error(self, request: GatewayRequest, failure: Failure) -> bytes:
        request.outcome = request.outcome or failure.value.outcome
        return write_error(request, failure.value)

    @app.handle_errors(WerkzeugNotFound)
    def _not_found(self, request: GatewayRequest, failure: Failure) -> bytes:
        request.outcome = "not_found"
        return write_error(request, NotFound())

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def _method_not_allowed(self, request: GatewayRequest, failure: Failure) -> bytes:
        request.outcome = "method_not_allowed"
        return write_error(request, MethodNotAllowed(failure.value.valid_methods or ()))

    @app.handle_errors(Exception)
    def _bug(self, request: GatewayRequest, failure: Failure) -> bytes:
        _log.err("unhandled_error", _stuff=failure, request_id=request.request_id.decode("ascii"))
        request.outcome = "internal_error"
        return write_error(request, GatewayError())


def _authority(address: Any) -> str:
    """``host:port`` of a listening address, an IPv6 host in brackets."""
    host = getattr(address, "host", "")
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{getattr(address, 'port', '')}"


def _route_handler(route: Route) -> Any:
    def handle(self: Gateway, request: GatewayRequest, **params: str) -> Any:
        return self.dispatch(route, request, params)

    return handle


def _preflight_handler(template: str, methods: list[str]) -> Any:
    def handle(self: Gateway, request: GatewayRequest, **params: str) -> bytes:
        return self.preflight(request, template, methods)

    return handle


def _register_routes() -> dict[str, Route]:
    """Add every row's routes to Klein; return the rows by Klein endpoint."""
    methods_by_path: dict[str, list[str]] = defaultdict(list)
    endpoints = {}
    for route in ROUTES:
        for path in route.public_paths:
            endpoint = f"{route.name} {path}"
            Gateway.app.route(
                klein_path(path), methods=[route.method], endpoint=endpoint, branch=route.subtree,
            )(_route_handler(route))
            endpoints[endpoint] = route
            methods_by_path[path].append(route.method)
    for path, methods in methods_by_path.items():
        Gateway.app.route(
            klein_path(path), methods=["OPTIONS"], endpoint=f"preflight {path}"
        )(_preflight_handler(path, methods))
    return endpoints


ROUTE_INDEX = RouteIndex.from_url_map(Gateway.app.url_map, _register_routes())
"""The fast path's index, read from Klein's URL map once every route is in it."""
