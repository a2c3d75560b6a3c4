"""CORS belongs to the gateway: browsers see one origin policy, not three.

Preflights are answered here without contacting an upstream, and any
Access-Control-* field an upstream sends is dropped (``deltagw.upstream.forwarding``).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.iweb import IRequest

PREFLIGHT_MAX_AGE = b"600"
ALLOWED_HEADERS = b"Authorization, Content-Type, X-Request-ID, traceparent, tracestate"
EXPOSED_HEADERS = b"X-Request-ID, Retry-After"


class CorsPolicy:
    """Which origins may read the gateway's responses (CORS_ORIGINS)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = origins == ("*",)
        self._origins = frozenset(o.encode("ascii", "replace") for o in origins)

    def apply(self, request: IRequest) -> None:
        """Set Access-Control-Allow-Origin (and Vary) for an ordinary response."""
        if self._any:
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
        else:
            request.setHeader(b"Vary", b"Origin")
            origin = request.getHeader(b"origin")
            if origin is None or origin not in self._origins:
                return
            request.setHeader(b"Access-Control-Allow-Origin", origin)
        request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)

    def preflight(self, request: IRequest, methods: Iterable[str]) -> bytes:
        """Answer an OPTIONS request for a path that serves ``methods``."""
        allowed = ", ".join(sorted(set(methods) | {"OPTIONS"})).encode("ascii")
        request.setResponseCode(204)
        request.setHeader(b"Allow", allowed)
        request.setHeader(b"Access-Control-Allow-Methods", allowed)
        request.setHeader(b"Access-Control-Allow-Headers", ALLOWED_HEADERS)
        request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
        return b""
