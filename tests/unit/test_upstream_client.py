"""The lean HTTP/1.1 client (deltagw.upstream.client), driven byte by byte.

Most tests run the real `ConnectionPool` against a fake endpoint factory: each
connect builds the pool's protocol on a `StringTransport`, so a test reads
what was written, feeds response bytes with ``dataReceived`` and ends the
connection with ``connectionLost``; time is a `task.Clock`. A few tests at
the end talk to real loopback servers.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from deltagw.upstream import client
from deltagw.upstream.client import (
    MAX_HEAD_BYTES,
    MAX_INTERIM_RESPONSES,
    ConnectionPool,
    InvalidResponse,
    NoResponse,
    ResponseBroken,
    UpstreamResponse,
    _parse_head,
)
from deltagw.upstream.failures import failure_reason, is_connection_failure
from tests.support import BodyReader, read_body

URL = b"http://api.local/items"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- fakes and helpers ------------------------------------------------------


class Transport(StringTransport):
    """A StringTransport that remembers whether it was aborted (not just closed)."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeEndpoints:
    """An ``IAgentEndpointFactory`` whose connections are in-memory transports.

    Args:
        connect_with: What ``connect`` returns instead of a connection, when
            given (``lambda: defer.fail(...)`` or a Deferred that never fires).
    """

    def __init__(self, connect_with: Any = None) -> None:
        self.uris: list[Any] = []
        self.connections: list[Any] = []
        self._connect_with = connect_with

    def endpointForURI(self, uri: Any) -> Any:
        self.uris.append(uri)
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self._connect_with is not None:
            return self._connect_with()
        connection = factory.buildProtocol(None)
        connection.makeConnection(Transport())
        self.connections.append(connection)
        return defer.succeed(connection)


class Network:
    """A pool over `FakeEndpoints`, with shortcuts to its newest connection."""

    def __init__(self, max_idle_per_host: int = 4, idle_timeout: float = 30.0) -> None:
        self.clock = Clock()
        self.endpoints = FakeEndpoints()
        self.pool = ConnectionPool(self.clock, self.endpoints, max_idle_per_host, idle_timeout)

    @property
    def connections(self) -> list[Any]:
        return self.endpoints.connections

    @property
    def connection(self) -> Any:
        return self.connections[-1]

    @property
    def transport(self) -> Transport:
        return self.connection.transport

    def request(
        self, method: bytes = b"GET", url: bytes = URL, headers: Any = None, body: bytes | None = None
    ) -> defer.Deferred[UpstreamResponse]:
        return self.pool.request(method, url, headers, body)

    def sent(self, connection: Any = None) -> bytes:
        """Everything written on a connection (the newest by default), then forgotten."""
        transport = (connection or self.connection).transport
        written = transport.value()
        transport.clear()
        return written

    def reply(self, *pieces: bytes, connection: Any = None) -> None:
        """Feed response bytes to a connection, one ``dataReceived`` per piece."""
        for piece in pieces:
            (connection or self.connection).dataReceived(piece)

    def lose(self, error: type[Exception] = ConnectionDone, connection: Any = None) -> None:
        """End a connection as the reactor would, with ``error`` as the reason."""
        (connection or self.connection).connectionLost(Failure(error()))

    def exchange(
        self, response: bytes, method: bytes = b"GET", url: bytes = URL
    ) -> tuple[UpstreamResponse, BodyReader]:
        """One request answered by ``response`` in one read; the body read at once."""
        d = self.request(method, url)
        self.reply(response)
        answer = _result_of(d)
        return answer, read_body(answer)


@pytest.fixture
def net() -> Network:
    return Network()


def _reading(net: Network) -> BodyReader:
    """A request whose head (announcing 10 body bytes) has arrived, its body being read."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    return read_body(_result_of(d))


def _result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert not isinstance(results[0], Failure), results[0].getTraceback()
    return results[0]


def _fired(d: defer.Deferred[Any]) -> bool:
    """Whether ``d`` has a result yet (``d.called`` is also true while it waits on another)."""
    fired: list[bool] = []
    d.addBoth(lambda result: fired.append(True) or result)
    return bool(fired)


def _failure_of(d: defer.Deferred[Any]) -> Failure:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    return results[0]


def _assert_parse_error(failure: Failure | None) -> None:
    """``failure`` is the client's InvalidResponse, named an invalid answer."""
    assert failure is not None
    assert failure.check(InvalidResponse)
    assert failure_reason(failure) == "invalid_response"


def _lines(written: bytes) -> list[bytes]:
    """The lines of a request head (which must end with an empty line)."""
    head, end, _ = written.partition(b"\r\n\r\n")
    assert end, f"no end of head in {written!r}"
    return head.split(b"\r\n")


