"""The gateway's own strict reading of the bytes a client sends (RFC 9110, RFC 9112).

twisted.web's parser is lenient where a proxy cannot be: it serves an
HTTP/1.1 request without Host, forwards ``Transfer-Encoding: identity`` next
to a Content-Length, reads a chunk size of any length, and waits for a body
it will refuse anyway. A gateway that reads a request one way passes it on
to an upstream that may read it another (request smuggling), so every byte
a client sends is read here first, and reaches twisted.web only once it is
known to be part of a valid request. twisted.web's own error paths are then
never taken; the first violation is answered with the gateway's JSON error
and the connection is closed (RFC 9112 §6.3: the framing of what follows
cannot be trusted).

What is refused, and how (where RFC 9112 leaves a choice, as nginx does):

- a request line that is not ``token SP target SP HTTP/1.x`` with a target
  of printable ASCII: 400; a well-formed other version: 505; a method that
  is not in capitals: 400, as nginx does (methods are case-sensitive, RFC
  9110 §9.1, and every registered one is in capitals: ``get`` is not GET
  and must not be routed as GET; a method a route does not allow is the
  router's 405);
- a field name that is not a token (so also whitespace before the colon and
  obs-fold, RFC 9112 §5.1, §5.2), a NUL, a bare CR or a bare LF anywhere
  in the head: 400;
- an HTTP/1.1 request without exactly one Host, or any request with two, or
  a Host that is not ``host[:port]`` (RFC 9112 §3.2, RFC 3986 §3.2.2): 400;
- Transfer-Encoding in an HTTP/1.0 request, next to a Content-Length, or
  with a final coding other than chunked: 400; another coding before
  chunked (``gzip, chunked``), which the gateway does not decode: 501;
- a Content-Length that is not digits within 2^63-1, or repeated (RFC 9110
  §8.6 lets a recipient refuse even equal repeats, and twisted.web does):
  400; one over MAX_BODY_BYTES: 413 before any body is read (so never
  ``100 Continue`` for it);
- a chunk size that is not 1 to 16 hex digits, invalid chunk extensions, a
  chunk not followed by CRLF: 400; a chunked body past MAX_BODY_BYTES: 413
  as soon as its chunk sizes say so;
- a request line longer than `MAX_HEAD_BYTES`: 414; a head longer than that
  or with more than `MAX_FIELDS` fields: 431.

One empty line before a request line is ignored (RFC 9112 §2.2), as
twisted.web does.
"""

from __future__ import annotations

import re

from deltagw.http_syntax import has_bare_cr, has_controls, is_host, is_token

MAX_HEAD_BYTES = 16 * 1024
"""Largest request head (request line and fields), twisted.web's own limit."""

MAX_FIELDS = 100
"""Most field lines in a request head (Apache httpd's default)."""

MAX_CHUNK_LINE = 1000
"""Longest chunk-size line with its extensions (under twisted.web's 1024)."""

MAX_CONTENT_LENGTH = 2**63 - 1

