"""The edge: what every request passes before routing.

Trace context, CORS and the check that must hold before any route code
runs: a URL the gateway can read. The request id and the client address
are set with the head (`deltagw.web.site.GatewayRequest`); the body limit and
the framing are checked earlier still, by ``deltagw.web.request_framing``.
Rejections here are JSON like every other gateway answer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.web.resource import IResource, Resource

from deltagw.errors import BadRequest, GatewayError, write_error
from deltagw.logs import LineLogger, is_written
from deltagw.speedups import held_writes
from deltagw.web.cors import CorsPolicy
from deltagw.web.request_identity import trace_context
from deltagw.web.site import GatewayRequest

if TYPE_CHECKING:
    from deltagw.web.head_request import HeadRequest

_log = LineLogger(component="access")

# Printable ASCII without space; anything else in a request target is not a URL.
_URL_CHARS = re.compile(rb"[\x21-\x7e]*\Z")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _unquote(raw: bytes) -> bytes:
    return _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def check_target(uri: bytes) -> None:
    """Reject a request target the gateway cannot forward faithfully.

    Raises:
        BadRequest: raw non-ASCII or control bytes, broken percent-encoding,
            or a path or query that does not decode to UTF-8 text.
    """
    if not _URL_CHARS.match(uri):
        raise BadRequest("Invalid characters in URL")
    if b"%" not in uri:
        # Printable ASCII with nothing escaped: already valid UTF-8 text,
        # with no control character to find.
        return
    path, _, query = uri.partition(b"?")
    if _BAD_PERCENT.search(uri):
        raise BadRequest("Invalid percent-encoding in URL")
    try:
        decoded_path = _unquote(path).decode("utf-8")
        _unquote(query.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("URL is not valid UTF-8") from None
    if _CONTROL.search(decoded_path):
        raise BadRequest("Control characters in URL path")


def continue_trace(request: GatewayRequest | HeadRequest) -> None:
    """Set the trace context the request continues (or starts), for the upstream and the log."""
    request.trace = trace_context(
        request.requestHeaders.getRawHeaders(b"traceparent", []),
        request.requestHeaders.getRawHeaders(b"tracestate", []),
    )
    request.log_fields["trace_id"] = request.trace.trace_id.decode("ascii")


def start_answer(request: GatewayRequest | HeadRequest, reactor: Any, cors: CorsPolicy) -> None:
    """What every answer begins with: its request id, CORS, and under LOG_LEVEL=debug
    an ``incoming_request`` line.

    Both ways a request is answered begin here: through twisted.web
    (`EdgeResource`) and at its head (`deltagw.web.early_hits`). A request's
    one line at info is its access log line, written when it is answered,
    as nginx, Envoy and HAProxy log; the line at its start is for finding a
    request that never finished, and costs as much again as the access line.
    """
    request.setHeader(b"X-Request-ID", request.request_id)
    if is_written("debug"):
        held_writes.after_sending(
            reactor,
            _log.msg,
            "incoming_request",
            level="debug",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            request_id=request.request_id.decode("ascii"),
            client=request.client_address,
            trace_id=request.log_fields["trace_id"],
        )
    cors.apply(request)


class EdgeResource(Resource):
    """Wraps the Klein resource with the gateway's per-request edge work."""

    isLeaf = True

    def __init__(
        self, routed: IResource, reactor: Any, cors: CorsPolicy
    ) -> None:
        super().__init__()
        self._routed = routed
        self._reactor = reactor
        self._cors = cors

    def render(self, request: GatewayRequest) -> Any:  # type: ignore[override]
        continue_trace(request)
        start_answer(request, self._reactor, self._cors)
        try:
            check_target(request.uri)
        except GatewayError as e:
            request.outcome = e.outcome
            return write_error(request, e)
        return self._routed.render(request)