def _chunked(*chunks: bytes) -> bytes:
    """A chunked body of ``chunks``, with its last chunk and no trailers."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


# --- 1. request serialization ----------------------------------------------


def test_request_without_body_has_no_content_length(net):
    """A request without a body is one head: request line, the fields in order, Host last."""
    net.request(b"GET", b"http://api.local/items?q=1&r=2", [(b"Accept", b"*/*"), (b"X-Id", b"7")])
    assert net.sent() == (
        b"GET /items?q=1&r=2 HTTP/1.1\r\n"
        b"Accept: */*\r\n"
        b"X-Id: 7\r\n"
        b"Host: api.local\r\n"
        b"\r\n"
    )


def test_request_body_follows_head_with_content_length_first(net):
    """A body is announced by Content-Length (before the given fields) and follows the head."""
    net.request(b"POST", URL, [(b"Content-Type", b"application/json")], b'{"a": 1}')
    assert net.sent() == (
        b"POST /items HTTP/1.1\r\n"
        b"Content-Length: 8\r\n"
        b"Content-Type: application/json\r\n"
        b"Host: api.local\r\n"
        b"\r\n"
        b'{"a": 1}'
    )


def test_empty_body_is_sent_as_content_length_zero(net):
    """An empty body (not None) is still announced, as ``Content-Length: 0``."""
    net.request(b"PUT", URL, None, b"")
    assert net.sent() == b"PUT /items HTTP/1.1\r\nContent-Length: 0\r\nHost: api.local\r\n\r\n"


def test_url_without_path_requests_root(net):
    """A URL with no path asks for ``/``."""
    net.request(b"GET", b"http://api.local", None, None)
    assert _lines(net.sent())[0] == b"GET / HTTP/1.1"


@pytest.mark.parametrize(
    "url, host",
    [
        (b"http://api.local/", b"api.local"),
        (b"http://api.local:80/", b"api.local"),
        (b"https://api.local/", b"api.local"),
        (b"https://api.local:443/", b"api.local"),
        (b"http://api.local:8080/", b"api.local:8080"),
        (b"http://api.local:443/", b"api.local:443"),
        (b"https://api.local:80/", b"api.local:80"),
        (b"http://10.0.0.5:9000/", b"10.0.0.5:9000"),
    ],
)
def test_host_field_names_port_only_when_not_default(net, url, host):
    """Host carries the port unless it is the scheme's default (80 for http, 443 for https)."""
    net.request(b"GET", url, None, None)
    assert _lines(net.sent())[-1] == b"Host: " + host


@pytest.mark.parametrize("line_break", [b"\n", b"\r\n", b"\r", b"\r\n\r\n"])
def test_line_break_in_field_value_is_folded_to_a_space(net, line_break):
    """A line break in a value becomes one space, so it can add neither a field nor a request."""
    value = b"a" + line_break + b"Injected: 1" + line_break + line_break + b"GET /evil HTTP/1.1"
    net.request(b"POST", URL, [(b"X-A", value), (b"X-B", b"b")], b"xy")
    written = net.sent()
    assert _lines(written) == [
        b"POST /items HTTP/1.1",
        b"Content-Length: 2",
        b"X-A: a Injected: 1 GET /evil HTTP/1.1",
        b"X-B: b",
        b"Host: api.local",
    ]
    assert written.endswith(b"\r\n\r\nxy")
    assert written.count(b"\n") == written.count(b"\r") == 6


def test_line_break_in_field_name_is_folded_to_a_space(net):
    """A line break in a field name is folded like one in a value."""
    net.request(b"GET", URL, [(b"X-A\r\nInjected", b"1")], None)
    assert _lines(net.sent()) == [b"GET /items HTTP/1.1", b"X-A Injected: 1", b"Host: api.local"]


def test_line_break_in_fields_given_as_an_iterator_is_folded(net):
    """Fields given as any iterable (here a generator) are folded too, none lost."""
    fields = [(b"X-A", b"a\r\nInjected: 1"), (b"X-B", b"b")]
    net.request(b"GET", URL, (field for field in fields), None)
    assert _lines(net.sent()) == [
        b"GET /items HTTP/1.1",
        b"X-A: a Injected: 1",
        b"X-B: b",
        b"Host: api.local",
    ]


@pytest.mark.parametrize("target", [b"/a\r\nX-Injected: 1", b"/a\rb", b"/a\nb"])
def test_line_break_in_request_target_is_refused(net, target):
    """A target with a line break is refused with ValueError, as twisted.web's Agent does."""
    with pytest.raises(ValueError):
        net.request(b"GET", b"http://api.local" + target)
    assert net.connections == []


# --- 2. response head parsing ----------------------------------------------


