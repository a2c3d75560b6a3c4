"""Circuit breaker, retries and load shedding, in the proxy and end to end."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from deltagw.errors import UpstreamUnavailable
from deltagw.routes import STORAGE
from deltagw.upstream.proxy import Proxy
from deltagw.upstream.retry import RetryPolicy
from tests.support import RawUpstream, closed_port_url, listen, raw_exchange, wait_until

# -- the proxy on a fake clock -------------------------------------------------


class FakeRequest:
    """Just what Proxy touches before the response starts."""

    def __init__(self, method: bytes = b"GET") -> None:
        self.method = method
        self.content = io.BytesIO()
        self.requestHeaders = Headers()
        self.notes: list[str | None] = []

    def note_upstream(self, service: str, started: float, failure: str | None) -> None:
        self.notes.append(failure)


class ScriptedClient:
    """An upstream client whose calls fail as refused, or hang until cancelled."""

    def __init__(self, hang: bool = False) -> None:
        self.pool = self
        self.calls = 0
        self.hang = hang

    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.hang:
            return defer.Deferred(lambda d: None)
        return defer.fail(error.ConnectionRefusedError())


def _forward(proxy: Proxy, request: FakeRequest | None = None) -> defer.Deferred[Any]:
    request = request or FakeRequest()
    return defer.ensureDeferred(
        proxy.forward(request, STORAGE, "http://s/products", Headers(), 10, request.note_upstream)
    )


def _unavailable(d: defer.Deferred[Any]) -> UpstreamUnavailable:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the forward has not failed"
    assert isinstance(failures[0].value, UpstreamUnavailable), failures[0]
    return failures[0].value


def _retry_after(e: UpstreamUnavailable) -> int:
    return int(dict(e.headers)[b"Retry-After"])


def test_open_circuit_answers_at_once_with_time_left_rounded_up() -> None:
    """Once open, the proxy answers 503 without calling, Retry-After the whole seconds left."""
    clock = Clock()
    client = ScriptedClient()
    proxy = Proxy(clock, client, breaker_failures=2, breaker_reset=30, retry=RetryPolicy(retries=0))
    assert [_unavailable(_forward(proxy)).reason for _ in range(2)] == ["refused", "refused"]
    assert proxy.breakers["storage"].state == "open"
    clock.advance(0.5)
    request = FakeRequest()
    rejected = _unavailable(_forward(proxy, request))
    assert (rejected.reason, rejected.status, _retry_after(rejected)) == ("circuit_open", 503, 30)
    assert request.notes == ["circuit_open"]
    clock.advance(29.4)
    assert _retry_after(_unavailable(_forward(proxy))) == 1
    assert client.calls == 2


def test_half_open_probe_is_not_retried_and_reopens() -> None:
    """After the reset period one probe is let through, alone and without retry; its failure reopens."""
    clock = Clock()
    client = ScriptedClient()
    retry = RetryPolicy(retries=3, random=lambda: 0.5)  # 100 ms backoffs
    proxy = Proxy(clock, client, breaker_failures=1, breaker_reset=5, retry=retry)
    first = _forward(proxy)
    clock.advance(0.1)
    clock.advance(0.1)
    clock.advance(0.1)
    assert _unavailable(first).reason == "refused"
    assert client.calls == 4  # closed: the first call and its three retries
    clock.advance(5)
    assert _unavailable(_forward(proxy)).reason == "refused"
    assert client.calls == 5
    assert proxy.breakers["storage"].state == "open"


def test_client_gone_frees_probe_without_deciding() -> None:
    """A probe cancelled because the client left neither closes nor reopens the circuit."""
    clock = Clock()
    client = ScriptedClient()
    proxy = Proxy(clock, client, breaker_failures=1, breaker_reset=5, retry=RetryPolicy(retries=0))
    _unavailable(_forward(proxy))
    clock.advance(5)
    client.hang = True
    probe = _forward(proxy)
    assert proxy.breakers["storage"].state == "half_open"
    probe.cancel()
    _cancelled(probe)
    assert proxy.breakers["storage"].state == "half_open"
    next_probe = _forward(proxy)
    assert client.calls == 3  # the next caller may probe
    next_probe.cancel()
    _cancelled(next_probe)


def _cancelled(d: defer.Deferred[Any]) -> None:
    """The call ended as cancelled: no 503 is made for a client that left."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(defer.CancelledError)


