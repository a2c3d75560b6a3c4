"""A request as its head was read, for the answers given before twisted.web sees it.

It has the attributes and methods of `deltagw.web.site.GatewayRequest`
that the edge, the gateway's upstream fields and the cache read and write,
set the way that request sets them, so the same functions fill in both
(`deltagw.web.early_hits`). Most requests offered turn out not to be
hits, so what only an answer needs (the request fields read as a
`Headers` reads them, `RequestFields`; the request id; the client
address) is made when first read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from twisted.web.http import RESPONSES

from deltagw.web.request_identity import TraceContext, client_address, request_id
from deltagw.web.response_fields import ResponseFields, canonical_name

_T = TypeVar("_T")


class RequestFields:
    """The reading half of twisted.web's `Headers`, over the fields the framer read.

    Lines are kept under twisted.web's spelling of their name
    (`canonical_name`), in the order each name first appeared, as a
    `Headers` filled by ``addRawHeader`` keeps them, without its
    per-field encoding and checks: the framer has checked the names and
    values already. Only reads are offered: nothing changes a request's fields.
    """

    __slots__ = ("_lines",)

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        lines: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            spelled = canonical_name(name)
            found = lines.get(spelled)
            if found is None:
                lines[spelled] = [value]
            else:
                found.append(value)
        self._lines = lines

    def getRawHeaders(  # noqa: N802
        self, name: bytes, default: _T | None = None
    ) -> list[bytes] | _T | None:
        return self._lines.get(canonical_name(name), default)

    def hasHeader(self, name: bytes) -> bool:  # noqa: N802
        return canonical_name(name) in self._lines

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:  # noqa: N802
        return iter(self._lines.items())


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
        self.responseHeaders = ResponseFields()
        self.code = 200
        self.code_message = b"OK"
        self.route: str | None = None
        self.outcome: str | None = None
        self.trace: TraceContext | None = None
        self.log_fields: dict[str, Any] = {}
        self.body: list[bytes] = []
        self._fields = fields
        self._trusted_proxies = trusted_proxies
        self._peer = channel.getPeer()
        self._headers: RequestFields | None = None
        self._request_id: bytes | None = None
        self._client_address: str | None = None

    @property
    def requestHeaders(self) -> RequestFields:  # noqa: N802 (twisted.web's name)
        # Properties rather than functools.cached_property, which takes a
        # lock on Python 3.11.
        headers = self._headers
        if headers is None:
            headers = self._headers = RequestFields(self._fields)
        return headers

    @property
    def request_id(self) -> bytes:
        made = self._request_id
        if made is None:
            made = self._request_id = request_id(self.getHeader(b"x-request-id"))
        return made

    @property
    def client_address(self) -> str:
        found = self._client_address
        if found is None:
            found = self._client_address = client_address(
                getattr(self._peer, "host", "-"),
                self.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
                self._trusted_proxies,
            )
        return found

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        """The value of the last field line named ``name``, as twisted.web's ``getHeader``."""
        wanted = name.lower()
        found = None
        for field_name, value in self._fields:
            if field_name.lower() == wanted:
                found = value
        return found

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
