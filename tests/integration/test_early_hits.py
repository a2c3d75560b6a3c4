"""Cache hits answered at their head, against the same hits answered through twisted.web.

Two gateways with the same settings serve the same upstream: one answers
fresh hits at their head (`deltagw.web.early_hits`), the other has that
turned off, so every request goes through twisted.web. Hypothesis draws
(with a fixed seed) the requests a client sends and the cacheable answers
an upstream gives: fields repeated, in odd spellings, with whitespace,
Vary, the upstream's own Cache-Status and Age, CORS origins, request ids,
trace context, forwarded fields, request directives, HEAD, statuses that
carry no content. Each case is asked twice of each gateway (the miss that
stores, then the hit) on fresh connections, and the two gateways' bytes
must be the same, but for what differs between any two answers (the
request id the gateway made up, the clock's seconds), and so must their
access log lines. Each answer must parse with h11, and the early path must
have answered the hits it can.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.support import OneAnswerUpstream, RawUpstream, RunningGateway, listen, wait_until

CASES = 200
"""Drawn cases per gateway configuration."""

_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

_REQUEST_FIELDS = [
    (b"Accept", b"application/json"), (b"Accept", b"text/plain"), (b"accept", b"*/*"),
    (b"Origin", b"https://app.example"), (b"Origin", b"https://elsewhere.example"),
    (b"X-Request-ID", b"client-id-1"), (b"X-Request-ID", b"not a valid id"),
    (b"traceparent", _TRACEPARENT), (b"tracestate", b"vendor=1"),
    (b"X-Forwarded-For", b"203.0.113.9"), (b"X-Forwarded-Host", b"elsewhere.example"),
    (b"X-Forwarded-Proto", b"https"), (b"Cache-Control", b"max-stale=100"),
    (b"Cache-Control", b"no-cache"), (b"Cache-Control", b"max-age=0"),
    (b"Cache-Control", b"only-if-cached"), (b"Pragma", b"no-cache"),
    (b"User-Agent", b"  spaced\t "), (b"X-Empty", b""), (b"X_Underscored", b"1"),
    (b"X-User-ID", b"forged"), (b"Authorization", b"Bearer t"), (b"Connection", b"keep-alive"),
    (b"Connection", b"Keep-Alive, CLOSE"), (b"Connection", b"close,keep-alive"),
    (b"Connection", b"X-Named"), (b"X-Named", b"dropped upstream"),
    (b"Accept-Encoding", b"gzip"), (b"If-None-Match", b'"v1"'),
]

_ANSWER_FIELDS = [
    (b"Content-Type", b"application/json"), (b"ETag", b'"v1"'), (b"etag", b'"v2"'),
    (b"Date", b"Sat, 05 Dec 2026 10:00:00 GMT"), (b"Last-Modified", b"Fri, 04 Dec 2026 10:00:00 GMT"),
    (b"Vary", b"Accept"), (b"Vary", b"Origin"), (b"Vary", b"Accept-Encoding, Accept"),
    (b"Cache-Status", b"upstream-cache; hit"), (b"Age", b"5"), (b"Link", b"</a>; rel=a"),
    (b"Link", b"</b>; rel=b"), (b"x-lower-case", b"v"), (b"X-UPPER-CASE", b"V"),
    (b"Server", b"nginx"), (b"Access-Control-Allow-Origin", b"*"), (b"X-Request-ID", b"theirs"),
    (b"Content-Language", b"en"), (b"WWW-Authenticate", b"Bearer"), (b"X-Empty-Answer", b""),
]

_LIFETIMES = [
    b"max-age=60", b"public, max-age=60", b"s-maxage=60", b"max-age=60, stale-while-revalidate=30",
    b"max-age=0, stale-while-revalidate=60", b"max-age=0, stale-if-error=60", b"max-age=60, must-revalidate",
]


@dataclass(frozen=True)
class Case:
    """One request asked twice, and the upstream's answer to it."""

    path: str
    method: bytes
    request_fields: tuple[tuple[bytes, bytes], ...]
    status: int
    answer_fields: tuple[tuple[bytes, bytes], ...]
    body: bytes


_CASES = st.builds(
    Case,
    path=st.sampled_from(["/api/data/products", "/api/v1/data/chain/NIFTY", "/api/data/underlying/BANKNIFTY"]),
    method=st.sampled_from([b"GET", b"GET", b"HEAD"]),
    request_fields=st.lists(st.sampled_from(_REQUEST_FIELDS), max_size=5).map(tuple),
    status=st.sampled_from([200, 200, 200, 203, 204, 301, 404, 410]),
    answer_fields=st.tuples(
        st.sampled_from(_LIFETIMES),
        st.lists(st.sampled_from(_ANSWER_FIELDS), max_size=6),
    ).map(lambda drawn: ((b"Cache-Control", drawn[0]), *drawn[1])),
    body=st.binary(max_size=64),
)


