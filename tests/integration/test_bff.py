"""The composed overview route: parallel parts, partial
answers, and the same auth, rate-limit, timeout and breaker rules as proxied
calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.server import NOT_DONE_YET

from deltagw.demo.analytics import AnalyticsBackend
from deltagw.demo.market import build_market
from deltagw.demo.storage import StorageBackend
from deltagw.errors import UpstreamUnavailable
from deltagw.routes import STORAGE
from deltagw.upstream.pools import UpstreamClient
from deltagw.upstream.proxy import Proxy
from deltagw.web.composition import summarise_chain
from tests.support import RecordingUpstream, closed_port_url, listen, wait_until

OVERVIEW = "/api/bff/overview/NIFTY"

UNDERLYING = {"product": "NIFTY", "count": 1, "ticks": [
    {"product": "NIFTY", "price": 22012.5, "timestamp": "2024-05-02T10:00:00+00:00"},
]}


def _quote(strike: float, last: float, iv: float, oi: int) -> dict[str, Any]:
    return {"strike": strike, "last_price": last, "bid": last - 1, "ask": last + 1,
            "volume": 10, "open_interest": oi, "iv": iv}


CHAIN = {
    "product": "NIFTY", "spot": 22012.5, "expiries": ["2024-05-09", "2024-05-16"],
    "expiry": "2024-05-09",
    "calls": [_quote(21900, 150, 0.14, 100), _quote(22000, 80, 0.13, 200),
              _quote(22100, 35, 0.125, 300)],
    "puts": [_quote(21900, 30, 0.15, 400), _quote(22000, 70, 0.135, 500),
             _quote(22100, 130, 0.13, 600)],
}
PCR = {"product": "NIFTY", "expiry": None, "pcr_oi": 2.5, "pcr_volume": 1.0,
       "total_call_oi": 600, "total_put_oi": 1500, "total_call_volume": 30,
       "total_put_volume": 30}

USERS = {b"tok-alice": ("17", "alice@example.com")}


class Backend(RecordingUpstream):
    """A storage or analytics service with canned answers by path prefix.

    ``answers`` maps a path prefix to ``(status, document)``; ``delay`` holds
    every answer that long (via callLater); ``hang`` prefixes never answer.
    """

    def __init__(self, answers: dict[str, tuple[int, Any]]) -> None:
        super().__init__()
        self.answers = answers
        self.delay = 0.0
        self.hang: set[str] = set()
        self.arrivals: list[float] = []
        self.answered: list[float] = []
        self.respond = self._answer

    def _answer(self, request: Any, seen: Any) -> Any:
        self.arrivals.append(reactor.seconds())
        path = seen.uri.decode().split("?")[0]
        prefix = next((p for p in self.answers if path.startswith(p)), None)
        if prefix in self.hang:
            return NOT_DONE_YET
        status, document = self.answers.get(prefix, (404, {"error": "Not found"}))

        def answer() -> bytes:
            self.answered.append(reactor.seconds())
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(document).encode()

        if not self.delay:
            return answer()

        def later() -> None:
            if not gone.called:
                request.write(answer())
                request.finish()

        gone = request.notifyFinish()
        call = reactor.callLater(self.delay, later)
        gone.addBoth(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET

    def paths(self) -> list[str]:
        return [seen.uri.decode() for seen in self.seen]


class Auth(RecordingUpstream):
    """An auth service whose /verify knows USERS."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = self._verify

    def _verify(self, request: Any, seen: Any) -> bytes:
        token = json.loads(seen.body or b"{}").get("token", "").encode()
        if token in USERS:
            user_id, email = USERS[token]
            return json.dumps({"valid": True, "user_id": user_id, "email": email}).encode()
        request.setResponseCode(401)
        return b'{"error":"Invalid token"}'


async def _serve(resource: Any) -> AsyncIterator[Any]:
    listening = listen(resource)
    resource.url = listening.url
    yield resource
    await listening.port.stopListening()


@pytest_twisted.async_yield_fixture
async def storage() -> AsyncIterator[Backend]:
    async for backend in _serve(Backend({"/underlying/": (200, UNDERLYING),
                                         "/option/chain/": (200, CHAIN)})):
        yield backend


@pytest_twisted.async_yield_fixture
async def analytics() -> AsyncIterator[Backend]:
    async for backend in _serve(Backend({"/pcr/": (200, PCR)})):
        yield backend


@pytest_twisted.async_yield_fixture
async def auth() -> AsyncIterator[Auth]:
    async for backend in _serve(Auth()):
        yield backend


