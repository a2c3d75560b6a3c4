"""Tests for deltagw.policy.buckets.RedisLimiter against a real redis-server.

These need ``redis-server`` on PATH and fail (not skip) without it: CI must
run them. Each test gets its own server on a free loopback port.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from deltagw.policy.buckets import BUCKET_SCRIPT_SHA, Decision, RedisLimiter, RedisUnavailable
from tests.redis_server import RedisServer

reactor: Any = _reactor

DEADLINE = 15.0
"""Seconds a poll may wait for reconnection before the test fails."""


class LogRecorder:
    """Stands in for the structlog logger to count outage lines."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def msg(self, event: str, **fields: object) -> None:
        self.events.append(event)


@pytest.fixture
def make_limiter(redis_server: RedisServer) -> Iterator[Callable[..., RedisLimiter]]:
    """Build started limiters on the test server; stop them all at teardown."""
    limiters: list[RedisLimiter] = []

    def make(**kwargs: Any) -> RedisLimiter:
        settings: dict[str, Any] = {"capacity": 5, "window": 60, "timeout": 1.0}
        settings.update(kwargs)
        endpoint = TCP4ClientEndpoint(reactor, redis_server.host, redis_server.port, timeout=1)
        limiter = RedisLimiter(reactor, endpoint, **settings)
        limiter.log = LogRecorder()
        limiter.start()
        limiters.append(limiter)
        return limiter

    yield make
    for limiter in limiters:
        pytest_twisted.blockon(limiter.stop())


@inlineCallbacks
def poll(predicate: Callable[[], Any], what: str) -> Generator[Deferred[Any], Any, Any]:
    """Call ``predicate`` (may return a Deferred) until truthy, or fail at DEADLINE."""
    deadline = reactor.seconds() + DEADLINE
    while True:
        result = yield predicate()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {DEADLINE}s waiting for {what}")
        yield deferLater(reactor, 0.02, lambda: None)


def connected(limiter: RedisLimiter) -> Deferred[Any]:
    return poll(lambda: limiter.connected, "the limiter to connect")


@pytest_twisted.inlineCallbacks
def test_two_connections_share_one_budget(make_limiter: Any) -> Generator[Any, Any, None]:
    """Two limiters on separate connections draw from one bucket per key."""
    first, second = make_limiter(), make_limiter()
    yield connected(first)
    yield connected(second)
    decisions: list[Decision] = []
    for _ in range(4):
        decisions.append((yield first.consume("alice")))
        decisions.append((yield second.consume("alice")))
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert decisions[-1].retry_after == 12  # 60 s / 5 tokens
    assert first.failures == second.failures == 0


@pytest_twisted.inlineCallbacks
def test_bucket_key_expires_when_full(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """The bucket lives under the policy prefix and expires once it would be full."""
    limiter = make_limiter(policy="auth", capacity=10, window=20)
    yield connected(limiter)
    for _ in range(3):
        yield limiter.consume("bob")
    ttl = int(redis_server.command(b"PTTL", b"deltagw:rl:auth:bob")[1:].split(b"\r\n")[0])
    assert 5000 < ttl <= 6000  # 3 tokens at 2 s each


@pytest_twisted.inlineCallbacks
def test_noscript_falls_back_to_eval(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """After SCRIPT FLUSH the next decision still comes from the same bucket."""
    limiter = make_limiter()
    yield connected(limiter)
    yield limiter.consume("carol")
    assert redis_server.command(b"SCRIPT", b"FLUSH") == b"+OK\r\n"
    decision = yield limiter.consume("carol")
    assert decision.allowed and decision.remaining == 3
    assert limiter.failures == 0
    # EVAL cached the script again, so EVALSHA hits from now on.
    assert redis_server.command(b"SCRIPT", b"EXISTS", BUCKET_SCRIPT_SHA) == b"*1\r\n:1\r\n"


@pytest_twisted.inlineCallbacks
def test_outage_fails_open_counts_and_logs_once(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """With Redis gone, fail-open allows, counts each miss, and logs start and end once."""
    limiter = make_limiter(capacity=1)
    yield connected(limiter)
    assert (yield limiter.consume("dave")).allowed
    assert not (yield limiter.consume("dave")).allowed
    redis_server.stop()
    decisions = []
    for _ in range(3):
        decisions.append((yield limiter.consume("dave")))
    assert all(d.allowed for d in decisions)
    assert limiter.failures == 3
    assert limiter.log.events == ["rate_limit_backend_unavailable"]

    redis_server.start()  # same port, empty server: the bucket starts full
    yield connected(limiter)
    assert (yield limiter.consume("dave")).allowed
    assert limiter.log.events == [
        "rate_limit_backend_unavailable",
        "rate_limit_backend_recovered",
    ]


@pytest_twisted.inlineCallbacks
def test_outage_fails_closed(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """With fail_open=False an outage raises RedisUnavailable (the gateway's 503)."""
    limiter = make_limiter(fail_open=False)
    yield connected(limiter)
    redis_server.stop()
    with pytest.raises(RedisUnavailable):
        yield limiter.consume("erin")
    assert limiter.failures == 1


@pytest_twisted.inlineCallbacks
def test_limiting_resumes_after_restart(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """After Redis restarts on the same port, the limiter reconnects and refuses again."""
    limiter = make_limiter(capacity=2)
    yield connected(limiter)
    redis_server.restart()

    @inlineCallbacks
    def refused() -> Generator[Any, Any, bool]:
        decision = yield limiter.consume("frank")
        return not decision.allowed

    yield poll(refused, "a refusal from the restarted Redis")
    assert limiter.connected


@pytest_twisted.inlineCallbacks
def test_slow_redis_times_out_then_recovers(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """A Redis that stops answering costs one timeout per call, then decisions resume."""
    limiter = make_limiter(timeout=0.1, stall_after=5.0)
    yield connected(limiter)
    redis_server.pause()
    started = reactor.seconds()
    decision = yield limiter.consume("gina")
    assert decision.allowed
    assert limiter.failures == 1
    assert reactor.seconds() - started < 2.0
    redis_server.resume()

    @inlineCallbacks
    def decided_by_redis() -> Generator[Any, Any, bool]:
        before = limiter.failures
        yield limiter.consume("gina")
        return limiter.failures == before

    yield poll(decided_by_redis, "Redis to answer again")
    assert limiter.log.events == [
        "rate_limit_backend_unavailable",
        "rate_limit_backend_recovered",
    ]


@pytest_twisted.inlineCallbacks
def test_stalled_connection_is_replaced(
    make_limiter: Any, redis_server: RedisServer
) -> Generator[Any, Any, None]:
    """A connection owing replies for stall_after seconds is dropped and remade."""
    limiter = make_limiter(timeout=0.1, stall_after=0.2)
    yield connected(limiter)
    redis_server.pause()
    yield limiter.consume("hank")  # times out; the connection is not yet stalled
    assert limiter.connected
    yield poll(
        lambda: limiter.consume("hank").addCallback(lambda _: not limiter.connected),
        "the stalled connection to be dropped",
    )
    redis_server.resume()
    yield connected(limiter)
    failures = limiter.failures
    assert (yield limiter.consume("hank")).allowed
    assert limiter.failures == failures  # decided by Redis, not failed open