@pytest.mark.parametrize(
    "status_line, code, phrase",
    [
        (b"HTTP/1.1 201 Created", 201, b"Created"),
        (b"HTTP/1.1 404 Not Found", 404, b"Not Found"),
        (b"HTTP/1.1 200", 200, b""),
        (b"HTTP/1.1 200 ", 200, b""),
        (b"HTTP/1.0 503 Service Unavailable", 503, b"Service Unavailable"),
    ],
)
def test_status_line_gives_code_and_phrase(net, status_line, code, phrase):
    """The status code and the (possibly missing or multi-word) reason phrase are read."""
    response, _ = net.exchange(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (response.code, response.phrase) == (code, phrase)


def test_http_1_0_response_is_read_and_its_connection_closed(net):
    """An HTTP/1.0 answer is delivered, but its connection is closed, not pooled."""
    response, reader = net.exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert (response.code, reader.body) == (200, b"ok")
    assert reader.reason.check(ResponseDone)
    assert net.transport.disconnecting and not net.transport.aborted
    assert net.pool.idle_count == 0


def test_http_1_0_keep_alive_connection_is_pooled(net):
    """An HTTP/1.0 answer with ``Connection: keep-alive`` and a length may be reused."""
    _, reader = net.exchange(
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
    )
    assert reader.body == b"ok"
    assert not net.transport.disconnecting
    assert net.pool.idle_count == 1


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/2 200 OK\r\n\r\n", id="http-2"),
        pytest.param(b"HTTP/1.1\r\n\r\n", id="no-code"),
        pytest.param(b"HTTP/1.1 20 OK\r\n\r\n", id="two-digit-code"),
        pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="four-digit-code"),
        pytest.param(b"HTTP/1.1 2x0 OK\r\n\r\n", id="non-digit-code"),
        pytest.param(b"HTTP/1.1 200 OK\r\nNoColonHere\r\n\r\n", id="no-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", id="space-before-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A\t: 1\r\n\r\n", id="tab-before-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\n: 1\r\n\r\n", id="empty-name"),
        pytest.param(b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", id="fold-without-field"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                     id="conflicting-content-lengths"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
                     id="conflicting-content-length-list"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", id="hex-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", id="empty-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                     id="length-overflow"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\n",
                     id="length-2-to-the-63"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", id="signed-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa2\r\n\r\nok",
                     id="non-ascii-digit-length"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1x\r\n\r\n",
                     id="invalid-length-on-304"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n", id="nul-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n", id="bare-cr-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x0bb\r\n\r\n", id="vertical-tab-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n\r\n", id="del-in-value"),
        pytest.param(b"HTTP/1.1 200 O\x01K\r\n\r\n", id="control-in-phrase"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", id="space-in-name"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX(A): x\r\n\r\n", id="separator-in-name"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-\xc3\xa9: x\r\n\r\n", id="non-ascii-name"),
        pytest.param(b"http/1.1 200 OK\r\n\r\n", id="lowercase-version"),
        pytest.param(b"HTTP/1.2 200 OK\r\n\r\n", id="http-1-2"),
        pytest.param(b"HTTP/1.1  200 OK\r\n\r\n", id="two-spaces"),
        pytest.param(b"HTTP/1.1 099 OK\r\n\r\n", id="code-below-100"),
        pytest.param(b"HTTP/1.1 600 OK\r\n\r\n", id="code-above-599"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", id="too-many-fields"),
    ],
)
def test_invalid_head_fails_with_parse_error_and_aborts(net, head):
    """An invalid status line or field fails the call with InvalidResponse and aborts."""
    d = net.request()
    net.reply(head)
    _assert_parse_error(_failure_of(d))
    assert net.transport.aborted
    assert net.pool.idle_count == 0


def test_a_name_seen_before_still_needs_its_colon():
    """Remembering a valid field name does not vouch for a line that is only that name."""
    assert _parse_head(b"HTTP/1.1 200 OK\r\nKnown-Name: 1", b"GET")[2] == [(b"Known-Name", b"1")]
    with pytest.raises(InvalidResponse, match="invalid header line"):
        _parse_head(b"HTTP/1.1 200 OK\r\nKnown-Name", b"GET")


def test_names_remembered_are_bounded(monkeypatch):
    """An upstream that sends a new name each time does not grow the table without end."""
    monkeypatch.setattr(client, "_LOWER_NAMES", {})
    for i in range(client._MAX_LOWER_NAMES + 10):
        head = b"HTTP/1.1 200 OK\r\nX-Name-%d: v" % i
        assert _parse_head(head, b"GET")[2] == [(b"X-Name-%d" % i, b"v")]
    assert len(client._LOWER_NAMES) == client._MAX_LOWER_NAMES


def test_head_larger_than_limit_without_end_fails(net):
    """A head that exceeds MAX_HEAD_BYTES without ending is refused; up to the limit it waits."""
    d = net.request()
    start = b"HTTP/1.1 200 OK\r\nX-Big: "
    net.reply(start, b"a" * (MAX_HEAD_BYTES - len(start)))
    assert not _fired(d) and not net.transport.disconnecting
    net.reply(b"a")
    _assert_parse_error(_failure_of(d))
    assert net.transport.aborted


def test_bare_lf_line_endings_are_accepted(net):
    """A head with bare LF line endings is parsed like a CRLF one."""
    response, reader = net.exchange(b"HTTP/1.1 201 Created\nX-A: 1\nContent-Length: 2\n\nok")
    assert (response.code, response.phrase, response.headers) == (201, b"Created", [(b"X-A", b"1")])
    assert reader.body == b"ok"
    assert net.pool.idle_count == 1


def test_bare_lf_head_followed_by_crlf_crlf_in_body_is_parsed(net):
    """A bare-LF head ends at its first empty line even when the body holds CRLFCRLF."""
    response, reader = net.exchange(b"HTTP/1.1 200 OK\nContent-Length: 6\n\na\r\n\r\nb")
    assert response.code == 200
    assert reader.body == b"a\r\n\r\nb"


def test_obs_fold_is_joined_with_a_space(net):
    """An obsolete line folding continues the previous field's value, after one space."""
    response, _ = net.exchange(
        b"HTTP/1.1 200 OK\r\nX-Long: a\r\n   b\r\n\tc\r\nX-Next: d\r\nContent-Length: 0\r\n\r\n"
    )
    assert response.headers == [(b"X-Long", b"a b c"), (b"X-Next", b"d")]


def test_too_many_interim_responses_are_invalid(net):
    """An upstream that keeps sending interim answers is cut off after
    MAX_INTERIM_RESPONSES of them; up to that, the final answer is read."""
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    _, reader = net.exchange(interim * MAX_INTERIM_RESPONSES + OK)
    assert reader.body == b"ok"
    d = net.request()
    net.reply(interim * (MAX_INTERIM_RESPONSES + 1) + OK)
    _assert_parse_error(_failure_of(d))
    assert net.transport.aborted


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "two-reads"])
def test_interim_responses_are_skipped(net, split):
    """1xx interim responses (100 Continue, 103 Early Hints) are skipped for the final one."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
    d = net.request()
    net.reply(*([interim, final] if split else [interim + final]))
    response = _result_of(d)
    assert (response.code, response.headers) == (200, [(b"X-A", b"1")])
    assert read_body(response).body == b"ok"
    assert net.pool.idle_count == 1


def test_switching_protocols_is_rejected(net):
    """A 101 nobody asked for is invalid HTTP: the call fails and the connection is aborted."""
    d = net.request()
    net.reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    _assert_parse_error(_failure_of(d))
    assert net.transport.aborted


# --- 3. body framing --------------------------------------------------------


def test_content_length_body_is_delivered_and_connection_reused(net):
    """A Content-Length body ends the response, and the connection carries the next request."""
    response, reader = net.exchange(OK)
    assert (response.code, response.length) == (200, 2)
    assert reader.body == b"ok" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1
    net.sent()
    second = net.request(b"GET", URL + b"/2")
    assert net.pool.idle_count == 0
    assert len(net.connections) == 1
    assert _lines(net.sent())[0] == b"GET /items/2 HTTP/1.1"
    net.reply(OK)
    assert read_body(_result_of(second)).body == b"ok"


def test_body_split_across_reads_is_delivered_in_order(net):
    """Body bytes arriving in several reads reach the protocol in order, ending at the length."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    reader = read_body(_result_of(d))
    assert reader.body == b"ab" and reader.reason is None
    net.reply(b"cde", b"fgh")
    assert reader.reason is None and net.pool.idle_count == 0
    net.reply(b"ij")
    assert reader.chunks == [b"ab", b"cde", b"fgh", b"ij"]
    assert reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    + b"5;name=value\r\nhello\r\n"
    + b"1 ; quoted=\"x;y\"\r\n \r\n"
    + b"B\r\nchunked!!!!\r\n"
    + b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)


