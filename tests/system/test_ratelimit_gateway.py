"""Rate limiting through a real gateway on real sockets (README: Rate limiting).

The in-process limiter runs on the reactor clock, which these tests share
with the gateway (same process), so ``reactor.seconds()`` taken here bounds
the gateway's own readings. The Redis tests run a real ``redis-server``
(tests/redis_server.py) and fail, not skip, when it is not installed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from tests.redis_server import RedisServer
from tests.support import RecordingUpstream, eventually, listen, wait_until

reactor: Any = _reactor

RATE_LIMIT_FIELDS = (
    b"ratelimit-policy",
    b"ratelimit",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
)

BATCH = 20
"""Requests in flight at once in a burst (see `_burst`)."""

USERS = {
    b"tok-alice": ("17", "alice@example.com"),
    b"tok-alice-phone": ("17", "alice@example.com"),
    b"tok-bob": ("23", "bob@example.com"),
}


class AuthStub(RecordingUpstream):
    """An auth service whose /verify knows USERS (minimal copy of test_auth_gateway's)."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = self._answer

    def _answer(self, request: Any, seen: Any) -> bytes:
        token = json.loads(seen.body or b"{}").get("token", "").encode()
        if seen.uri == b"/verify" and token in USERS:
            user_id, email = USERS[token]
            return json.dumps({"valid": True, "user_id": user_id, "email": email}).encode()
        request.setResponseCode(401)
        return b'{"error":"Invalid token"}'


@pytest_twisted.async_yield_fixture
async def auth() -> Any:
    """The AuthStub on a free loopback port (``.url``)."""
    stub = AuthStub()
    listening = listen(stub)
    stub.url = listening.url
    yield stub
    await listening.port.stopListening()


def _header(response: Any, name: bytes) -> bytes:
    [value] = response.headers.getRawHeaders(name)
    return value


def _rate_limit_fields(response: Any) -> dict[bytes, list[bytes]]:
    return {
        name: response.headers.getRawHeaders(name)
        for name in RATE_LIMIT_FIELDS + (b"retry-after",)
        if response.headers.hasHeader(name)
    }


async def _get(gateway: Any, path: str = "/api/data/products", **headers: bytes) -> Any:
    """GET with the given headers (underscores become dashes); body read, response returned."""
    raw = {name.replace("_", "-").encode(): [value] for name, value in headers.items()}
    response = await gateway.get(path, headers=raw)
    response.body = await response.content()
    return response


async def _burst(gateway: Any, count: int) -> list[Any]:
    """``count`` concurrent GETs of /api/data/products, ``BATCH`` at a time, in request order.

    Batches stay under the default listen backlog (50) of the recording
    upstream: a larger crowd overflows it and the dropped SYNs come back a
    whole second later, which is longer than the tests' refill interval.
    """
    responses: list[Any] = []
    while len(responses) < count:
        batch = min(BATCH, count - len(responses))
        responses += await defer.gatherResults([defer.ensureDeferred(_get(gateway)) for _ in range(batch)])
    return responses


async def _codes(gateway: Any, count: int, path: str = "/api/data/products", **headers: bytes) -> list[int]:
    return [(await _get(gateway, path, **headers)).code for _ in range(count)]


def _assert_refused(response: Any, policy: str, limit: int) -> None:
    """A 429 in the documented shape, for the named policy."""
    assert (response.code, response.phrase) == (429, b"Too Many Requests")
    assert json.loads(response.body)["error"] == "Rate limit exceeded"
    assert _header(response, b"content-type") == b"application/json"
    retry_after = _header(response, b"retry-after")
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert _header(response, b"ratelimit-policy").startswith(f'"{policy}";q={limit};'.encode())
    assert _header(response, b"ratelimit") == f'"{policy}";r=0;t={int(retry_after)}'.encode()
    assert _header(response, b"x-ratelimit-limit") == str(limit).encode()
    assert _header(response, b"x-ratelimit-remaining") == b"0"
    assert _header(response, b"x-ratelimit-reset").isdigit()


def _limiters_connected(gateway: Any) -> bool:
    # Private, on purpose: a decision made before the Redis connection is
    # ready fails open and spends nothing, which would skew budget counts.
    return all(limiter.connected for limiter in gateway.service.limits.limiters.values())


def _redis_failures(gateway: Any) -> int:
    """Decisions Redis did not make in time (REDIS_TIMEOUT), which fail open."""
    return sum(limiter.failures for limiter in gateway.service.limits.limiters.values())


@pytest_twisted.ensureDeferred
async def test_budget_exhausted_is_429_and_refills_one_token_per_interval(make_gateway, upstream):
    """100 per 60 s: 100 requests pass with headers, the 101st is 429 unforwarded, one token is back 0.6 s in."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="100", RATE_LIMIT_WINDOW="60"
    )
    # The bucket's clock starts at its first spend, no earlier than this.
    burst_start = reactor.seconds()
    admitted = await _burst(gateway, 100)
    assert [r.code for r in admitted] == [200] * 100
    for response in admitted:
        assert _header(response, b"ratelimit-policy") == b'"default";q=100;w=60'
        assert _header(response, b"x-ratelimit-limit") == b"100"
        remaining = _header(response, b"x-ratelimit-remaining")
        reset = _header(response, b"x-ratelimit-reset")
        assert _header(response, b"ratelimit") == b'"default";r=%s;t=%s' % (remaining, reset)
        assert not response.headers.hasHeader(b"retry-after")
    assert len(upstream.seen) == 100

    # Tokens come back at one per 0.6 s from the first spend. The burst
    # normally ends well inside that, and then the 101st request is refused;
    # on a loaded machine a slower burst has earned one more request per
    # 0.6 s elapsed, never more. The bounds below are exact for a fast burst.
    extra = 0
    while (refused := await _get(gateway)).code == 200:
        extra += 1
        assert extra <= 100, "the limiter never refused"
    refused_at = reactor.seconds()
    refills = int((refused_at - burst_start) / 0.6)
    assert extra <= refills
    _assert_refused(refused, "default", 100)
    assert _header(refused, b"ratelimit-policy") == b'"default";q=100;w=60'
    # The next token is less than 60/100 s away: rounded up, one second; a
    # full bucket is (almost) the whole window away.
    assert _header(refused, b"retry-after") == b"1"
    assert _header(refused, b"x-ratelimit-reset") == b"60"
    assert len(upstream.seen) == 100 + extra
    # Each request took exactly one token: in decision order the k-th left
    # 100 - k, plus whatever had refilled by then (nothing, for a fast burst).
    remaining = sorted(int(_header(r, b"x-ratelimit-remaining")) for r in admitted)
    assert all(i <= left <= i + refills for i, left in enumerate(remaining)), remaining

    async def admitted_again() -> bool:
        return (await _get(gateway)).code == 200

    await eventually(admitted_again, timeout=5, step=0.02)
    admitted_at = reactor.seconds()
    assert admitted_at - burst_start >= 0.6 * (extra + 1)
    assert admitted_at > refused_at
    # Only that one token came back: the very next request is refused again.
    _assert_refused(await _get(gateway), "default", 100)
    assert len(upstream.seen) == 101 + extra


@pytest_twisted.ensureDeferred
async def test_zero_requests_turns_limiting_off(make_gateway, upstream):
    """RATE_LIMIT_REQUESTS=0: 300 requests all pass, none with rate-limit fields."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="0")
    responses = await _burst(gateway, 300)
    assert [r.code for r in responses] == [200] * 300
    assert [_rate_limit_fields(r) for r in responses] == [{}] * 300
    assert len(upstream.seen) == 300


@pytest_twisted.ensureDeferred
async def test_meta_routes_are_never_limited(make_gateway, upstream):
    """With the budget spent, /health still answers 200 without rate-limit fields."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="2")
    assert await _codes(gateway, 3) == [200, 200, 429]
    for _ in range(5):
        health = await _get(gateway, "/health")
        assert health.code == 200
        assert json.loads(health.body)["status"] == "healthy"
        assert _rate_limit_fields(health) == {}
    # Health checks spent nothing, and did not refill anything either.
    _assert_refused(await _get(gateway), "default", 2)


@pytest_twisted.ensureDeferred
async def test_auth_group_has_its_own_stricter_budget(make_gateway, upstream):
    """RATE_LIMIT_AUTH_REQUESTS=3: the 4th login is 429 while data routes keep their own budget."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=upstream.url, STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_AUTH_REQUESTS="3"
    )

    async def login() -> Any:
        response = await gateway.request("POST", "/api/auth/login", data=b"{}")
        response.body = await response.content()
        return response

    logins = [await login() for _ in range(3)]
    assert [r.code for r in logins] == [200] * 3
    assert _header(logins[0], b"ratelimit-policy") == b'"auth";q=3;w=60'
    refused = await login()
    _assert_refused(refused, "auth", 3)
    assert sum(seen.uri == b"/login" for seen in upstream.seen) == 3

    data = await _get(gateway)
    assert data.code == 200
    assert _header(data, b"ratelimit-policy") == b'"default";q=100;w=60'
    assert _header(data, b"x-ratelimit-remaining") == b"99"
    # Spending from the data budget gave the auth budget nothing back.
    _assert_refused(await login(), "auth", 3)