def drawn_cases() -> list[Case]:
    cases: list[Case] = []

    @settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
    @given(_CASES)
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    return cases


def _answer_bytes(case: Case) -> bytes:
    lines = [b"HTTP/1.1 %d Whatever\r\n" % case.status]
    lines += [name + b": " + value + b"\r\n" for name, value in case.answer_fields]
    body = b"" if case.status == 204 else case.body
    if case.status != 204:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    return b"".join(lines) + b"Connection: close\r\n\r\n" + body


def _request_bytes(method: bytes, target: bytes, fields: tuple[tuple[bytes, bytes], ...]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1\r\n", b"Host: gw.example\r\n"]
    lines += [name + b": " + value + b"\r\n" for name, value in fields]
    return b"".join(lines) + b"\r\n"


# ------------------------------------------------------------------ the parties


class _OneAnswer(protocol.Protocol):
    """Sends one request and keeps the one answer, read with h11; then closes."""

    def __init__(self, data: bytes, method: bytes) -> None:
        self.data = data
        self.received = b""
        self.parser = h11.Connection(h11.CLIENT)
        self.parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self.parser.send(h11.EndOfMessage())
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.parser.receive_data(data)
        while True:
            event = self.parser.next_event()  # raises on bytes h11 rejects
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.EndOfMessage):
                self.transport.loseConnection()
                if not self.done.called:
                    self.done.callback(self.received)
                return

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(AssertionError(f"closed before one whole answer: {self.received!r}"))


@dataclass
class _Pair:
    early: RunningGateway
    through_twisted: RunningGateway
    upstream: OneAnswerUpstream
    answered_early: list[bool]


_SETTINGS = {
    "wildcard CORS": {},
    "listed origins, no Server field": {
        "CORS_ORIGINS": "https://app.example", "SERVER_HEADER": "",
    },
    "behind a trusted proxy": {"TRUSTED_PROXIES": "127.0.0.0/8"},
}


@pytest.fixture(scope="module", params=list(_SETTINGS), ids=list(_SETTINGS))
def pair(request: Any) -> Iterator[_Pair]:
    upstream = OneAnswerUpstream()
    listening = listen(RawUpstream(upstream.on_request))
    env = {
        "STORAGE_SERVICE_URL": listening.url, "RETRIES": "0", "BREAKER_FAILURES": "1000000",
        "RATE_LIMIT_REQUESTS": "100000", "RATE_LIMIT_WINDOW": "3600", **_SETTINGS[request.param],
    }
    early, through_twisted = RunningGateway(env), RunningGateway(env)
    for gateway in (early, through_twisted):
        pytest_twisted.blockon(defer.ensureDeferred(gateway.start()))
    through_twisted.service.site.early_hits = None
    answered: list[bool] = []
    hits = early.service.site.early_hits
    answer = hits.answer
    hits.answer = lambda *args: answered.append(answer(*args)) or answered[-1]
    yield _Pair(early, through_twisted, upstream, answered)
    for gateway in (early, through_twisted):
        pytest_twisted.blockon(defer.ensureDeferred(gateway.stop()))
    pytest_twisted.blockon(defer.maybeDeferred(listening.port.stopListening))


async def _ask(gateway: RunningGateway, data: bytes, method: bytes) -> bytes:
    client = _OneAnswer(data, method)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_number), client)
    return await client.done.addTimeout(10, reactor)


_MADE_UP = {b"x-request-id", b"date", b"age", b"ratelimit", b"x-ratelimit-remaining",
            b"x-ratelimit-reset", b"cache-status"}
"""Fields whose digits differ between two answers made at different moments."""


def _comparable(answer: bytes, case: Case) -> bytes:
    given_id = _given_id(case)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        lower = name.lower()
        if lower == b"x-request-id" and not given_id:
            value = b"(made up)"
        elif lower in _MADE_UP:
            value = re.sub(rb"[0-9]+", b"#", value)
        out.append(name + b": " + value)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def _given_id(case: Case) -> bool:
    """Whether the gateway takes the request id from the client (the last one given, if valid)."""
    ids = [value for name, value in case.request_fields if name == b"X-Request-ID"]
    return bool(ids) and ids[-1] == b"client-id-1"


def _comparable_log(event: dict[str, Any], case: Case) -> dict[str, Any]:
    made_up = {"timestamp", "latency_ms", "upstream_latency_ms", "trace_id", "request_id"}
    if _given_id(case):
        made_up.remove("request_id")
    if case.request_fields.count((b"traceparent", _TRACEPARENT)) == 1:
        made_up.remove("trace_id")
    return {k: ("(made up)" if k in made_up else v) for k, v in event.items()}