def test_chunked_body_with_extensions_and_trailers_is_decoded(net):
    """Chunk extensions and trailers are skipped; the data is delivered, the connection pooled."""
    response, reader = net.exchange(CHUNKED)
    assert response.length is UNKNOWN_LENGTH
    assert response.headers == [(b"X-A", b"1")]
    assert reader.body == b"hello chunked!!!!" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1
    assert not net.transport.disconnecting


def test_chunked_response_fed_byte_by_byte_is_decoded(net):
    """A chunked response split at every byte boundary decodes to the same body."""
    d = net.request()
    reader: BodyReader | None = None
    for i in range(len(CHUNKED)):
        net.reply(CHUNKED[i : i + 1])
        if reader is None and _fired(d):
            reader = read_body(_result_of(d))
    assert reader is not None
    assert reader.body == b"hello chunked!!!!" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1


def test_chunked_body_with_bare_lf_is_decoded(net):
    """Chunk lines ended by a bare LF are accepted."""
    _, reader = net.exchange(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\n1\nc\n0\n\n"
    )
    assert reader.body == b"abc" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\n", id="not-hex"),
        pytest.param(b"-5\r\nhello\r\n", id="negative"),
        pytest.param(b"0x5\r\nhello\r\n", id="0x-prefix"),
        pytest.param(b"\r\nhello\r\n", id="empty-size"),
        pytest.param(b"1" * 17 + b"\r\n", id="too-many-digits"),
        pytest.param(b"5\r\nhelloX\r\n", id="no-crlf-after-data"),
        pytest.param(b"5;" + b"x" * 5000, id="size-line-too-long"),
        pytest.param(b"0\r\nnot a field\r\n\r\n", id="trailer-not-a-field"),
        pytest.param(b"0\r\nBad Name: x\r\n\r\n", id="trailer-name-not-a-token"),
        pytest.param(b"0\r\nX-T: a\x00b\r\n\r\n", id="trailer-nul-in-value"),
        pytest.param(b"0\r\nX-T: a\rb\r\n\r\n", id="trailer-bare-cr"),
    ],
)
def test_invalid_chunked_body_fails_the_body_and_aborts(net, body):
    """Invalid chunk framing ends the body with InvalidResponse and aborts."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    reader = read_body(_result_of(d))
    net.reply(body)
    _assert_parse_error(reader.reason)
    assert net.transport.aborted
    assert net.pool.idle_count == 0


def test_head_response_keeps_content_length_and_has_no_body(net):
    """A HEAD answer keeps its Content-Length field, has no body, and frees the connection."""
    response, reader = net.exchange(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n",
        method=b"HEAD",
    )
    assert response.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"1234")]
    assert response.length == 0
    assert reader.body == b"" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1


@pytest.mark.parametrize(
    ("code", "fields"),
    [(204, [(b"ETag", b'"e"')]), (304, [(b"Content-Length", b"10"), (b"ETag", b'"e"')])],
)
def test_no_body_status_has_empty_body(net, code, fields):
    """204 and 304 answers have no body whatever their fields say; the connection is reused.
    A 304's Content-Length (the representation's) is kept, a 204's dropped."""
    response, reader = net.exchange(
        b"HTTP/1.1 %d X\r\nContent-Length: 10\r\nETag: \"e\"\r\n\r\n" % code
    )
    assert response.code == code and response.length == 0
    assert response.headers == fields
    assert reader.body == b"" and reader.reason.check(ResponseDone)
    assert net.pool.idle_count == 1