@pytest_twisted.ensureDeferred
async def test_untrusted_forwarded_for_does_not_buy_a_new_budget(make_gateway, upstream):
    """Without TRUSTED_PROXIES the key is the TCP peer: varying X-Forwarded-For stays 429."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="5")
    assert await _codes(gateway, 6) == [200] * 5 + [429]
    for forwarded in (b"203.0.113.5", b"198.51.100.7", b"10.0.0.1, 203.0.113.9", b"127.0.0.2"):
        assert (await _get(gateway, x_forwarded_for=forwarded)).code == 429


@pytest_twisted.ensureDeferred
async def test_trusted_proxy_keys_on_rightmost_untrusted_forwarded_for(make_gateway, upstream):
    """Behind a trusted proxy each client address has its own budget, keyed on the right-most untrusted entry."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="5", TRUSTED_PROXIES="127.0.0.0/8"
    )
    assert await _codes(gateway, 6, x_forwarded_for=b"203.0.113.5") == [200] * 5 + [429]
    # Trusted hops to the right are skipped; spoofed entries to the left are ignored.
    for forwarded in (b"203.0.113.5, 127.0.0.2", b"198.51.100.7, 203.0.113.5", b"203.0.113.5,127.0.0.9, 127.0.0.2"):
        assert (await _get(gateway, x_forwarded_for=forwarded)).code == 429
    # Another client behind the proxy, or the proxy itself, still has a full budget.
    other = await _get(gateway, x_forwarded_for=b"203.0.113.6, 127.0.0.2")
    assert other.code == 200
    assert _header(other, b"x-ratelimit-remaining") == b"4"
    assert (await _get(gateway)).code == 200
    assert await _codes(gateway, 6, x_forwarded_for=b"198.51.100.7") == [200] * 5 + [429]


