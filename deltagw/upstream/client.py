"""A lean HTTP/1.1 client and connection pool for calls to the upstreams.

twisted.web's ``Agent`` builds, for every request, a Request and a Response
object, a line-by-line parser state machine, two header objects and a chain
of half a dozen Deferreds; profiled under load (``make bench``) that was a
large share of the gateway's CPU per proxied request. A forward needs much
less: one write of the request head with its buffered body, one parse of the
response head, and the body passed on as it arrives.

What the proxy's policies (retries, breakers, outcome names) need is kept
in the client's own failure types: `NoResponse` before any response byte,
`ResponseBroken` after, `InvalidResponse` for an answer that is not valid
HTTP/1.1; the subset of ``IResponse`` the body relays read (``code``,
``phrase``, ``length``, ``deliverBody`` ending in ``ResponseDone`` or
``PotentialDataLoss``); and a persistent pool that never retries by itself.
Body framing follows RFC 9112 §6.3; the fields the ``Connection`` header
names are dropped with it (RFC 9110 §7.6.1).

The parser is stricter than twisted.web's client, on purpose: a proxy that
reads an ambiguous answer one way passes on bytes its client may read
another. Field names are tokens; a value holds no control character but
HTAB (RFC 9110 §5.5); the status line is ``HTTP/1.1`` or ``HTTP/1.0`` and a
code from 100 to 599; a head has at most `MAX_FIELDS` fields;
Content-Length is digits within 2^63-1, repeated only with one value (RFC
9110 §8.6), and Transfer-Encoding wins over it (RFC 9112 §6.3), the
connection then closed; Transfer-Encoding is ``chunked`` alone, as
nginx also requires of an upstream (any other coding would reach the
client undeclared once the field is dropped); chunk sizes are 1 to 16 hex
digits; interim (1xx) answers are bounded in number, and a 101 nobody asked
for is invalid. Every violation fails the call with `InvalidResponse` and
drops the connection: nothing of the answer is passed on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from deltagw.http_syntax import has_bare_cr, has_controls, is_token
from deltagw.speedups import held_writes
from deltagw.upstream.forwarding import HOP_BY_HOP, connection_named

Header = tuple[bytes, bytes]

MAX_HEAD_BYTES = 64 * 1024
"""Largest response head (status line and fields) accepted from an upstream."""

MAX_INTERIM_RESPONSES = 8
"""Interim (1xx) answers skipped before a request's final one; past this the
upstream is talking without end, and the answer is invalid."""

MAX_FIELDS = 100
"""Most field lines in a response head (Envoy's default limit)."""

MAX_CONTENT_LENGTH = 2**63 - 1
"""The largest Content-Length taken: what a signed 64-bit length can hold."""


class InvalidResponse(Exception):
    """The upstream's answer is not valid HTTP/1.1 (RFC 9110, RFC 9112)."""


class _ConnectionFailure(Exception):
    """A call's connection failed; ``reasons`` holds why, as Failures."""

    def __init__(self, reasons: list[Failure]) -> None:
        super().__init__(reasons)
        self.reasons = reasons


class NoResponse(_ConnectionFailure):
    """The connection ended before any byte of an answer arrived.

    The upstream may never have seen the request: a safe method can be
    tried again (``deltagw.upstream.retry``).
    """


class ResponseBroken(_ConnectionFailure):
    """The connection failed after the answer had begun."""


_MAX_CHUNK_LINE = 4096
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAKS = re.compile(rb"[\r\n]+")
_BLANK_LINE = re.compile(rb"\n\r?\n")
"""An empty line after a bare LF: a head may end there before any CRLF CRLF."""
_FOLD = re.compile(rb"\n[ \t]")
"""A line that continues the one before it (obs-fold)."""
_WHITESPACE = b" \t"
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
NO_BODY_CODES = frozenset({204, 304})
"""Statuses whose responses never have a body (RFC 9110 §15.3.5, §15.4.5)."""
_CONNECTION_DONE = Failure(ConnectionDone())
_CONNECTION_CONTROL = HOP_BY_HOP | {b"content-length"}
"""What stays out of ``response.headers``, as Twisted's client also keeps it out:
the framing and the hop-by-hop fields (for HEAD and 304, Content-Length
describes the representation and is kept)."""

_CONNECTION_TOKENS = _CONNECTION_CONTROL | {b"close"}
"""Connection options that name no end-to-end field (nginx's ``keep-alive``)."""

_IDLE, _HEAD, _BODY, _CLOSED = range(4)
_BY_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)