@pytest.fixture
def start(make_gateway: Any, storage: Backend, analytics: Backend, auth: Auth) -> Any:
    """Start a gateway on the three backends, with extra settings."""

    async def run(**env: str) -> Any:
        return await make_gateway(**{
            "AUTH_SERVICE_URL": auth.url,
            "STORAGE_SERVICE_URL": storage.url,
            "ANALYTICS_SERVICE_URL": analytics.url,
            **env,
        })

    return run


async def _json(gateway: Any, path: str = OVERVIEW, **kwargs: Any) -> tuple[Any, Any]:
    response = await gateway.get(path, **kwargs)
    return response, json.loads(await response.content())


def _access_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(str(e["message"][0])) for e in events
            if "outgoing_response" in str(e.get("message"))]


@pytest_twisted.ensureDeferred
async def test_overview_combines_the_parts(start: Any, storage: Backend, analytics: Backend) -> None:
    """One document: latest tick, chain summary with ATM quotes and OI totals, and PCR."""
    gateway = await start()
    for prefix in ("/api", "/api/v1"):
        response, body = await _json(gateway, prefix + "/bff/overview/NIFTY")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert body == {
            "product": "NIFTY",
            "underlying": {"price": 22012.5, "timestamp": "2024-05-02T10:00:00+00:00"},
            "chain": {
                "spot": 22012.5, "expiry": "2024-05-09", "expiries": 2, "strikes": 3,
                "atm": {"strike": 22000, "call": {"last_price": 80, "iv": 0.13},
                        "put": {"last_price": 70, "iv": 0.135}},
                "total_call_oi": 600, "total_put_oi": 1500,
            },
            "pcr": {k: v for k, v in PCR.items() if k != "product"},
            "errors": [],
        }
    assert sorted(storage.paths()) == sorted(["/underlying/NIFTY?limit=1", "/option/chain/NIFTY"] * 2)
    assert analytics.paths() == ["/pcr/NIFTY"] * 2


@pytest_twisted.ensureDeferred
async def test_overview_against_the_demo_backends(make_gateway: Any) -> None:
    """Against the reference storage and analytics, the summary matches their own answers."""
    market = build_market()
    storage = listen(StorageBackend(market).app.resource())
    analytics = listen(AnalyticsBackend(market).app.resource())
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=storage.url,
                                     ANALYTICS_SERVICE_URL=analytics.url)
        response, body = await _json(gateway)
        assert response.code == 200 and body["errors"] == []
        _, chain = await _json(gateway, "/api/data/chain/NIFTY")
        _, ticks = await _json(gateway, "/api/data/underlying/NIFTY?limit=1")
        _, pcr = await _json(gateway, "/api/analytics/pcr/NIFTY")
        assert body["chain"] == summarise_chain(chain)
        assert body["chain"]["strikes"] == len(chain["calls"])
        assert abs(body["chain"]["atm"]["strike"] - chain["spot"]) <= min(
            abs(q["strike"] - chain["spot"]) for q in chain["calls"])
        assert body["underlying"]["price"] == ticks["ticks"][0]["price"]
        assert body["pcr"] == {k: v for k, v in pcr.items() if k != "product"}
        response, body = await _json(gateway, "/api/bff/overview/NOPE")
        assert response.code == 404
    finally:
        await storage.port.stopListening()
        await analytics.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_parts_are_fetched_in_parallel(start: Any, storage: Backend, analytics: Backend) -> None:
    """Every part is asked before any part answers: they run side by side, not in turn."""
    storage.delay = analytics.delay = 0.3
    gateway = await start()
    response, body = await _json(gateway)
    assert response.code == 200 and body["errors"] == []
    arrivals = storage.arrivals + analytics.arrivals
    answers = storage.answered + analytics.answered
    assert len(arrivals) == 3 and len(answers) == 3
    assert max(arrivals) < min(answers)