def test_body_without_length_is_read_until_close(net):
    """A body without length ends with the connection, reported as PotentialDataLoss."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nfirst ")
    response = _result_of(d)
    assert response.length is UNKNOWN_LENGTH
    reader = read_body(response)
    net.reply(b"second")
    assert reader.reason is None
    net.lose(ConnectionDone)
    assert reader.body == b"first second"
    assert reader.reason.check(PotentialDataLoss)
    assert net.pool.idle_count == 0


def test_body_without_length_cut_by_reset_fails(net):
    """A body without length ended by a reset (not a clean close) is a ResponseBroken."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\n\r\npartial")
    reader = read_body(_result_of(d))
    net.lose(ConnectionLost)
    assert reader.body == b"partial"
    assert reader.reason.check(ResponseBroken)
    assert reader.reason.value.reasons[0].check(ConnectionLost)


@pytest.mark.parametrize("value", [b"close", b"Close", b"keep-alive, close"])
def test_connection_close_is_not_reused(net, value):
    """``Connection: close`` closes the connection after the body; the next request opens another."""
    _, reader = net.exchange(
        b"HTTP/1.1 200 OK\r\nConnection: %s\r\nContent-Length: 2\r\n\r\nok" % value
    )
    assert reader.body == b"ok" and reader.reason.check(ResponseDone)
    assert net.transport.disconnecting and not net.transport.aborted
    assert net.pool.idle_count == 0
    net.request()
    assert len(net.connections) == 2


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 2\r\nContent-Length: 2",
        b"Content-Length: 2, 2",
        b"Content-Length: 2,2\r\nContent-Length:  2 ",
    ],
)
def test_equal_repeated_content_lengths_are_accepted(net, fields):
    """Content-Length repeated with one value is that value (RFC 9110 §8.6)."""
    response, reader = net.exchange(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\nok")
    assert response.length == 2 and reader.body == b"ok"
    assert net.pool.idle_count == 1


@pytest.mark.parametrize("order", ["te-first", "cl-first"])
def test_transfer_encoding_wins_over_content_length_and_connection_is_dropped(net, order):
    """With both framings the body is chunked, and the connection is closed afterwards."""
    fields = [b"Transfer-Encoding: chunked", b"Content-Length: 100"]
    if order == "cl-first":
        fields.reverse()
    response, reader = net.exchange(
        b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\n\r\n" + _chunked(b"abc")
    )
    assert response.length is UNKNOWN_LENGTH
    assert reader.body == b"abc" and reader.reason.check(ResponseDone)
    assert net.transport.disconnecting
    assert net.pool.idle_count == 0


@pytest.mark.parametrize(
    "value",
    [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity", b"xchunked", b"chunked, chunked"],
)
def test_transfer_encoding_other_than_chunked_alone_is_invalid(net, value):
    """Any coding but ``chunked`` alone is refused: with the field dropped, the coded
    body would reach the client undeclared (nginx refuses it too)."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n\x1f\x8b")
    _assert_parse_error(_failure_of(d))
    assert net.transport.aborted


def test_transfer_encoding_on_two_lines_is_one_list(net):
    """``chunked`` then ``gzip`` on two field lines is the list ``chunked, gzip``: refused."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n")
    _assert_parse_error(_failure_of(d))


def test_transfer_encoding_in_http_1_0_response_is_invalid(net):
    """An HTTP/1.0 answer with Transfer-Encoding has faulty framing (RFC 9112 §6.1)."""
    d = net.request()
    net.reply(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"ok"))
    _assert_parse_error(_failure_of(d))


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(OK + b"HTTP/1.1 200 OK\r\n", id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"ok") + b"x",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\nx", id="no-body"),
    ],
)
def test_bytes_after_the_body_make_connection_unreusable(net, response):
    """More bytes than the framing announced: the body is delivered, the connection closed."""
    _, reader = net.exchange(response)
    assert reader.reason.check(ResponseDone)
    assert net.transport.disconnecting
    assert net.pool.idle_count == 0