@implementer(IPushProducer)
class UpstreamResponse:
    """An upstream's response head; the body follows through `deliverBody`.

    While its body is read, the response is its protocol's transport:
    pausing, resuming or stopping it acts on the connection's socket.

    Attributes:
        code: The status code.
        phrase: The reason phrase.
        headers: The end-to-end fields as ``(name, value)`` pairs, in the
            order received, with names as the upstream spelled them.
        length: The body's length when known, else ``UNKNOWN_LENGTH``.
    """

    __slots__ = ("code", "phrase", "headers", "length", "_connection", "_protocol", "_pending",
                 "_ended", "_finished")

    def __init__(
        self, code: int, phrase: bytes, headers: list[Header], length: Any, connection: Any
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: _Connection | None = connection
        self._protocol: Protocol | None = None
        self._pending: list[bytes] = []
        self._ended: Failure | None = None
        self._finished = False

    def deliverBody(self, protocol: Protocol) -> None:
        """Send the body to ``protocol``, which may pause, resume or stop it.

        ``protocol.connectionLost`` gets ``ResponseDone`` after a complete
        body, ``PotentialDataLoss`` when a body without a length ended with
        the connection, and `ResponseBroken` or `InvalidResponse` otherwise. Bytes that arrived
        before are handed over first.
        """
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        pending, self._pending = self._pending, []
        for data in pending:
            if self._protocol is not protocol:
                return
            protocol.dataReceived(data)
        if self._finished and self._protocol is protocol:
            ended, self._ended = self._ended or Failure(ResponseDone()), None
            self._protocol = None
            protocol.connectionLost(ended)

    def complete_body(self) -> bytes | None:
        """The whole body, if it has already arrived complete; else None.

        Once taken, the body is not delivered again (``deliverBody`` would
        deliver nothing).
        """
        if self._protocol is not None or not self._finished or self._ended is not None:
            return None
        pending, self._pending = self._pending, []
        return b"".join(pending)

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._pending.append(data)

    def _end(self, reason: Failure | None) -> None:
        """The body has ended: complete (None), or for ``reason``.

        The ``ResponseDone`` failure of a complete body is only made for a
        protocol that will read it, not for a body taken by `complete_body`.
        """
        self._connection = None
        self._finished = True
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.connectionLost(reason or Failure(ResponseDone()))
        else:
            self._ended = reason

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def stopProducing(self) -> None:
        """The body's reader gave up: close the connection mid-body."""
        if self._connection is not None:
            self._connection.abort_body()


def _parse_content_length(values: list[bytes]) -> int:
    """One length from Content-Length field lines; repeats must agree (RFC 9110 §8.6).

    Raises:
        InvalidResponse: differing values, anything but digits, or a length
            over `MAX_CONTENT_LENGTH`.
    """
    if len(values) == 1 and b"," not in values[0]:
        text = values[0]
        if len(text) < 19 and text.isdigit():
            return int(text)  # the usual one: 18 digits are always within 2^63-1
    else:
        lengths = {v.strip() for value in values for v in value.split(b",")}
        if len(lengths) != 1:
            raise InvalidResponse(f"conflicting Content-Length {b', '.join(values)!r}")
        (text,) = lengths
    # bytes.isdigit() is ASCII only; the length check keeps int() cheap.
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_CONTENT_LENGTH:
        raise InvalidResponse(f"invalid Content-Length {text[:40]!r}")
    return int(text)


def _is_trailer_field(line: bytes) -> bool:
    """Whether a trailer line is a field as a head's would be (RFC 9112 §7.1.2).

    The gateway drops trailers, but one that is not a field means the
    chunked framing is not what it seemed, so the body cannot be trusted.
    """
    name, colon, _ = line.partition(b":")
    return bool(colon) and is_token(name) and not has_controls(line) and not has_bare_cr(line)


def _head_lines(head: bytes) -> list[bytes]:
    """The lines of a head: CRLF or bare LF endings, obs-fold joined with a space.

    A proxy replaces obs-fold with a space (RFC 9112 §5.2).
    """
    lines = head.split(b"\r\n")
    if head.count(b"\n") == len(lines) - 1 and _FOLD.search(head) is None:
        return lines  # the common case: every line ends with CRLF, none is folded
    joined: list[bytes] = []
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if len(joined) < 2:
                raise InvalidResponse(f"continuation without a field {line[:80]!r}")
            joined[-1] += b" " + line.strip()
        else:
            joined.append(line)
    return joined


@functools.lru_cache(maxsize=64)
def _named_by(value: bytes) -> frozenset[bytes]:
    """The field names one Connection line lists; an upstream sends the same line each time."""
    return frozenset(connection_named((value,)))


_MAX_LOWER_NAMES = 1024
"""Field names `_lower_name` remembers: an upstream sends the same few in
every answer, and a hostile one must not grow the table without bound."""

_LOWER_NAMES: dict[bytes, bytes] = {}
"""Field names known to be tokens, each with its lower-case spelling."""


def _lower_name(name: bytes) -> bytes:
    """The lower-case spelling of a field name found to be a token, remembered."""
    lower = name.lower()
    if len(_LOWER_NAMES) < _MAX_LOWER_NAMES:
        _LOWER_NAMES[name] = lower
    return lower


def _parse_head(head: bytes, method: bytes) -> tuple[int, bytes, list[Header], int, int, bool]:
    """Status, fields and body framing of one response head.

    Returns:
        ``(code, phrase, headers, framing, length, reusable)``, where
        ``length`` is the Content-Length (or -1) and ``reusable`` says whether
        the connection may carry another request afterwards.

    Raises:
        InvalidResponse: not an HTTP/1.1 or HTTP/1.0 status line, a
            malformed field, or framing that cannot be trusted.
    """
    # No control character but HTAB or a line ending, and no CR that ends no
    # line (RFC 9110 §5.5, RFC 9112 §2.2).
    if has_controls(head) or has_bare_cr(head):
        raise InvalidResponse(f"control character in the response head {head[:80]!r}")
    lines = _head_lines(head)
    status = lines[0]
    parts = status.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in _VERSIONS:
        raise InvalidResponse(f"invalid status line {status[:80]!r}")
    code_text = parts[1]
    if len(code_text) != 3 or not code_text.isdigit() or not b"100" <= code_text < b"600":
        # RFC 9110 §15: a status code is three digits from 100 to 599.
        raise InvalidResponse(f"invalid status code {status[:80]!r}")
    if len(lines) > MAX_FIELDS + 1:
        raise InvalidResponse("too many header fields")
    code = int(code_text)
    phrase = parts[2] if len(parts) == 3 else b""
    reusable = parts[0] == b"HTTP/1.1"

    headers: list[Header] = []
    connection: list[bytes] = []  # the Connection field's lines
    content_length: list[bytes] = []
    transfer_encoding: list[bytes] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        lower = _LOWER_NAMES.get(name)
        if lower is None or not colon:
            if not colon or not is_token(name):
                raise InvalidResponse(f"invalid header line {line[:80]!r}")
            lower = _lower_name(name)
        value = value.strip(_WHITESPACE)
        if lower not in _CONNECTION_CONTROL:
            headers.append((name, value))
        elif lower == b"content-length":
            content_length.append(value)
            if method == b"HEAD" or code == 304:
                # The length of the representation, not of this message's
                # (absent) body: passed on as it is (RFC 9110 §8.6), once
                # checked below.
                headers.append((name, value))
        elif lower == b"connection":
            connection.append(value)
        elif lower == b"transfer-encoding":
            transfer_encoding.append(value)
    if connection:
        named = _named_by(connection[0]) if len(connection) == 1 else connection_named(connection)
        if not named <= _CONNECTION_TOKENS:
            headers = [(n, v) for n, v in headers if n.lower() not in named]
        if b"close" in named:
            reusable = False
        elif b"keep-alive" in named and parts[0] == b"HTTP/1.0":
            reusable = True

    declared = _parse_content_length(content_length) if content_length else -1
    if transfer_encoding:
        if parts[0] == b"HTTP/1.0":
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has
            # faulty framing.
            raise InvalidResponse("Transfer-Encoding in an HTTP/1.0 response")
        if b",".join(transfer_encoding).strip(_WHITESPACE).lower() != b"chunked":
            raise InvalidResponse(f"unsupported Transfer-Encoding {transfer_encoding!r}")
    length = -1
    if method == b"HEAD" or code in NO_BODY_CODES or code < 200:
        framing, length = _BY_LENGTH, 0
    elif transfer_encoding:
        framing = _CHUNKED
        if content_length:
            # Both framings at once (RFC 9112 §6.3 item 3): Transfer-Encoding
            # wins, the Content-Length is not passed on, and the connection
            # is not trusted with another request.
            reusable = False
    elif content_length:
        framing, length = _BY_LENGTH, declared
    else:
        framing, reusable = _UNTIL_CLOSE, False
    return code, phrase, headers, framing, length, reusable


class _Connection(Protocol):
    """One upstream connection, carrying one request at a time."""

    def __init__(self, pool: ConnectionPool, key: Any) -> None:
        self._pool = pool
        self.key = key
        self.idle_since = 0.0
        self._state = _IDLE
        self._method = b""
        self._buffer = b""
        self._got_bytes = False
        self._waiting: defer.Deferred[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._framing = _BY_LENGTH
        self._remaining = 0
        self._reusable = False
        self._paused = False
        self._chunk_state = 0
        self._interim = 0

    def connectionMade(self) -> None:
        held_writes.adopt(self.transport)

    def send(self, method: bytes, head: bytes, body: bytes | None) -> defer.Deferred[UpstreamResponse]:
        """Write one request; the Deferred fires with the response head."""
        self._state = _HEAD
        self._method = method
        self._buffer = b""
        self._got_bytes = False
        self._interim = 0
        self._waiting = d = defer.Deferred(self._cancel)
        self.transport.write(head + body if body else head)
        return d

    def _cancel(self, _: defer.Deferred[UpstreamResponse]) -> None:
        # The caller gave up (a timeout, or its client left): nothing more
        # will be read from this connection; the Deferred fails itself with
        # CancelledError.
        self._waiting = None
        self._state = _CLOSED
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_data(data)
        elif state == _HEAD:
            self._got_bytes = True
            self._buffer += data
            self._head_data()
        elif state == _IDLE:
            # Nothing was asked: an upstream talking out of turn is not
            # trusted with the next request.
            self._state = _CLOSED
            self._pool.discard(self)
            self.transport.loseConnection()

    def _head_data(self) -> None:
        while self._state == _HEAD:
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end >= 0 and _BLANK_LINE.search(buffer, 0, end) is None:
                head, rest = buffer[:end], buffer[end + 4 :]
            else:
                # The earliest blank line, whatever the line endings (a bare-LF
                # head may be followed by a body holding CRLF CRLF).
                match = _HEAD_END.search(buffer)
                if match is None:
                    if len(buffer) > MAX_HEAD_BYTES:
                        self._give_up(InvalidResponse("response head too large"))
                    return
                head, rest = buffer[: match.start()], buffer[match.end() :]
            try:
                code, phrase, headers, framing, length, reusable = _parse_head(
                    head.lstrip(b"\r\n"), self._method
                )
            except InvalidResponse as e:
                self._give_up(e)
                return
            if code < 200:
                self._interim += 1
                if code == 101:
                    self._give_up(InvalidResponse("protocol switch nobody asked for"))
                    return
                if self._interim > MAX_INTERIM_RESPONSES:
                    self._give_up(InvalidResponse("too many interim responses"))
                    return
                # An interim response nobody asked for (RFC 9110 §15.2): skip it.
                self._buffer = rest
                continue
            self._buffer = b""
            self._start_body(code, phrase, headers, framing, length, reusable, rest)

    def _start_body(
        self, code: int, phrase: bytes, headers: list[Header], framing: int, length: int,
        reusable: bool, rest: bytes,
    ) -> None:
        self._state = _BODY
        self._framing = framing
        self._remaining = length
        self._reusable = reusable
        self._chunk_state = 0
        self._response = response = UpstreamResponse(
            code, phrase, headers, length if framing == _BY_LENGTH else UNKNOWN_LENGTH, self
        )
        waiting, self._waiting = self._waiting, None
        assert waiting is not None
        # The whole body may already be here: read it before handing the
        # response over, so the connection is back in the pool first.
        if framing == _BY_LENGTH and length == 0:
            self._end_body(rest)
        elif rest:
            self._body_data(rest)
        invalid = response._ended
        if invalid is not None and invalid.check(InvalidResponse):
            # Broken framing seen before anything was passed on: the whole
            # answer is invalid, not just its body.
            waiting.errback(invalid)
        else:
            waiting.callback(response)

    def _body_data(self, data: bytes) -> None:
        framing = self._framing
        if framing == _BY_LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._response._data(data)  # type: ignore[union-attr]
                return
            self._remaining = 0
            self._response._data(data[:remaining])  # type: ignore[union-attr]
            if self._state == _BODY:  # the reader may have stopped it
                self._end_body(data[remaining:])
        elif framing == _CHUNKED:
            self._buffer += data
            self._chunked_data()
        else:
            self._response._data(data)  # type: ignore[union-attr]

    def _chunked_data(self) -> None:
        """Decode chunked framing (RFC 9112 §7.1); trailer fields are dropped."""
        while self._state == _BODY:
            buffer = self._buffer
            if self._chunk_state == 0:  # the chunk-size line
                line, found, rest = buffer.partition(b"\n")
                if not found:
                    if len(buffer) > _MAX_CHUNK_LINE:
                        self._fail_body(InvalidResponse("chunk size line too long"))
                    return
                size_text = line.rstrip(b"\r").split(b";", 1)[0].rstrip(_WHITESPACE)
                if not _HEX.match(size_text):
                    self._fail_body(InvalidResponse(f"invalid chunk size {line[:80]!r}"))
                    return
                size = int(size_text, 16)
                self._buffer = rest
                self._remaining = size
                self._chunk_state = 1 if size else 3
            elif self._chunk_state == 1:  # chunk data
                if not buffer:
                    return
                piece = buffer[: self._remaining]
                self._buffer = buffer[len(piece) :]
                self._remaining -= len(piece)
                self._chunk_state = 1 if self._remaining else 2
                self._response._data(piece)  # type: ignore[union-attr]
            elif self._chunk_state == 2:  # CRLF after the data
                if buffer.startswith(b"\r\n"):
                    self._buffer = buffer[2:]
                elif buffer.startswith(b"\n"):
                    self._buffer = buffer[1:]
                elif buffer in (b"", b"\r"):
                    return
                else:
                    self._fail_body(InvalidResponse("chunk not followed by CRLF"))
                    return
                self._chunk_state = 0
            else:  # trailer section, ended by an empty line
                line, found, rest = buffer.partition(b"\n")
                if not found:
                    if len(buffer) > MAX_HEAD_BYTES:
                        self._fail_body(InvalidResponse("trailer section too large"))
                    return
                self._buffer = rest
                field = line[:-1] if line.endswith(b"\r") else line
                if not field:
                    self._buffer = b""
                    self._end_body(rest)
                elif not _is_trailer_field(field):
                    self._fail_body(InvalidResponse(f"invalid trailer field {field[:80]!r}"))
                    return

    def _end_body(self, rest: bytes) -> None:
        """The body is complete: free the connection, then tell the reader."""
        response, self._response = self._response, None
        if rest:
            # More than the framing announced: the stream cannot be trusted.
            self._reusable = False
        if self._reusable:
            self._state = _IDLE
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._pool.release(self)
        else:
            self._state = _CLOSED
            self.transport.loseConnection()
        if response is not None:
            response._end(None)

    def _fail_body(self, error: Exception) -> None:
        self._state = _CLOSED
        self.transport.abortConnection()
        response, self._response = self._response, None
        if response is not None:
            response._end(Failure(error))

    def pause(self) -> None:
        """Stop reading the body for now (its reader is slower than the upstream)."""
        if self._state == _BODY and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        """Read the body again."""
        if self._state == _BODY and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def abort_body(self) -> None:
        """The body's reader gave up: close the connection mid-body."""
        if self._state == _BODY:
            self._state = _CLOSED
            self.transport.abortConnection()

    def _give_up(self, error: Exception) -> None:
        """Invalid response head: fail the request and drop the connection."""
        self._state = _CLOSED
        waiting, self._waiting = self._waiting, None
        self.transport.abortConnection()
        if waiting is not None:
            waiting.errback(error)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._pool.discard(self)
        self._state = _CLOSED
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        if waiting is not None:
            wrapper = ResponseBroken if self._got_bytes else NoResponse
            waiting.errback(wrapper([reason]))
        elif response is not None:
            if self._framing == _UNTIL_CLOSE and reason.check(ConnectionDone):
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseBroken([reason])))
        self._pool.closed(self)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: ConnectionPool, key: Any) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._pool, self._key)