@pytest_twisted.ensureDeferred
async def test_verified_user_has_own_budget_that_follows_the_user(make_gateway, auth, upstream):
    """Users from one address are limited separately, and a user's budget follows its user id across addresses and tokens."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url,
        STORAGE_SERVICE_URL=upstream.url,
        RATE_LIMIT_REQUESTS="3",
        TRUSTED_PROXIES="127.0.0.0/8",
    )
    alice = {"authorization": b"Bearer tok-alice", "x_forwarded_for": b"203.0.113.5"}
    assert await _codes(gateway, 4, **alice) == [200] * 3 + [429]
    # Same address, another user: a budget of its own.
    assert await _codes(gateway, 3, authorization=b"Bearer tok-bob", x_forwarded_for=b"203.0.113.5") == [200] * 3
    # Nobody from that address: the address's budget, less the one token
    # each of the two verifications (alice's, bob's) was charged.
    assert await _codes(gateway, 2, x_forwarded_for=b"203.0.113.5") == [200, 429]
    # Alice from elsewhere, even with another token of hers, is still over budget.
    assert (await _get(gateway, authorization=b"Bearer tok-alice", x_forwarded_for=b"198.51.100.7")).code == 429
    assert (await _get(gateway, authorization=b"Bearer tok-alice-phone", x_forwarded_for=b"198.51.100.7")).code == 429
    assert (await _get(gateway, authorization=b"Bearer tok-alice-phone")).code == 429
    forwarded_users = [s.header(b"x-user-id") for s in upstream.seen]
    assert forwarded_users.count([b"17"]) == 3 and forwarded_users.count([b"23"]) == 3


def _verifications(auth: AuthStub) -> int:
    return sum(1 for seen in auth.seen if seen.uri == b"/verify")


@pytest_twisted.ensureDeferred
async def test_bogus_tokens_on_a_required_route_cost_the_address_budget(make_gateway, auth, upstream):
    """60 distinct bogus tokens from one address: 5 verifications (the budget), 5 × 401, then 55 × 429."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url, STORAGE_SERVICE_URL=upstream.url,
        RATE_LIMIT_REQUESTS="5", REQUIRE_AUTH="data",
    )
    codes = [
        (await _get(gateway, authorization=b"Bearer bogus-%d" % i)).code for i in range(60)
    ]
    assert codes == [401] * 5 + [429] * 55
    assert _verifications(auth) == 5
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_bogus_tokens_on_an_optional_route_cost_the_address_budget(make_gateway, auth, upstream):
    """20 distinct bogus tokens where a token is optional: 5 served anonymously, 15 × 429, 5 verifications."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url, STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="5",
    )
    codes = [
        (await _get(gateway, authorization=b"Bearer bogus-%d" % i)).code for i in range(20)
    ]
    assert codes == [200] * 5 + [429] * 15
    assert _verifications(auth) == 5
    assert len(upstream.seen) == 5


@pytest_twisted.ensureDeferred
async def test_a_verified_user_keeps_its_budget_while_its_address_is_spent(make_gateway, auth, upstream):
    """Alice, verified before her address ran dry, is served from her own budget; a new token there is 429 unverified."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url, STORAGE_SERVICE_URL=upstream.url,
        RATE_LIMIT_REQUESTS="5", REQUIRE_AUTH="data",
    )
    alice = {"authorization": b"Bearer tok-alice"}
    assert await _codes(gateway, 1, **alice) == [200]  # one verification, charged to the address
    assert [(await _get(gateway, authorization=b"Bearer bogus-%d" % i)).code for i in range(5)] == (
        [401] * 4 + [429]
    )
    assert await _codes(gateway, 5, **alice) == [200] * 4 + [429]  # her own budget of 5
    assert (await _get(gateway, authorization=b"Bearer tok-bob")).code == 429
    assert _verifications(auth) == 5
    assert [s.header(b"x-user-id") for s in upstream.seen] == [[b"17"]] * 5