# --- 4. fields --------------------------------------------------------------


def test_connection_control_fields_are_removed(net):
    """Connection-control and framing fields never reach ``response.headers``."""
    response, _ = net.exchange(
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Connection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"TE: trailers\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"X-End: 1\r\n"
        b"\r\n" + _chunked(b"ok")
    )
    assert response.headers == [(b"Content-Type", b"text/plain"), (b"X-End", b"1")]


def test_content_length_is_removed_outside_head(net):
    """Content-Length is framing for a GET: it is given as ``length``, not as a field."""
    response, _ = net.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok")
    assert response.headers == [(b"X-A", b"1")]
    assert response.length == 2


def test_fields_named_by_connection_are_removed(net):
    """Fields named by Connection are dropped with it, in any case (RFC 9110 §7.6.1)."""
    response, _ = net.exchange(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Hop, x-other-HOP\r\n"
        b"x-hop: 1\r\n"
        b"X-Keep: 2\r\n"
        b"Connection: X-Third\r\n"
        b"X-Other-Hop: 3\r\n"
        b"X-Third: 4\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert response.headers == [(b"X-Keep", b"2")]


def test_repeated_fields_are_kept_in_order_with_their_spelling(net):
    """Repeated fields stay separate and in the order received, names as the upstream spelt them."""
    response, _ = net.exchange(
        b"HTTP/1.1 200 OK\r\n"
        b"Set-Cookie: a=1\r\n"
        b"x-trace: t\r\n"
        b"set-cookie: b=2\r\n"
        b"Set-Cookie:c=3  \r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert response.headers == [
        (b"Set-Cookie", b"a=1"),
        (b"x-trace", b"t"),
        (b"set-cookie", b"b=2"),
        (b"Set-Cookie", b"c=3"),
    ]


# --- 5. body arriving before deliverBody ------------------------------------


def test_whole_response_is_buffered_until_deliver_body(net):
    """A response read whole before deliverBody is handed over then; its connection is already free."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    seen_idle: list[int] = []
    d.addCallback(lambda response: seen_idle.append(net.pool.idle_count) or response)
    response = _result_of(d)
    assert seen_idle == [1]
    reader = read_body(response)
    assert reader.body == b"hello" and reader.reason.check(ResponseDone)


def test_complete_body_is_taken_whole_once(net):
    """A body that came whole with its head can be taken at once; it is not delivered again."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo")
    response = _result_of(d)
    assert response.complete_body() == b"hello"
    reader = read_body(response)
    assert reader.body == b"" and reader.reason.check(ResponseDone)


def test_complete_body_is_none_while_the_body_is_arriving(net):
    """Part of a body, or one read until close, is not complete: the relay reads it as it comes."""
    partial = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert _result_of(partial).complete_body() is None
    unframed = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert _result_of(unframed).complete_body() is None


def test_next_request_on_freed_connection_leaves_pending_body_alone(net):
    """A second exchange on the freed connection does not touch the first response's unread body."""
    first = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    first_response = _result_of(first)
    second = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    second_reader = read_body(_result_of(second))
    first_reader = read_body(first_response)
    assert len(net.connections) == 1
    assert (first_reader.body, second_reader.body) == (b"one", b"two")
    assert first_reader.reason.check(ResponseDone) and second_reader.reason.check(ResponseDone)