class _Authority:
    """What one ``scheme://host:port`` needs: its pool key, Host value and endpoint."""

    __slots__ = ("key", "host", "endpoint")

    def __init__(self, key: Any, host: bytes, endpoint: IStreamClientEndpoint) -> None:
        self.key = key
        self.host = host
        self.endpoint = endpoint


class ConnectionPool:
    """Persistent upstream connections, reused most-recent first.

    ``max_idle_per_host`` bounds the idle connections kept per upstream (not
    the calls in flight: the proxy caps those); an idle one is closed after
    ``idle_timeout`` seconds, by one timer for the whole pool rather than
    one per connection. A request never waits for a busy connection: without
    an idle one, a new one is opened.

    Args:
        reactor: Clock for the idle timer.
        endpoints: An ``IAgentEndpointFactory`` (``endpointForURI``).
        max_idle_per_host: Idle connections kept per upstream.
        idle_timeout: Seconds an idle connection is kept.
    """

    def __init__(
        self, reactor: Any, endpoints: Any, max_idle_per_host: int, idle_timeout: float
    ) -> None:
        self._reactor = reactor
        self._endpoints = endpoints
        self._max_idle = max_idle_per_host
        self._idle_timeout = idle_timeout
        self._idle: dict[Any, list[_Connection]] = {}
        self._authorities: dict[bytes, _Authority] = {}
        self._sweep_call: Any = None
        self._closing: dict[_Connection, defer.Deferred[None]] = {}

    @property
    def idle_count(self) -> int:
        """Idle connections held, over all upstreams."""
        return sum(len(c) for c in self._idle.values())

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Iterable[Header] | None,
        body: bytes | None,
    ) -> defer.Deferred[UpstreamResponse]:
        """Send one request; the Deferred fires with the response head.

        Args:
            method: The method.
            url: ``scheme://host[:port]/path[?query]``.
            headers: The fields to send, without Host and Content-Length
                (written here from the URL and the body).
            body: The whole request body, or None for none.

        Returns:
            A Deferred that fires with an `UpstreamResponse`, or fails with
            the endpoint's error when connecting fails, `NoResponse` when the
            connection ends before any response byte, `ResponseBroken` when
            it ends after one, and `InvalidResponse` for an answer that is
            not valid HTTP/1.1. Cancelling it closes the connection.
        """
        start = url.index(b"://") + 3
        slash = url.find(b"/", start)
        query = url.find(b"?", start)
        if query >= 0 and (slash < 0 or query < slash):
            base, target = url[:query], b"/" + url[query:]
        elif slash < 0:
            base, target = url, b"/"
        else:
            base, target = url[:slash], url[slash:]
        authority = self._authorities.get(base)
        if authority is None:
            authority = self._authority(base)
        head = _request_head(method, target, authority.host, headers, body)
        idle = self._idle.get(authority.key)
        if idle:
            return idle.pop().send(method, head, body)
        connecting = authority.endpoint.connect(_ConnectionFactory(self, authority.key))
        return connecting.addCallback(lambda connection: connection.send(method, head, body))

    def _authority(self, base: bytes) -> _Authority:
        uri = URI.fromBytes(base)
        default_port = {b"http": 80, b"https": 443}.get(uri.scheme)
        host = uri.host if uri.port == default_port else b"%s:%d" % (uri.host, uri.port)
        authority = _Authority(
            (uri.scheme, uri.host, uri.port), host, self._endpoints.endpointForURI(uri)
        )
        self._authorities[base] = authority
        return authority

    def release(self, connection: _Connection) -> None:
        """Keep a connection whose response is complete for the next request."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self._max_idle:
            idle.pop(0).transport.loseConnection()
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self._idle_timeout, self._sweep)

    def discard(self, connection: _Connection) -> None:
        """Forget a connection that can no longer be reused."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def closed(self, connection: _Connection) -> None:
        """A connection's socket is gone (fires `close`'s Deferreds)."""
        waiting = self._closing.pop(connection, None)
        if waiting is not None:
            waiting.callback(None)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout``; rearm for the rest."""
        self._sweep_call = None
        now = self._reactor.seconds()
        oldest = None
        for idle in self._idle.values():
            # Reused most-recent first, so the oldest sit at the front.
            while idle and now - idle[0].idle_since >= self._idle_timeout:
                idle.pop(0).transport.loseConnection()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweep_call = self._reactor.callLater(
                oldest + self._idle_timeout - now, self._sweep
            )

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections; fires when their sockets are closed."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        waits = []
        for idle in self._idle.values():
            for connection in idle:
                waits.append(self._closing.setdefault(connection, defer.Deferred()))
                connection.transport.loseConnection()
            idle.clear()
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _request_head(
    method: bytes, target: bytes, host: bytes, headers: Iterable[Header] | None, body: bytes | None
) -> bytes:
    """The request line and header section, as twisted.web's client lays them out.

    Raises:
        ValueError: a line break in the method, target or Host value (the
            caller validates those; a field value's is folded instead).
    """
    headers = list(headers or ())
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines += (b"Host: ", host, b"\r\n\r\n")
    head = b"".join(lines)
    breaks = head.count(b"\n")
    if breaks != len(headers) + 3 + (body is not None) or head.count(b"\r") != breaks:
        # A line break inside a name or value would split it into a field
        # (or a request) of the client's making: fold it into a space, as
        # twisted.web's Headers does. (Checked here, off the common path.)
        if _LINE_BREAKS.search(method + target + host):
            raise ValueError("line break in the request line or Host")
        return _request_head(
            method, target, host,
            [(_LINE_BREAKS.sub(b" ", n), _LINE_BREAKS.sub(b" ", v)) for n, v in headers],
            body,
        )
    return head