async def _redis_gateway(make_gateway: Any, upstream: Any, redis: RedisServer, **env: str) -> Any:
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url,
        REDIS_URL=f"redis://127.0.0.1:{redis.port}",
        RATE_LIMIT_REQUESTS="10",
        **env,
    )
    await wait_until(lambda: _limiters_connected(gateway))
    return gateway


@pytest_twisted.ensureDeferred
async def test_redis_budget_is_shared_between_gateways(make_gateway, upstream, redis_server):
    """Two gateways on one Redis share one budget: 6 through A and 4 through B, then 429 through either."""
    a = await _redis_gateway(make_gateway, upstream, redis_server)
    b = await _redis_gateway(make_gateway, upstream, redis_server)
    assert await _codes(a, 6) == [200] * 6
    through_b = [await _get(b) for _ in range(4)]
    assert [r.code for r in through_b] == [200] * 4
    late = _redis_failures(a) + _redis_failures(b)
    assert [_header(r, b"x-ratelimit-remaining") for r in through_b] == [b"3", b"2", b"1", b"0"], (
        f"{late} decision(s) exceeded REDIS_TIMEOUT and failed open"
    )
    for gateway in (a, b, a):
        refused = await _get(gateway)
        assert refused.code == 429, f"{_redis_failures(gateway)} decision(s) exceeded REDIS_TIMEOUT"
        _assert_refused(refused, "default", 10)
    assert len(upstream.seen) == 10


@pytest_twisted.ensureDeferred
async def test_redis_outage_fails_open_and_limiting_resumes(make_gateway, upstream, redis_server):
    """With Redis stopped requests pass; once it is back on the same port, limiting resumes."""
    gateway = await _redis_gateway(make_gateway, upstream, redis_server)
    assert await _codes(gateway, 11) == [200] * 10 + [429]
    redis_server.stop()
    assert await _codes(gateway, 15) == [200] * 15
    assert len(upstream.seen) == 25
    redis_server.start()

    async def limited_again() -> bool:
        return (await _get(gateway)).code == 429

    # The new server starts with empty buckets: ten more pass, then 429.
    await eventually(limited_again, timeout=10, step=0.02)