_COMMON_REQUEST_LINE = re.compile(rb"[A-Z][-A-Z_]* [\x21-\x7e]+ HTTP/1\.[01]\Z")
"""What nearly every request line is: checked at once, details only otherwise."""
_REQUEST_LINE = re.compile(rb"([^ ]+) ([^ ]+) (HTTP/[0-9]\.[0-9])\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
"""A request target is printable ASCII (RFC 3986; twisted.web insists too)."""


def _forbidden(head: bytes) -> bool:
    """Whether ``head`` holds a control character other than HTAB, or a CR
    or LF that is not a CRLF. RFC 9110 §5.5 admits none in a field value
    (only NUL, CR and LF must be refused; the others are refused too, as
    HAProxy does, so that no upstream parser is left to guess at them)."""
    return has_controls(head) or has_bare_cr(head) or head.count(b"\n") != head.count(b"\r\n")


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_CHUNK_EXTENSION = re.compile(rb"(?:;[\t\x20-\x7e\x80-\xff]*)?\Z")
_SUPPORTED_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_METHOD = re.compile(rb"[A-Z][-A-Z_]*\Z")
"""A method in capitals, as every registered method is (nginx's rule)."""
_WHITESPACE = b" \t"

_HEAD, _BY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(6)
_AFTER_COUNTED_BYTES = {_BY_LENGTH: _HEAD, _CHUNK_DATA: _CHUNK_END}
"""The states that pass a known number of body bytes, and the state after them."""


class RequestRejected(Exception):
    """A request the gateway refuses to read further.

    Attributes:
        status: The HTTP status of the answer.
        message: The ``error`` member of its JSON body.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, message)


def _content_length(values: list[bytes]) -> int:
    """The one Content-Length of a request head.

    Raises:
        RequestRejected: repeated, anything but digits, or over 2^63-1.
    """
    if len(values) != 1 or b"," in values[0]:
        raise _bad("Repeated Content-Length")
    (text,) = values
    # bytes.isdigit() is ASCII only; the length check keeps int() cheap.
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_CONTENT_LENGTH:
        raise _bad("Invalid Content-Length")
    return int(text)


class RequestFramer:
    """Follows a connection's requests byte by byte and vouches for them.

    `feed` takes what the connection read and returns the bytes now known to
    belong to valid requests, to be handed to twisted.web unchanged; bytes
    whose validity is not yet known (an incomplete head or chunk-size line)
    are held back. At the first violation `rejected` says why, `feed`
    returns what came before the offending request or line, and the framer
    must not be fed again.

    Args:
        max_body_bytes: The largest request body accepted (MAX_BODY_BYTES).
    """

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body = max_body_bytes
        self._state = _HEAD
        self._held = b""
        self._remaining = 0
        self._body_bytes = 0
        self._trailer_bytes = 0
        self._blank_line_skipped = False
        self._unit_start = 0
        self.rejected: RequestRejected | None = None
        self.request_line = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.heads_read = 0

    @property
    def receiving(self) -> bool:
        """Whether a request has begun and is not yet complete."""
        return self._state != _HEAD or bool(self._held)

    def feed(self, data: bytes) -> bytes:
        """Read ``data``; return the bytes of it (and of held ones) now vouched for."""
        if self._held:
            data, self._held = self._held + data, b""
        position, end = 0, len(data)
        try:
            return self._read(data, position, end)
        except RequestRejected as rejected:
            self.rejected = rejected
            return data[: self._unit_start]

    def _read(self, data: bytes, position: int, end: int) -> bytes:
        while position < end:
            self._unit_start = position
            state = self._state
            if state == _HEAD:
                position = self._head(data, position)
            elif state in _AFTER_COUNTED_BYTES:
                taken = min(self._remaining, end - position)
                position += taken
                self._remaining -= taken
                if not self._remaining:
                    self._state = _AFTER_COUNTED_BYTES[state]
            else:
                position = self._line(data, position, state)
            if position < 0:  # an incomplete line or head: held back
                kept = -position - 1
                self._held = data[kept:]
                return data[:kept]
        return data

    def _head(self, data: bytes, start: int) -> int:
        """Read one request head from ``start``; the position after it."""
        if not self._blank_line_skipped and data.startswith(b"\r\n", start):
            # One empty line before a request line (RFC 9112 §2.2), as
            # twisted.web ignores it.
            self._blank_line_skipped = True
            start += 2
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            self._check_incomplete_head(data, start)
            return -start - 1
        if end - start > MAX_HEAD_BYTES:
            self._check_incomplete_head(data, start)
            raise RequestRejected(431, "Request header fields too large")
        self._read_head(data[start:end])
        self._blank_line_skipped = False
        return end + 4

    def _check_incomplete_head(self, data: bytes, start: int) -> None:
        """Refuse a head that is already too long or holds what no head may,
        before it ends (the last byte may be a CR whose LF is to come)."""
        partial = data[start:-1] if data.endswith(b"\r") else data[start:]
        if _forbidden(partial):
            raise _bad("Invalid characters in request head")
        line_end = data.find(b"\r\n", start)
        if (line_end if line_end >= 0 else len(data)) - start > MAX_HEAD_BYTES:
            raise RequestRejected(414, "Request line too long")
        if len(data) - start > MAX_HEAD_BYTES:
            raise RequestRejected(431, "Request header fields too large")

    def _read_head(self, head: bytes) -> None:
        """Check a whole head (without its final blank line) and set up its body."""
        if _forbidden(head):
            raise _bad("Invalid characters in request head")
        lines = head.split(b"\r\n")
        if len(lines) > MAX_FIELDS + 1:
            raise RequestRejected(431, "Too many header fields")
        version = self._request_line(lines[0])
        self.request_line = lines[0]
        self.heads_read += 1
        self.fields = fields = []
        hosts: list[bytes] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not is_token(name):
                raise _bad("Invalid header field")
            fields.append((name, value.strip(_WHITESPACE)))
            lower = name.lower()
            if lower == b"host":
                hosts.append(value.strip(_WHITESPACE))
            elif lower == b"content-length":
                lengths.append(value.strip(_WHITESPACE))
            elif lower == b"transfer-encoding":
                codings.append(value)
        if len(hosts) > 1 or (not hosts and version == b"HTTP/1.1"):
            raise _bad("A request needs exactly one Host header")
        if hosts and not is_host(hosts[0]):
            raise _bad("Invalid Host header")
        if codings:
            self._chunked(codings, lengths, version)
        elif lengths:
            length = _content_length(lengths)
            if length > self._max_body:
                raise RequestRejected(413, "Request body too large")
            if length:
                self._state, self._remaining = _BY_LENGTH, length

    def _request_line(self, line: bytes) -> bytes:
        """Check the request line; its HTTP version."""
        if _COMMON_REQUEST_LINE.match(line):
            return line[-8:]
        match = _REQUEST_LINE.match(line)
        if match is None or not is_token(match.group(1)):
            raise _bad("Malformed request line")
        method, version = match.group(1), match.group(3)
        if not _TARGET.match(match.group(2)):
            raise _bad("Invalid characters in URL")
        if version not in _SUPPORTED_VERSIONS:
            raise RequestRejected(505, "HTTP version not supported")
        if not _METHOD.match(method):
            raise _bad("Methods are case-sensitive and in capitals")
        return version

    def _chunked(self, codings: list[bytes], lengths: list[bytes], version: bytes) -> None:
        """Accept Transfer-Encoding only as chunked alone (RFC 9112 §6.1, §6.3)."""
        if version != b"HTTP/1.1":
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise _bad("Both Transfer-Encoding and Content-Length")
        # Field lines of one name are one list (RFC 9110 §5.3).
        listed = [c.strip(_WHITESPACE).lower() for c in b",".join(codings).split(b",")]
        if listed[-1] != b"chunked":
            raise _bad("Transfer-Encoding does not end with chunked")
        if len(listed) > 1:
            raise RequestRejected(501, "Transfer coding not implemented")
        self._state, self._body_bytes = _CHUNK_SIZE, 0

    def _line(self, data: bytes, start: int, state: int) -> int:
        """Read one line of chunked framing; the position after it."""
        if state == _CHUNK_END:
            if data.startswith(b"\r\n", start):
                self._state = _CHUNK_SIZE
                return start + 2
            if data[start:] in (b"\r", b""):
                return -start - 1
            raise _bad("Chunk not followed by CRLF")
        end = data.find(b"\r\n", start)
        limit = MAX_CHUNK_LINE if state == _CHUNK_SIZE else MAX_HEAD_BYTES - self._trailer_bytes
        if (end if end >= 0 else len(data)) - start > limit:
            raise _bad("Chunk size line too long" if state == _CHUNK_SIZE else "Trailer too long")
        if end < 0:
            return -start - 1
        line = data[start:end]
        if state == _CHUNK_SIZE:
            self._chunk_size(line)
        else:
            self._trailer_line(line)
        return end + 2

    def _chunk_size(self, line: bytes) -> None:
        size_text, semicolon, extensions = line.partition(b";")
        if not _HEX.match(size_text) or not _CHUNK_EXTENSION.match(semicolon + extensions):
            raise _bad("Invalid chunk size")
        size = int(size_text, 16)
        self._body_bytes += size
        if self._body_bytes > self._max_body:
            raise RequestRejected(413, "Request body too large")
        if size:
            self._state, self._remaining = _CHUNK_DATA, size
        else:
            self._state, self._trailer_bytes = _TRAILER, 0

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = _HEAD
            return
        self._trailer_bytes += len(line) + 2
        name, colon, _ = line.partition(b":")
        if not colon or not is_token(name) or _forbidden(line):
            raise _bad("Invalid trailer field")
