"""A request as its head was read, for the answers given before twisted.web sees it.

It has the attributes and methods of `deltagw.web.site.GatewayRequest`
that the edge, the gateway's upstream fields and the cache read and write,
set the way that request sets them, so the same functions fill in both
(`deltagw.web.early_hits`).
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

from deltagw.web.request_identity import TraceContext, client_address, request_id
from deltagw.web.response_fields import ResponseFields


class HeadRequest:
    """An HTTP/1.1 GET or HEAD without a body, read by the framer.

    Args:
        channel: The connection it arrived on.
        method: ``GET`` or ``HEAD``.
        target: Its request target, in origin form.
        fields: Its field lines, as the framer read them.
        started: ``reactor.seconds()`` when its head had arrived.
        trusted_proxies: TRUSTED_PROXIES, to tell who the client is.
    """

    clientproto = b"HTTP/1.1"

    def __init__(
        self,
        channel: Any,
        method: bytes,
        target: bytes,
        fields: list[tuple[bytes, bytes]],
        started: float,
        trusted_proxies: Any,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = target
        self.path = target.split(b"?", 1)[0]
        self.started = started
        headers = Headers()
        for name, value in fields:
            headers.addRawHeader(name, value)
        self.requestHeaders = headers
        self.responseHeaders = ResponseFields()
        self.code = 200
        self.code_message = b"OK"
        self.route: str | None = None
        self.outcome: str | None = None
        self.trace: TraceContext | None = None
        self.log_fields: dict[str, Any] = {}
        self.body: list[bytes] = []
        self._peer = channel.getPeer()
        self.request_id = request_id(self.getHeader(b"x-request-id"))
        self.client_address = client_address(
            getattr(self._peer, "host", "-"),
            headers.getRawHeaders(b"x-forwarded-for", []),
            trusted_proxies,
        )

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 (twisted.web's name)
        values = self.requestHeaders.getRawHeaders(name)
        return None if values is None else values[-1]

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        self.responseHeaders.setRawHeaders(name, [value])

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:  # noqa: N802
        self.code = code
        self.code_message = message if message is not None else RESPONSES.get(code, b"Unknown Status")

    def write(self, data: bytes) -> None:
        self.body.append(data)

    def getClientAddress(self) -> Any:  # noqa: N802
        return self._peer

    def isSecure(self) -> bool:  # noqa: N802
        return bool(self.channel.isSecure())

    def rendered(self) -> list[bytes]:
        """The whole response: status line, fields and content."""
        return self.responseHeaders.head(self.clientproto, self.code, self.code_message) + self.body