@pytest_twisted.ensureDeferred
async def test_a_hit_at_its_head_is_byte_for_byte_the_hit_through_twisted_web(pair, access_log):
    """Every drawn case: the same status line, fields in the same order and spelling, the
    same content and the same access log line, both ways; the early path answered."""
    for number, case in enumerate(drawn_cases()):
        pair.upstream.answer = _answer_bytes(case)
        target = f"{case.path}?case={number}".encode()
        answers, logs = [], []
        for gateway in (pair.early, pair.through_twisted):
            logged = len(access_log)
            await _ask(gateway, _request_bytes(b"GET", target, case.request_fields), b"GET")
            hit = await _ask(gateway, _request_bytes(case.method, target, case.request_fields),
                             case.method)
            await wait_until(lambda: len(access_log) == logged + 2)
            answers.append(hit)
            logs.append(_comparable_log(access_log[-1], case))
            if gateway is pair.early:
                early = pair.answered_early[-2:]
        assert _comparable(answers[0], case) == _comparable(answers[1], case), (case, answers)
        assert logs[0] == logs[1], (case, logs)
        assert early[0] is False, case  # the miss
        status = re.search(rb"\r\nCache-Status: deltagw; (hit; ttl=-?)", answers[1])
        if status is None:  # forwarded: never answered early
            assert early[1] is False, case
        elif status.group(1) == b"hit; ttl=":  # fresh: early, unless it must go to twisted.web
            assert early[1] is not _asks_for_twisted_web(case), case


def _asks_for_twisted_web(case: Case) -> bool:
    return any(
        name == b"Authorization" or (name == b"Connection" and b"close" in value.lower())
        for name, value in case.request_fields
    )


@pytest_twisted.ensureDeferred
async def test_a_plain_hit_is_answered_at_its_head_and_never_reaches_the_upstream(pair):
    """The common hit: a GET with Host alone, asked again; answered early, once upstream."""
    pair.upstream.answer = _answer_bytes(Case("", b"GET", (), 200, ((b"Cache-Control", b"max-age=60"),), b"{}"))
    seen = len(pair.upstream.received)
    answered = len(pair.answered_early)
    request = _request_bytes(b"GET", b"/api/data/products?plain", ())
    await _ask(pair.early, request, b"GET")
    hit = await _ask(pair.early, request, b"GET")
    # The reason phrase is the upstream's own, as through twisted.web.
    assert hit.startswith(b"HTTP/1.1 200 Whatever\r\n") and hit.endswith(b"\r\n\r\n{}")
    assert b"\r\nCache-Status: deltagw; hit; ttl=" in hit
    assert pair.answered_early[answered:] == [False, True]
    assert len(pair.upstream.received) == seen + 1


class _Answers(protocol.Protocol):
    """Keeps a connection open and reads answers with h11, one request at a time."""

    def __init__(self) -> None:
        self.parser = h11.Connection(h11.CLIENT)
        self.answers: list[tuple[int, bytes]] = []
        self._body = b""

    def send(self, raw: bytes, requests: int) -> None:
        """Write ``raw``, which holds ``requests`` GETs (h11 is told of them in turn)."""
        self.expected = len(self.answers) + requests
        self._unsent = requests
        self._tell_parser()
        self.transport.write(raw)

    def _tell_parser(self) -> None:
        if self._unsent and self.parser.our_state is h11.IDLE:
            self._unsent -= 1
            self.parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            self.parser.send(h11.EndOfMessage())

    def dataReceived(self, data: bytes) -> None:
        self.parser.receive_data(data)
        while (event := self.parser.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.answers.append((self._status, self._body))
                self._body = b""
                self.parser.start_next_cycle()
                self._tell_parser()


@pytest_twisted.ensureDeferred
async def test_hits_and_misses_on_one_connection_are_answered_in_order(pair):
    """A keep-alive connection: a miss, a hit answered early, then a hit and a miss written
    together (pipelined: twisted.web answers both, in order); each answer is its own."""
    pair.upstream.answer = _answer_bytes(
        Case("", b"GET", (), 200, ((b"Cache-Control", b"max-age=60"),), b"first"))
    client = _Answers()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", pair.early.port_number), client)
    answered = len(pair.answered_early)
    hot = _request_bytes(b"GET", b"/api/data/products?in-order", ())
    for raw in (hot, hot):
        client.send(raw, 1)
        await wait_until(lambda: len(client.answers) == client.expected)
    assert pair.answered_early[answered:] == [False, True]
    pair.upstream.answer = _answer_bytes(Case("", b"GET", (), 404, (), b"cold"))
    client.send(hot + _request_bytes(b"GET", b"/api/data/products?cold", ()), 2)
    await wait_until(lambda: len(client.answers) == client.expected)
    assert client.answers == [(200, b"first")] * 3 + [(404, b"cold")]
    assert pair.answered_early[answered + 2:] == []  # two heads at once: twisted.web's
    client.transport.loseConnection()