def test_body_received_then_reset_before_deliver_body_is_reported(net):
    """Bytes and a reset that both came before deliverBody are handed over in that order."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    response = _result_of(d)
    net.lose(ConnectionLost)
    reader = read_body(response)
    assert reader.body == b"part"
    assert reader.reason.check(ResponseBroken)
    assert reader.reason.value.reasons[0].check(ConnectionLost)


# --- 6. back-pressure -------------------------------------------------------


def test_pause_and_resume_reach_the_socket(net):
    """The body protocol pausing and resuming its transport pauses and resumes the connection."""
    reader = _reading(net)
    reader.transport.pauseProducing()
    assert net.transport.producerState == "paused"
    reader.transport.resumeProducing()
    assert net.transport.producerState == "producing"


def test_stop_producing_aborts_the_connection(net):
    """The body protocol stopping its transport aborts the connection, which is never pooled."""
    reader = _reading(net)
    net.reply(b"abc")
    reader.transport.stopProducing()
    assert net.transport.aborted
    net.reply(b"defghij")
    assert reader.body == b"abc"
    net.lose(ConnectionAborted)
    assert reader.reason.check(ResponseBroken)
    assert net.pool.idle_count == 0


def test_connection_released_while_paused_is_resumed(net):
    """A connection whose body ends while its reader is paused goes back to the pool reading again."""
    reader = _reading(net)
    reader.transport.pauseProducing()
    net.reply(b"0123456789")
    assert reader.reason.check(ResponseDone)
    assert net.transport.producerState == "producing"
    assert net.pool.idle_count == 1


def test_pausing_a_finished_response_leaves_the_pooled_connection_alone(net):
    """A reader pausing or stopping after its body ended does not touch the reused connection."""
    _, reader = net.exchange(OK)
    net.request()
    reader.transport.pauseProducing()
    reader.transport.stopProducing()
    assert net.transport.producerState == "producing"
    assert not net.transport.disconnecting


class StopOnData(BodyReader):
    """A reader that gives up as soon as it gets data (say, the body is too large)."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.stopProducing()


def test_stop_producing_on_the_last_bytes_keeps_connection_out_of_pool(net):
    """A reader that stops on the body's last bytes leaves its connection aborted, not pooled."""
    d = net.request()
    net.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    _result_of(d).deliverBody(StopOnData())
    net.reply(b"0123456789")
    assert net.transport.aborted
    assert net.pool.idle_count == 0


# --- 7. failures ------------------------------------------------------------


@pytest.mark.parametrize("error", [ConnectionDone, ConnectionLost])
def test_connection_lost_before_any_byte_is_response_never_received(net, error):
    """A connection ending before any response byte fails as NoResponse, retryable."""
    d = net.request()
    net.lose(error)
    failure = _failure_of(d)
    assert failure.check(NoResponse)
    assert failure.value.reasons[0].check(error)
    assert is_connection_failure(failure)
    assert failure_reason(failure) == "reset"


def test_connection_lost_after_some_bytes_is_response_failed(net):
    """A connection ending inside the response head fails as ResponseBroken, not retryable."""
    d = net.request()
    net.reply(b"HTTP/1.1 2")
    net.lose(ConnectionDone)
    failure = _failure_of(d)
    assert failure.check(ResponseBroken) and not failure.check(NoResponse)
    assert not is_connection_failure(failure)


def test_connection_lost_mid_body_fails_the_body(net):
    """A connection ending before the announced length is a ResponseBroken for the body."""
    reader = _reading(net)
    net.reply(b"abc")
    net.lose(ConnectionDone)
    assert reader.body == b"abc"
    assert reader.reason.check(ResponseBroken)
    assert net.pool.idle_count == 0


def test_cancelling_aborts_the_connection(net):
    """Cancelling a call waiting for its head fails it with CancelledError and aborts the connection."""
    d = net.request()
    d.cancel()
    assert _failure_of(d).check(defer.CancelledError)
    assert net.transport.aborted
    net.lose(ConnectionAborted)
    net.reply(b"HTTP/1.1 200 OK\r\n\r\n")
    assert net.pool.idle_count == 0


def test_cancelling_while_connecting_cancels_the_connect():
    """Cancelling before the connection is made cancels the connect attempt."""
    cancelled: list[object] = []

    def connect() -> defer.Deferred[Any]:
        def cancel(d: defer.Deferred[Any]) -> None:
            cancelled.append(d)
            d.errback(ConnectingCancelledError(None))

        return defer.Deferred(cancel)

    pool = ConnectionPool(Clock(), FakeEndpoints(connect_with=connect), 4, 30)
    d = pool.request(b"GET", URL, None, None)
    d.cancel()
    assert _failure_of(d).check(ConnectingCancelledError)
    assert len(cancelled) == 1


def test_connect_failure_is_passed_through():
    """A refused connect fails the call with the endpoint's own error."""
    endpoints = FakeEndpoints(connect_with=lambda: defer.fail(ConnectionRefusedError()))
    pool = ConnectionPool(Clock(), endpoints, 4, 30)
    failure = _failure_of(pool.request(b"GET", URL, None, None))
    assert failure.check(ConnectionRefusedError)
    assert is_connection_failure(failure)


def test_unsolicited_data_closes_an_idle_connection(net):
    """An idle connection that receives bytes is closed and, once gone, never reused."""
    net.exchange(OK)
    idle = net.connection
    net.reply(b"HTTP/1.1 200 OK\r\n\r\n", connection=idle)
    assert idle.transport.disconnecting
    net.lose(ConnectionDone, connection=idle)
    assert net.pool.idle_count == 0
    net.request()
    assert len(net.connections) == 2


