"""A seeded chaos soak through a real gateway to a misbehaving upstream."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from tests.support import closed_port_url, listen, open_fds, wait_until

REQUESTS = 20_000
WARM_UP = 2_000
CONCURRENCY = 64
FAULT_RATE = 0.2
SEED = 6

FAULTS = ("status_503", "silent", "reset", "garbage", "huge_header", "stall", "cut", "refused")
CUT_OFF = {"stall", "cut"}
"""Faults after the status line went out: the documented answer is a closed connection."""

_BODY = b'{"product":"NIFTY","ticks":[1,2,3]}'


class ChaosUpstream(protocol.Factory):
    """An HTTP/1.1 keep-alive upstream that misbehaves as each request's ``?fault=`` says."""

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return _ChaosProtocol()


class _ChaosProtocol(protocol.Protocol):
    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and self.transport is not None:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            _, _, fault = target.partition(b"fault=")
            if not self._answer(fault.decode()):
                return

    def _answer(self, fault: str) -> bool:
        """Write the answer; False when the connection is not to be used again."""
        write = self.transport.write
        if fault == "status_503":
            body = b'{"error":"storage overloaded"}'
            write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return True
        if fault == "silent":
            return False
        if fault == "reset":
            self.transport.abortConnection()
            return False
        if fault == "garbage":
            write(b"\x00\x01 not http at all\r\n\r\n")
            self.transport.loseConnection()
            return False
        if fault == "huge_header":
            write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            self.transport.loseConnection()
            return False
        if fault in CUT_OFF:
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"par")
            if fault == "cut":
                reactor.callLater(0.02, self.transport.abortConnection)
            return False
        write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY))
        return True


class _Collect(protocol.Protocol):
    """Collects a response body; fails unless the body ended as framed."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def _read_body(response: Any) -> defer.Deferred[bytes]:
    collect = _Collect()
    response.deliverBody(collect)
    return collect.done


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("VmRSS not found")


@pytest.mark.soak
@pytest_twisted.ensureDeferred
async def test_chaos_soak_every_request_answered_nothing_leaks(make_gateway):
    """20,000 requests, 20% of them meeting a random upstream fault: each gets a documented answer, nothing leaks."""
    listening = listen(ChaosUpstream())
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = CONCURRENCY
    pool.retryAutomatically = False
    agent = Agent(reactor, pool=pool)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=listening.url,
            ANALYTICS_SERVICE_URL=closed_port_url(),
            STORAGE_TIMEOUT="0.2",
            ANALYTICS_TIMEOUT="0.2",
            BREAKER_FAILURES="10",
            BREAKER_RESET="0.2",
            RATE_LIMIT_REQUESTS="0",
        )
        rng = random.Random(SEED)
        outcomes: Counter[tuple[str, str]] = Counter()
        problems: list[str] = []

        async def one(fault: str) -> None:
            if fault == "refused":
                path = "/api/analytics/pcr/NIFTY"
            else:
                path = "/api/data/underlying/NIFTY?fault=" + fault
            try:
                response = await agent.request(b"GET", (gateway.url + path).encode())
            except Exception as e:
                # The gateway aborts the connection once a body is cut; the
                # abort may discard a status line still in its send buffer.
                if fault in CUT_OFF:
                    outcomes[(fault, "closed")] += 1
                else:
                    problems.append(f"{fault}: no response: {e!r}")
                return
            try:
                body = await _read_body(response)
            except Exception:
                if fault in CUT_OFF and response.code == 200:
                    outcomes[(fault, "closed")] += 1
                else:
                    problems.append(f"{fault}: {response.code} body cut")
                return
            try:
                json.loads(body)
            except ValueError:
                problems.append(f"{fault}: {response.code} not JSON: {body[:80]!r}")
                return
            if response.headers.getRawHeaders(b"content-type") != [b"application/json"]:
                problems.append(f"{fault}: {response.code} without JSON content type")
            if response.code == 503 and not response.headers.hasHeader(b"retry-after"):
                if json.loads(body) != {"error": "storage overloaded"}:  # relayed, not ours
                    problems.append(f"{fault}: gateway 503 without Retry-After")
            if response.code not in (200, 503):
                problems.append(f"{fault}: undocumented status {response.code}")
            outcomes[(fault, str(response.code))] += 1

        async def run(count: int) -> None:
            faults = iter(
                [rng.choice(FAULTS) if rng.random() < FAULT_RATE else "ok" for _ in range(count)]
            )

            async def worker() -> None:
                for fault in faults:
                    await one(fault)

            await defer.gatherResults(
                [defer.ensureDeferred(worker()) for _ in range(CONCURRENCY)]
            )

        async def quiesce() -> None:
            await pool.closeCachedConnections()
            await gateway.service.client.close()

        fds = open_fds()
        await run(WARM_UP)
        rss_after_warm_up = _rss_kb()
        started = reactor.seconds()
        await run(REQUESTS)
        elapsed = reactor.seconds() - started
        rss_after = _rss_kb()
        await quiesce()
        await wait_until(lambda: open_fds() <= fds, timeout=10)
        print(
            f"\nchaos soak: {REQUESTS} requests in {elapsed:.1f} s "
            f"({REQUESTS / elapsed:.0f}/s), RSS {rss_after_warm_up} -> {rss_after} kB, "
            f"fds {fds} -> {open_fds()}\n" + "\n".join(
                f"  {fault:12} {answer:7} {n}" for (fault, answer), n in sorted(outcomes.items())
            )
        )
        assert not problems, problems[:20]
        assert sum(outcomes.values()) == REQUESTS + WARM_UP
        assert elapsed < 60
        assert rss_after <= rss_after_warm_up * 1.10, (rss_after_warm_up, rss_after)
    finally:
        await pool.closeCachedConnections()
        await listening.port.stopListening()