def test_calls_beyond_max_in_flight_are_shed() -> None:
    """Past MAX_IN_FLIGHT a call is answered 503 "shed" at once; a freed slot admits the next."""
    clock = Clock()
    client = ScriptedClient(hang=True)
    proxy = Proxy(clock, client, max_in_flight=2)
    first, second = _forward(proxy), _forward(proxy)
    assert proxy.in_flight["storage"] == 2
    shed = _unavailable(_forward(proxy))
    assert (shed.reason, shed.status, _retry_after(shed)) == ("shed", 503, 1)
    assert client.calls == 2
    first.cancel()
    _cancelled(first)
    assert proxy.in_flight["storage"] == 1
    third = _forward(proxy)
    assert client.calls == 3
    clock.advance(10)
    assert proxy.in_flight["storage"] == 0
    assert [_unavailable(d).reason for d in (second, third)] == ["timeout", "timeout"]


def test_shedding_is_per_service() -> None:
    """A saturated service does not shed calls to another one."""
    from deltagw.routes import ANALYTICS

    proxy = Proxy(Clock(), ScriptedClient(hang=True), max_in_flight=1)
    storage = _forward(proxy)
    analytics = defer.ensureDeferred(
        proxy.forward(FakeRequest(), ANALYTICS, "http://a/pcr/X", Headers(), 10, FakeRequest().note_upstream)
    )
    assert proxy.in_flight == {"auth": 0, "storage": 1, "analytics": 1}
    assert not analytics.called
    for d in (storage, analytics):
        d.cancel()
        _cancelled(d)


# -- end to end, with real misbehaving upstreams -------------------------------


def _answer(status: bytes, body: bytes = b'{"error":"down"}'):
    def answer(transport: Any, _: bytes) -> None:
        transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    return answer


def _reset(transport: Any, _: bytes) -> None:
    transport.abortConnection()


async def _json(response: Any) -> Any:
    return json.loads(await response.content())


