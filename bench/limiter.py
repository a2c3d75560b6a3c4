#!/usr/bin/env python3
"""What the rate limiter costs, outside the gateway.

``.venv/bin/python bench/limiter.py`` measures, with the installed deltagw:

(a) the in-process `TokenBucketLimiter`: process CPU time per ``consume``
    (``time.process_time`` over 1,000,000 calls cycling over 10,000 keys, the
    real reactor's ``seconds()`` as the clock, the default budget of 100 per
    60 s); target < 5 µs;
(b) the `RedisLimiter` against a real ``redis-server`` on loopback (started
    here on a free port, persistence off, stopped at the end): 10,000
    sequential ``consume`` calls on a running reactor, each on a new key (the
    common path: the script creates the bucket), latency median and p99;
    target median < 1 ms.

The gateway-level cost (c) — CPU per request with the limiter on versus
RATE_LIMIT_REQUESTS=0 — needs nginx and two gateways, so ``bench/run.py``
measures it in its rounds; ``run.py`` also runs this script at the end
(``--json`` hands it the figures). Timing uses ``time.perf_counter`` and
``time.process_time``: this is the benchmark, not gateway code.

Exit status 0 unless something failed to run (a missed target is reported).
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(1, str(BENCH_DIR.parent / "tests"))  # redis_server.py, the tests' helper

TARGET_LOCAL_US = 5.0
TARGET_REDIS_MEDIAN_MS = 1.0


def measure_local(calls: int, keys: int) -> dict[str, Any]:
    """(a) CPU µs per TokenBucketLimiter.consume, real reactor clock."""
    from twisted.internet import reactor

    from deltagw.policy.buckets import TokenBucketLimiter

    names = [f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(keys)]

    def run(n: int) -> tuple[float, int]:
        limiter = TokenBucketLimiter(reactor, capacity=100, window=60, max_keys=100_000)
        consume = limiter.consume
        allowed = 0
        t0 = time.process_time()
        for key in itertools.islice(itertools.cycle(names), n):
            if consume(key).allowed:
                allowed += 1
        return time.process_time() - t0, allowed

    run(min(calls, 100_000))  # warm-up: allocator, caches
    cpu_s, allowed = run(calls)
    # The bare loop (cycle + the `allowed` test), to show how much is the harness.
    t0 = time.process_time()
    dummy = 0
    for key in itertools.islice(itertools.cycle(names), calls):
        if key:
            dummy += 1
    loop_s = time.process_time() - t0
    return {"calls": calls, "keys": keys, "allowed": allowed, "cpu_s": round(cpu_s, 3),
            "us_per_call": round(cpu_s * 1e6 / calls, 3),
            "loop_overhead_us_per_call": round(loop_s * 1e6 / calls, 3),
            "target_us": TARGET_LOCAL_US, "pass": cpu_s * 1e6 / calls < TARGET_LOCAL_US}


def measure_redis(calls: int, warmup: int) -> dict[str, Any]:
    """(b) RedisLimiter.consume latency against a real loopback redis-server."""
    from redis_server import RedisServer, RedisServerError
    from twisted.internet import reactor, task
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from deltagw.policy.buckets import RedisLimiter
    from deltagw.policy.rate_limits import REDIS_TIMEOUT

    out: dict[str, Any] = {}
    interrupted: list[int] = []

    async def main(reactor: Any, port: int) -> None:
        limiter = RedisLimiter(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                               capacity=100, window=60, timeout=REDIS_TIMEOUT)
        limiter.start()
        try:
            for _ in range(500):
                if limiter.connected:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            else:
                raise RuntimeError("the RedisLimiter did not connect within 5 s")
            for i in range(warmup):  # loads the script (NOSCRIPT -> EVAL once)
                await limiter.consume(f"warmup:{i}")
            failures0 = limiter.failures
            latencies = []
            allowed = 0
            cpu0 = time.process_time()
            for i in range(calls):
                if interrupted:  # a failed call returns at once: check, or run on
                    raise KeyboardInterrupt("interrupted")
                t0 = time.perf_counter()
                decision = await limiter.consume(f"ip:bench:{i}")
                latencies.append(time.perf_counter() - t0)
                allowed += decision.allowed
            cpu_s = time.process_time() - cpu0
            latencies.sort()
            out.update({
                "calls": calls, "allowed": allowed,
                "failures": limiter.failures - failures0, "timeout_s": REDIS_TIMEOUT,
                "median_ms": round(statistics.median(latencies) * 1e3, 4),
                "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 4),
                "max_ms": round(latencies[-1] * 1e3, 4),
                "client_cpu_us_per_call": round(cpu_s * 1e6 / calls, 1),
            })
        finally:
            await limiter.stop()

    with tempfile.TemporaryDirectory(prefix="deltagw-bench-redis-") as tmp:
        try:
            server = RedisServer(Path(tmp))
            server.start()
        except RedisServerError as e:
            return {"skipped": str(e).splitlines()[0]}
        try:
            # Not task.react: it calls sys.exit. SIGINT/SIGTERM stop the reactor
            # (our handlers: the reactor's own would re-raise SIGTERM after
            # stopping and kill us before the server is stopped below).
            def stop(*_: Any) -> None:
                if reactor.running:
                    reactor.stop()

            def on_signal(signum: int, _frame: Any) -> None:
                interrupted.append(signum)
                reactor.callFromThread(stop)

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
            failure: list[Any] = []
            done = ensureDeferred(main(reactor, server.port))
            done.addErrback(failure.append).addBoth(stop)
            reactor.run(installSignalHandlers=False)
            if failure:
                failure[0].raiseException()
            if interrupted or "median_ms" not in out:
                raise KeyboardInterrupt("interrupted")
            version = server.command(b"INFO", b"server").split(b"redis_version:")[1].split()[0]
            out["redis_version"] = version.decode()
        finally:
            server.stop()
    out.update({"target_median_ms": TARGET_REDIS_MEDIAN_MS,
                "pass": out["median_ms"] < TARGET_REDIS_MEDIAN_MS and not out["failures"]})
    return out


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "SKIP"}[ok]


def report_lines(local: dict[str, Any], redis: dict[str, Any]) -> list[str]:
    """The PASS/FAIL lines, in run.py's format (also used by run.py)."""
    lines = [
        f"  {verdict(local['pass']):<5} {'in-process limiter CPU per consume < 5 µs':<52} "
        f"{local['us_per_call']:.2f} µs ({local['calls']:,} calls, {local['keys']:,} keys; "
        f"bare loop {local['loop_overhead_us_per_call']:.2f} µs of it)",
    ]
    if "skipped" in redis:
        lines.append(f"  {'SKIP':<5} {'Redis limiter median latency < 1 ms':<52} {redis['skipped']}")
    else:
        lines.append(
            f"  {verdict(redis['pass']):<5} {'Redis limiter median latency < 1 ms':<52} "
            f"{redis['median_ms']:.3f} ms median, p99 {redis['p99_ms']:.3f} ms, "
            f"max {redis['max_ms']:.3f} ms ({redis['calls']:,} sequential calls, "
            f"{redis['failures']} timeouts/failures, client CPU "
            f"{redis['client_cpu_us_per_call']:.0f} µs/call, redis {redis['redis_version']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000,
                        help="in-process consume calls (default 1,000,000)")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys (default 10,000)")
    parser.add_argument("--redis-calls", type=int, default=10_000,
                        help="sequential Redis consume calls (default 10,000)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.calls, args.keys, args.redis_calls) < 1:
        parser.error("--calls, --keys and --redis-calls must be ≥ 1")

    import deltagw
    import twisted
    try:
        local = measure_local(args.calls, args.keys)
        redis = measure_redis(args.redis_calls, warmup=200)
    except KeyboardInterrupt:
        print("limiter: interrupted", file=sys.stderr)
        return 130
    results = {"python": sys.version.split()[0], "twisted": twisted.__version__,
               "deltagw_path": deltagw.__path__[0], "local": local, "redis": redis}
    print("limiter:")
    print(*report_lines(local, redis), sep="\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