@pytest.mark.parametrize(
    ("breakage", "part", "service", "reason"),
    [
        ("chain_503", "chain", "storage", "status 503"),
        ("chain_not_json", "chain", "storage", "invalid_response"),
        ("pcr_refused", "pcr", "analytics", "refused"),
        ("pcr_timeout", "pcr", "analytics", "timeout"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_one_failing_part_still_answers_200(
    start: Any, storage: Backend, analytics: Backend,
    breakage: str, part: str, service: str, reason: str,
) -> None:
    """A failed part is null and named in errors; the other parts are there."""
    env: dict[str, str] = {}
    if breakage == "chain_503":
        storage.answers["/option/chain/"] = (503, {"error": "busy"})
    elif breakage == "chain_not_json":
        storage.answers["/option/chain/"] = (200, ["not", "a", "chain"])
    elif breakage == "pcr_refused":
        env["ANALYTICS_SERVICE_URL"] = closed_port_url()
    else:
        analytics.hang.add("/pcr/")
        env["ANALYTICS_TIMEOUT"] = "0.2"
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gateway = await start(**env)
        began = reactor.seconds()
        response, body = await _json(gateway)
        elapsed = reactor.seconds() - began
        await wait_until(lambda: _access_events(events))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.code == 200
    assert body[part] is None
    assert body["errors"] == [{"part": part, "service": service, "reason": reason}]
    for other in {"underlying", "chain", "pcr"} - {part}:
        assert body[other] is not None
    assert elapsed < 2.0
    [access] = _access_events(events)
    assert access["status_code"] == 200
    assert access["outcome"] == "partial"
    assert access["partial_failures"] == body["errors"]
    assert set(access["parts_latency_ms"]) == {"underlying", "chain", "pcr"}


@pytest_twisted.ensureDeferred
async def test_every_part_failing_is_503(start: Any) -> None:
    """No part succeeded: 503 JSON with Retry-After and the reason of each part."""
    gateway = await start(STORAGE_SERVICE_URL=closed_port_url(),
                          ANALYTICS_SERVICE_URL=closed_port_url())
    response, body = await _json(gateway)
    assert response.code == 503
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert int(response.headers.getRawHeaders(b"retry-after")[0]) >= 1
    assert body["error"] == "Storage and Analytics services unavailable"
    assert body["errors"] == [
        {"part": "underlying", "service": "storage", "reason": "refused"},
        {"part": "chain", "service": "storage", "reason": "refused"},
        {"part": "pcr", "service": "analytics", "reason": "refused"},
    ]


@pytest_twisted.ensureDeferred
async def test_unknown_product_is_404(start: Any, storage: Backend, analytics: Backend) -> None:
    """Every part answering 404 makes a 404 JSON answer; 404 from some parts only is partial."""
    storage.answers = {"/x": (200, {})}
    analytics.answers = {"/x": (200, {})}
    gateway = await start()
    response, body = await _json(gateway, "/api/bff/overview/NOPE")
    assert response.code == 404
    assert body["error"] == "Product not found"
    assert [e["reason"] for e in body["errors"]] == ["status 404"] * 3
    analytics.answers = {"/pcr/": (200, PCR)}
    response, body = await _json(gateway, "/api/bff/overview/NOPE")
    assert response.code == 200
    assert body["pcr"] is not None and body["chain"] is None and body["underlying"] is None


@pytest_twisted.ensureDeferred
async def test_bad_product_never_reaches_an_upstream(
    start: Any, storage: Backend, analytics: Backend
) -> None:
    """A path value that could climb the upstream path is refused before any part starts."""
    gateway = await start()
    response = await gateway.get("/api/bff/overview/..")
    assert response.code == 400  # the route matches; the value could climb
    response = await gateway.get("/api/bff/overview/a%2Fb")
    assert response.code == 404  # decoded, "a/b" is two segments: no route has them
    assert storage.seen == [] and analytics.seen == []


@pytest_twisted.ensureDeferred
async def test_identity_and_request_id_reach_every_part(
    start: Any, storage: Backend, analytics: Backend
) -> None:
    """Each part carries X-User-*, the request id, forwarding fields and its own trace span."""
    gateway = await start()
    trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response, _ = await _json(gateway, headers={
        b"Authorization": [b"Bearer tok-alice"],
        b"X-Request-ID": [b"dash-42"],
        b"traceparent": [trace],
        b"X-User-ID": [b"999"],
        b"If-None-Match": [b'"stale"'],
        b"Accept-Encoding": [b"br"],
    })
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-request-id") == [b"dash-42"]
    parts = storage.seen + analytics.seen
    assert len(parts) == 3
    spans = set()
    for seen in parts:
        assert seen.header(b"x-user-id") == [b"17"]
        assert seen.header(b"x-user-email") == [b"alice@example.com"]
        assert seen.header(b"x-request-id") == [b"dash-42"]
        assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
        assert seen.header(b"authorization") == []
        assert seen.header(b"if-none-match") == []
        assert seen.header(b"accept") == [b"application/json"]
        [traceparent] = seen.header(b"traceparent")
        assert traceparent.split(b"-")[1] == trace.split(b"-")[1]
        spans.add(traceparent.split(b"-")[2])
    assert len(spans) == 3


@pytest_twisted.ensureDeferred
async def test_overview_spends_one_token(start: Any, storage: Backend, analytics: Backend) -> None:
    """An overview costs one rate-limit token, though it makes three upstream calls."""
    gateway = await start(RATE_LIMIT_REQUESTS="3", RATE_LIMIT_WINDOW="3600")
    remaining = []
    for _ in range(3):
        response, _ = await _json(gateway)
        assert response.code == 200
        remaining.append(response.headers.getRawHeaders(b"x-ratelimit-remaining")[0])
    assert remaining == [b"2", b"1", b"0"]
    assert len(storage.seen) + len(analytics.seen) == 9
    response, _ = await _json(gateway)
    assert response.code == 429
    assert len(storage.seen) + len(analytics.seen) == 9


@pytest.mark.parametrize("require_auth", ["data", "analytics"])
@pytest_twisted.ensureDeferred
async def test_token_required_when_any_part_needs_one(
    start: Any, storage: Backend, analytics: Backend, require_auth: str
) -> None:
    """REQUIRE_AUTH on the group of any part protects the overview too."""
    gateway = await start(REQUIRE_AUTH=require_auth)
    response, body = await _json(gateway)
    assert response.code == 401 and body["error"] == "Missing Authorization header"
    assert storage.seen == [] and analytics.seen == []
    response, _ = await _json(gateway, headers={b"Authorization": [b"Bearer tok-alice"]})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_parts_share_the_services_breaker(start: Any, storage: Backend) -> None:
    """Storage failures seen by overviews open storage's breaker for every route."""
    storage.answers = {"/": (503, {"error": "down"})}
    gateway = await start(BREAKER_FAILURES="2", BREAKER_RESET="60")
    response, body = await _json(gateway)
    assert response.code == 200
    assert [e["reason"] for e in body["errors"]] == ["status 503", "status 503"]
    response, body = await _json(gateway)
    assert response.code == 200 and body["pcr"] is not None
    assert [e["reason"] for e in body["errors"]] == ["circuit_open", "circuit_open"]
    response = await gateway.get("/api/data/products")
    assert response.code == 503
    assert len(storage.seen) == 2


@pytest_twisted.ensureDeferred
async def test_parts_count_against_in_flight_cap(start: Any, storage: Backend) -> None:
    """Each part is one upstream call in flight: over MAX_IN_FLIGHT, a part is shed."""
    storage.delay = 0.05
    gateway = await start(MAX_IN_FLIGHT="1")
    response, body = await _json(gateway)
    assert response.code == 200
    assert body["errors"] == [{"part": "chain", "service": "storage", "reason": "shed"}]
    assert gateway.service.proxy.in_flight == {"auth": 0, "storage": 0, "analytics": 0}


@pytest_twisted.ensureDeferred
async def test_fetch_json_caps_the_body(storage: Backend) -> None:
    """A body over max_bytes fails the call as body_too_large; the rest is parsed JSON."""
    client = UpstreamClient(reactor, 4, 5.0)
    proxy = Proxy(reactor, client)
    try:
        status, document = await proxy.fetch_json(
            STORAGE, storage.url + "/option/chain/NIFTY", None, 5.0)
        assert (status, document) == (200, CHAIN)
        with pytest.raises(UpstreamUnavailable) as caught:
            await proxy.fetch_json(STORAGE, storage.url + "/option/chain/NIFTY", None, 5.0,
                                   max_bytes=100)
        assert caught.value.reason == "body_too_large"
        assert proxy.in_flight["storage"] == 0
        assert proxy.breakers["storage"].state == "closed"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_overview_is_documented_and_answers_match(
    start: Any, storage: Backend, analytics: Backend
) -> None:
    """The served OpenAPI document validates and describes both full and partial answers."""
    gateway = await start()
    _, document = await _json(gateway, "/api/docs")
    validate(document)
    operation = document["paths"]["/api/bff/overview/{product}"]["get"]
    assert {"200", "404", "429", "503"} <= set(operation["responses"])
    schema = document["paths"]["/api/bff/overview/{product}"]["get"]["responses"]["200"][
        "content"]["application/json"]["schema"]
    validator = OAS30Validator(schema)
    _, full = await _json(gateway)
    validator.validate(full)
    analytics.answers = {}
    storage.answers["/option/chain/"] = (200, {**CHAIN, "calls": [], "puts": []})
    _, partial = await _json(gateway)
    assert partial["pcr"] is None and partial["chain"]["atm"] is None
    validator.validate(partial)


@pytest_twisted.ensureDeferred
async def test_client_leaving_cancels_every_part(
    start: Any, storage: Backend, analytics: Backend
) -> None:
    """A client that disconnects mid-overview gets every part's upstream call cancelled."""
    storage.hang |= {"/underlying/", "/option/chain/"}
    analytics.hang.add("/pcr/")
    gateway = await start()
    pending = gateway.client.get(gateway.url + OVERVIEW)
    pending.addErrback(lambda _: None)
    await wait_until(lambda: len(storage.seen) + len(analytics.seen) == 3)
    pending.cancel()
    await wait_until(lambda: storage.connections_lost == 2 and analytics.connections_lost == 1)
    proxy = gateway.service.proxy
    await wait_until(lambda: proxy.in_flight == {"auth": 0, "storage": 0, "analytics": 0})
    assert {b.state for b in proxy.breakers.values()} == {"closed"}