class _BreakerEvents:
    """Collects the breaker's log events while active."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        message = str(event.get("message", ""))
        if '"circuit_breaker"' in message:
            self.events.append(json.loads(str(event["message"][0])))

    def __enter__(self) -> _BreakerEvents:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *_: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def states(self) -> list[tuple[str, str]]:
        return [(e["previous_state"], e["state"]) for e in self.events]


@pytest_twisted.ensureDeferred
async def test_failing_statuses_open_circuit_and_are_passed_through(make_gateway):
    """502/503/504 reach the client unchanged and count; then the gateway answers 503 itself."""
    raw = RawUpstream(_answer(b"503 Service Unavailable"))
    listening = listen(raw)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=listening.url, BREAKER_FAILURES="3", BREAKER_RESET="30"
        )
        with _BreakerEvents() as log:
            for _ in range(3):
                response = await gateway.get("/api/data/products")
                assert (response.code, await _json(response)) == (503, {"error": "down"})
            response = await gateway.get("/api/data/products")
            assert (await _json(response))["error"] == "Storage service unavailable"
            assert response.headers.getRawHeaders(b"retry-after") == [b"30"]
        assert raw.accepted == 3
        assert log.states() == [("closed", "open")]
        assert log.events[0]["service"] == "storage"
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_storm_against_dead_upstream_costs_one_probe_per_reset(make_gateway):
    """Hundreds of requests against a dead upstream open only one connection per reset period."""
    raw = RawUpstream(_reset)
    listening = listen(raw)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=listening.url, BREAKER_FAILURES="2", BREAKER_RESET="0.5",
            RATE_LIMIT_REQUESTS="0",
        )
        with _BreakerEvents() as log:
            for _ in range(2):
                assert (await gateway.get("/api/data/products")).code == 503
            assert raw.accepted == 4  # each of the two GETs was retried once
            started = reactor.seconds()
            answered = 0
            while reactor.seconds() - started < 1.3:
                batch = [defer.ensureDeferred(gateway.get("/api/data/products")) for _ in range(20)]
                for response in await defer.gatherResults(batch):
                    assert response.code == 503
                    assert (await _json(response))["error"] == "Storage service unavailable"
                    answered += 1
            elapsed = reactor.seconds() - started
        probes = raw.accepted - 4
        assert answered >= 100
        assert 1 <= probes <= int(elapsed / 0.5) + 1, (probes, elapsed)
        # Each transition once: opened, then per probe half-open and reopened.
        assert log.states() == [("closed", "open")] + [("open", "half_open"), ("half_open", "open")] * probes
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_successful_probe_closes_circuit(make_gateway, upstream):
    """Once the upstream is back, the first probe after the reset period closes the circuit."""
    healthy = upstream.respond
    upstream.respond = lambda request, seen: (request.setResponseCode(502), b"{}")[1]
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, BREAKER_FAILURES="1", BREAKER_RESET="0.2"
    )
    assert (await gateway.get("/api/data/products")).code == 502
    rejected = await gateway.get("/api/data/products")
    assert (await _json(rejected))["error"] == "Storage service unavailable"
    upstream.respond = healthy
    await wait_until(lambda: gateway.service.proxy.breakers["storage"].retry_after == 0)
    assert (await gateway.get("/api/data/products")).code == 200
    assert gateway.service.proxy.breakers["storage"].state == "closed"
    assert len(upstream.seen) == 2


class _ResetFirst(protocol.Factory):
    """Resets the first connection before answering; echoes the request body on later ones."""

    def __init__(self) -> None:
        self.accepted = 0
        self.bodies: list[bytes] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.accepted += 1
        return _ResetFirstProtocol(self, first=self.accepted == 1)


class _ResetFirstProtocol(protocol.Protocol):
    def __init__(self, factory: _ResetFirst, first: bool) -> None:
        self.factory, self.first, self.buffer = factory, first, b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        if self.first:
            self.transport.abortConnection()
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self.factory.bodies.append(body)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.buffer = b""


@pytest_twisted.ensureDeferred
async def test_get_retried_after_reset_before_answer_with_whole_body(make_gateway):
    """A GET whose connection is reset before any response byte is sent again, body included."""
    flaky = _ResetFirst()
    listening = listen(flaky)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url)
        response = await gateway.request("GET", "/api/data/products", data=b"q" * 70000)
        assert response.code == 200
        assert await response.content() == b"q" * 70000
        assert flaky.accepted == 2 and flaky.bodies == [b"q" * 70000]
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_post_is_never_retried(make_gateway):
    """A POST whose connection is reset is answered 503, not sent again."""
    flaky = _ResetFirst()
    listening = listen(flaky)
    try:
        gateway = await make_gateway(AUTH_SERVICE_URL=listening.url)
        response = await gateway.request("POST", "/api/auth/login", json={"email": "a"})
        assert (await _json(response))["error"] == "Auth service unavailable"
        assert flaky.accepted == 1
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_timeout_is_never_retried(make_gateway):
    """An upstream that accepts and never answers gets one attempt, then 503 at the timeout."""
    silent = RawUpstream(lambda transport, data: None)
    listening = listen(silent)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, STORAGE_TIMEOUT="0.3")
        started = reactor.seconds()
        response = await gateway.get("/api/data/products")
        assert response.code == 503
        assert reactor.seconds() - started >= 0.3
        assert silent.accepted == 1
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_partial_response_is_never_retried(make_gateway):
    """Once the status line has gone out, a cut body closes the client connection; no second attempt."""

    def head_then_reset(transport: Any, _: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        reactor.callLater(0.05, transport.abortConnection)

    raw = RawUpstream(head_then_reset)
    listening = listen(raw)
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url)
        received = await raw_exchange(
            gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"\r\n\r\nab")
        assert raw.accepted == 1
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_get_retried_once_then_503_quickly(make_gateway):
    """A refused GET is answered 503 after its retry, long before the service timeout
    (the backoff itself is timed on a Clock in tests/unit/test_retry.py)."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=closed_port_url(), STORAGE_TIMEOUT="30")
    started = reactor.seconds()
    response = await gateway.get("/api/data/products")
    assert (await _json(response))["error"] == "Storage service unavailable"
    assert reactor.seconds() - started < 10


@pytest_twisted.ensureDeferred
async def test_saturated_service_sheds_with_503(make_gateway, upstream):
    """With MAX_IN_FLIGHT calls hanging, the next request is answered 503 at once; the held ones complete."""
    held: list[Any] = []

    def hold(request: Any, seen: Any) -> Any:
        held.append(request)
        return NOT_DONE_YET

    upstream.respond = hold
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, MAX_IN_FLIGHT="2", RATE_LIMIT_REQUESTS="0"
    )
    # Three URLs: requests for one URL would wait for a single call (request coalescing).
    pending = [defer.ensureDeferred(gateway.get(f"/api/data/products?n={n}")) for n in range(2)]
    await wait_until(lambda: len(held) == 2)
    shed = await gateway.get("/api/data/products?n=2")
    assert (await _json(shed))["error"] == "Storage service unavailable"
    assert shed.headers.getRawHeaders(b"retry-after") == [b"1"]
    assert len(upstream.seen) == 2
    for request in held:
        request.write(b'{"ok":true}')
        request.finish()
    for response in await defer.gatherResults(pending):
        assert (response.code, await _json(response)) == (200, {"ok": True})
    upstream.respond = lambda request, seen: b"{}"
    assert (await gateway.get("/api/data/products")).code == 200