def test_unsolicited_data_takes_the_connection_out_of_the_pool_at_once(net):
    """An idle connection that receives bytes leaves the pool before its socket is gone."""
    net.exchange(OK)
    idle = net.connection
    net.reply(b"HTTP/1.1 200 OK\r\n\r\n", connection=idle)
    assert net.pool.idle_count == 0
    net.request()
    assert len(net.connections) == 2


def test_idle_connection_closed_by_upstream_leaves_the_pool(net):
    """An idle connection the upstream closes is removed from the pool."""
    net.exchange(OK)
    assert net.pool.idle_count == 1
    net.lose(ConnectionDone)
    assert net.pool.idle_count == 0
    net.request()
    assert len(net.connections) == 2


# --- 8. pool ----------------------------------------------------------------


def _open(net: Network, count: int, url: bytes = URL) -> list[Any]:
    """``count`` calls in flight at once (so on as many connections); returns the connections."""
    for _ in range(count):
        net.request(b"GET", url)
    return net.connections[-count:]


def _answer(net: Network, *connections: Any) -> None:
    """Complete the call on each connection, in order (each then goes back to the pool)."""
    for connection in connections:
        net.reply(OK, connection=connection)


def test_busy_connections_are_not_shared(net):
    """A call never waits for a busy connection: each call in flight gets its own."""
    first, second = _open(net, 2)
    assert first is not second
    assert net.pool.idle_count == 0


def test_most_recently_released_connection_is_reused_first(net):
    """The pool reuses the connection released last."""
    first, second = _open(net, 2)
    _answer(net, first, second)
    for connection in (first, second):
        net.sent(connection)
    net.request()
    assert net.sent(first) == b""
    assert net.sent(second).startswith(b"GET /items ")


def test_idle_connections_beyond_the_limit_close_the_oldest():
    """Releasing past max_idle_per_host closes the connection idle the longest."""
    net = Network(max_idle_per_host=2)
    first, second, third = _open(net, 3)
    _answer(net, first, second, third)
    assert first.transport.disconnecting
    assert not second.transport.disconnecting and not third.transport.disconnecting
    assert net.pool.idle_count == 2


def test_idle_limit_is_per_host():
    """Each upstream keeps its own idle connections, up to the limit."""
    net = Network(max_idle_per_host=1)
    here = _open(net, 1, b"http://a.local/")
    there = _open(net, 1, b"http://b.local/")
    _answer(net, *here, *there)
    assert net.pool.idle_count == 2
    assert not any(c.transport.disconnecting for c in here + there)
    net.request(b"GET", b"http://a.local:8080/")
    assert len(net.connections) == 3


def test_idle_timeout_closes_only_connections_idle_that_long():
    """The sweep closes connections idle for idle_timeout and keeps the younger ones."""
    net = Network(idle_timeout=10)
    old, young = _open(net, 2)
    _answer(net, old)
    net.clock.advance(6)
    _answer(net, young)
    net.clock.advance(3.5)
    assert not old.transport.disconnecting
    net.clock.advance(0.5)
    assert old.transport.disconnecting and not young.transport.disconnecting
    assert net.pool.idle_count == 1
    net.clock.advance(5.5)
    assert not young.transport.disconnecting
    net.clock.advance(0.5)
    assert young.transport.disconnecting
    assert net.pool.idle_count == 0
    assert net.clock.getDelayedCalls() == []


def test_connection_in_use_is_not_swept():
    """A connection taken from the pool is not swept, and idles afresh once released."""
    net = Network(idle_timeout=10)
    net.exchange(OK)
    net.clock.advance(5)
    busy = net.request()
    net.clock.advance(5)
    assert not net.transport.disconnecting
    net.clock.advance(2)
    net.reply(OK)
    assert read_body(_result_of(busy)).body == b"ok"
    net.clock.advance(9.5)
    assert not net.transport.disconnecting
    net.clock.advance(0.5)
    assert net.transport.disconnecting
    assert len(net.connections) == 1


def test_close_closes_idle_connections_and_fires_when_they_are_gone(net):
    """``close()`` closes the idle connections, not busy ones, and fires once the idle ones are gone."""
    first, second, busy = _open(net, 3)
    _answer(net, first, second)
    closing = net.pool.close()
    assert first.transport.disconnecting and second.transport.disconnecting
    assert not busy.transport.disconnecting
    assert net.pool.idle_count == 0
    assert net.clock.getDelayedCalls() == []
    net.lose(ConnectionDone, connection=first)
    assert not closing.called
    net.lose(ConnectionDone, connection=second)
    assert _result_of(closing) is None


def test_close_without_idle_connections_fires_at_once(net):
    """``close()`` on a pool with nothing idle has nothing to wait for."""
    assert _result_of(net.pool.close()) is None
