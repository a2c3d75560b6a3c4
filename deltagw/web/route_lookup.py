"""A fast path in front of Klein for the requests that name a route exactly.

Klein's werkzeug matching, adapters and Deferred wrapping are a large share
of the CPU of a proxied request (``make bench``). The index here is read
from Klein's own URL map, so the routes are described once: a request it
names goes straight to the gateway's dispatch, everything else (escapes,
subtrees, OPTIONS, misses) to Klein, whose answers are the reference.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.routing import Map

from deltagw.logs import get_logger
from deltagw.routes import Route
from deltagw.web.site import GatewayRequest

_log = get_logger(component="app")

_PARAMETER = re.compile(r"<(?:(\w+):)?(\w+)>")
"""A werkzeug rule's parameter: ``<name>`` or ``<converter:name>``."""


class RouteIndex:
    """The table's rows by public path: one dict lookup, or one regex a row."""

    def __init__(self) -> None:
        self._exact: dict[tuple[bytes, bytes], Route] = {}
        self._templated: list[tuple[bytes, re.Pattern[bytes], Route]] = []

    @classmethod
    def from_url_map(cls, url_map: Map, routes: Mapping[str, Route]) -> RouteIndex:
        """Index the rules of ``url_map`` whose endpoint names a row of ``routes``.

        Rules of other endpoints (preflights, subtree branches) and rules with
        a converter (``<path:...>`` spans segments) stay Klein's.
        """
        index = cls()
        for rule in url_map.iter_rules():
            route = routes.get(rule.endpoint)
            if route is None or route.subtree:
                continue
            if any(converter for converter, _ in _PARAMETER.findall(rule.rule)):
                continue
            index._add(route.method.encode("ascii"), rule.rule, route)
        return index

    def _add(self, method: bytes, rule: str, route: Route) -> None:
        if "<" in rule:
            self._templated.append((method, _path_pattern(rule), route))
        else:
            self._exact[method, rule.encode("ascii")] = route

    def match(self, method: bytes, path: bytes) -> tuple[Route, dict[str, str]] | None:
        """The row and path parameters for a request, or None to ask Klein."""
        if b"%" in path:
            return None
        if method == b"HEAD":
            method = b"GET"  # as werkzeug does: a GET row answers HEAD too
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for row_method, pattern, route in self._templated:
            if row_method == method:
                found = pattern.match(path)
                if found is not None:
                    params = {k: v.decode("ascii") for k, v in found.groupdict().items()}
                    return route, params
        return None


def _path_pattern(rule: str) -> re.Pattern[bytes]:
    """``/data/chain/<product>`` as a regex: each parameter one non-empty segment."""
    pieces = _PARAMETER.split(rule)  # literal, converter, name, literal, ...
    regex = "".join(
        re.escape(piece) if i % 3 == 0 else f"(?P<{piece}>[^/]+)" if i % 3 == 2 else ""
        for i, piece in enumerate(pieces)
        if piece is not None
    )
    return re.compile(regex.encode("ascii") + rb"\Z")


Dispatch = Callable[[Route, GatewayRequest, dict[str, str]], Awaitable[Any]]
"""Runs a matched row: ``dispatch(route, request, params)``."""

AnswerFailure = Callable[[GatewayRequest, Failure], bytes]
"""The error answer Klein's error handlers would give for a failure."""


class DirectRoutes(Resource):
    """Runs the rows the index names without Klein's per-request machinery.

    Klein's contract is kept: the handler is cancelled when the client goes
    away, and its errors get the answers Klein's error handlers give.
    """

    isLeaf = True

    def __init__(
        self, index: RouteIndex, dispatch: Dispatch, answer_failure: AnswerFailure,
        klein: IResource,
    ) -> None:
        super().__init__()
        self._index = index
        self._dispatch = dispatch
        self._answer_failure = answer_failure
        self._klein = klein

    def render(self, request: GatewayRequest) -> Any:  # type: ignore[override]
        found = self._index.match(request.method, request.path)
        if found is None:
            return self._klein.render(request)
        route, params = found
        d = defer.ensureDeferred(self._dispatch(route, request, params))
        # Once answered, cancelling the handler does nothing: this only
        # stops a handler whose client has gone.
        request.when_ended(d.cancel)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: GatewayRequest) -> None:
        if request.ended:
            if not failure.check(defer.CancelledError):
                _log.err("unhandled_error", _stuff=failure,
                         request_id=request.request_id.decode("ascii"))
            return
        self._answer(self._answer_failure(request, failure), request)

    @staticmethod
    def _answer(body: bytes | None, request: GatewayRequest) -> None:
        if request.ended:
            return
        if body:
            request.write(body)
        request.finish()