@pytest_twisted.ensureDeferred
async def test_redis_outage_fails_closed_with_503(make_gateway, upstream, redis_server):
    """RATE_LIMIT_FAIL_CLOSED=1: with Redis stopped requests are 503 JSON, unforwarded, until it is back."""
    gateway = await _redis_gateway(make_gateway, upstream, redis_server, RATE_LIMIT_FAIL_CLOSED="1")
    assert (await _get(gateway)).code == 200
    redis_server.stop()
    for _ in range(3):
        response = await _get(gateway)
        assert response.code == 503
        assert json.loads(response.body)["error"] == "Rate limit service unavailable"
        assert _header(response, b"content-type") == b"application/json"
    assert len(upstream.seen) == 1
    redis_server.start()

    async def decided_again() -> bool:
        return (await _get(gateway)).code == 200

    await eventually(decided_again, timeout=10, step=0.02)
    assert await _codes(gateway, 10) == [200] * 9 + [429]


@pytest_twisted.ensureDeferred
async def test_ipv6_clients_share_the_bucket_of_their_64(make_gateway, upstream):
    """Two addresses of one /64 spend one budget; another /64 has its own; an
    IPv4-mapped address is its IPv4 address."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="3", TRUSTED_PROXIES="127.0.0.0/8"
    )
    assert await _codes(gateway, 2, x_forwarded_for=b"2001:db8::1") == [200, 200]
    assert await _codes(gateway, 2, x_forwarded_for=b"2001:db8::ffff:2") == [200, 429]
    assert await _codes(gateway, 1, x_forwarded_for=b"2001:db8:0:1::1") == [200]
    assert await _codes(gateway, 3, x_forwarded_for=b"203.0.113.9") == [200, 200, 200]
    assert await _codes(gateway, 1, x_forwarded_for=b"::ffff:203.0.113.9") == [429]


def test_address_key():
    from deltagw.policy.rate_limits import address_key

    assert address_key("203.0.113.9", 64) == "ip:203.0.113.9"
    assert address_key("2001:db8::1", 64) == address_key("2001:db8::ffff:ffff", 64) == "ip:2001:db8::/64"
    assert address_key("2001:db8::1", 128) == "ip:2001:db8::1/128"
    assert address_key("::ffff:203.0.113.9", 64) == "ip:203.0.113.9"
    assert address_key("fe80::1%eth0", 64) == "ip:fe80::/64"


@pytest_twisted.ensureDeferred
async def test_the_redis_password_is_never_logged(make_gateway, upstream, redis_server):
    """REDIS_URL's password appears in no log line: Redis unreachable, then a Redis
    that refuses the password (it has none configured)."""
    from twisted.logger import globalLogPublisher

    from tests.support import closed_port_url

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        unreachable = closed_port_url().replace("http://", "redis://:pw-SECRET-1@")
        gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, REDIS_URL=unreachable)
        await wait_until(lambda: any("rate_limit_backend_connect_failed" in str(e) for e in events))
        assert (await _get(gateway)).code == 200  # fail-open
        refusing = await make_gateway(
            STORAGE_SERVICE_URL=upstream.url,
            REDIS_URL=f"redis://:pw-SECRET-2@127.0.0.1:{redis_server.port}",
        )
        assert (await _get(refusing)).code == 200
        await wait_until(lambda: any("rate_limit_backend_unavailable" in str(e) for e in events))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert "pw-SECRET" not in repr(events)


@pytest.mark.parametrize(("fail_closed", "code"), [("0", 200), ("1", 503)])
@pytest_twisted.ensureDeferred
async def test_a_redis_answering_garbage_is_an_unavailable_limiter(make_gateway, upstream, fail_closed, code):
    """A server on REDIS_URL that answers nonsense to everything: no 500, no crash; the
    limiter is unavailable (fail-open serves, fail-closed answers 503)."""
    from twisted.internet.protocol import Factory, Protocol

    from tests.support import listen

    answered: list[bytes] = []

    class Garbage(Protocol):
        def dataReceived(self, data: bytes) -> None:
            answered.append(data)
            self.transport.write(b"%\xff\x00 not RESP\r\n")

    hostile = listen(Factory.forProtocol(Garbage))
    try:
        port = hostile.url.rsplit(":", 1)[1]
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=upstream.url, REDIS_URL=f"redis://127.0.0.1:{port}",
            RATE_LIMIT_FAIL_CLOSED=fail_closed,
        )
        codes = [(await _get(gateway)).code for _ in range(5)]
        assert codes == [code] * 5
        assert answered  # the gateway did talk to it
        assert (await _get(gateway, "/health")).code == 200
    finally:
        await hostile.port.stopListening()
