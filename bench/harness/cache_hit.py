"""A cache hit next to a proxied miss: the same GET of one hot key, at 64 connections.

nginx states no lifetime for its answers, so the gateway's cache stores none
of them and the gateway's own ``small_64c`` run forwards every request: that
is the proxied miss. A twin gateway that differs only by an operator default
TTL for the ``data`` route group (``variants.CACHE_HIT_ENV``) stores the first answer
and serves every later one from its cache: the hit. Both return the same
600-byte body, so their ratio is what the cache saves, not a payload effect.

A broken cache must not report a good ratio, so both sides are checked: the
gateway's ``Cache-Status`` on a probe before the load, and nginx's request
counter around each run (a hit run reaches nginx not at all, a miss run once
per answer).
"""

from __future__ import annotations

from typing import Any

from harness.errors import BenchError
from harness.fixtures import underlying_body
from harness.polling import http_get
from harness.summary import median


def probe_cache_status(url: str) -> str:
    """The ``Cache-Status`` of one GET of the hot key; its status and body must be the fixture's."""
    status, body, headers = http_get(url)
    if status != 200 or body != underlying_body():
        raise BenchError(f"cache probe: {url} answered {status} with {len(body)} bytes, "
                         "not the fixture")
    return headers.get("Cache-Status", "")


def check_answers_from_cache(url: str, processes: int) -> str:
    """The twin must answer the hot key from its cache; the hit's ``Cache-Status``.

    Each worker process has a cache of its own, so with N of them it may
    take N misses before a request meets a process that stored the answer.
    """
    seen = []
    for _ in range(2 * processes + 1):
        cache_status = probe_cache_status(url)
        if cache_status.startswith("deltagw; hit"):
            return cache_status
        seen.append(cache_status)
    raise BenchError(f"cache probe: the cache-hit twin never answered from its cache "
                     f"(Cache-Status: {seen})")


def check_forwards(url: str) -> str:
    """The gateway must forward the hot key, its answer not stored; its ``Cache-Status``."""
    cache_status = probe_cache_status(url)
    if "fwd=" not in cache_status or "stored" in cache_status:
        raise BenchError(f"cache probe: the gateway answered {url} with Cache-Status "
                         f"{cache_status!r}, not a forwarded answer it does not store")
    return cache_status


def cpus_busy(cpu_s: float | None, seconds: float) -> float | None:
    """How many CPUs' worth ``cpu_s`` took over a run of ``seconds``."""
    return None if cpu_s is None else round(cpu_s / seconds, 2)


def round_figures(miss: dict[str, Any], hit: dict[str, Any]) -> dict[str, Any]:
    """One round's hit ÷ miss ratios, with what wrk and the gateways used to get there."""
    cpu_miss, cpu_hit = miss["cpu_us_per_request"], hit["cpu_us_per_request"]
    return {
        "cpu_ratio": round(cpu_hit / cpu_miss, 3) if cpu_hit and cpu_miss else None,
        "rps_ratio": round(hit["rps"] / miss["rps"], 3) if miss["rps"] else None,
        "hit_rps": hit["rps"], "miss_rps": miss["rps"],
        "hit_cpu_us_per_request": cpu_hit, "miss_cpu_us_per_request": cpu_miss,
        "hit_gateway_cpus": cpus_busy(hit.get("gateway_cpu_s"), hit["seconds"]),
        "miss_gateway_cpus": cpus_busy(miss.get("gateway_cpu_s"), miss["seconds"]),
        "hit_wrk_cpus": cpus_busy(hit["wrk_cpu_s"], hit["seconds"]),
        "miss_wrk_cpus": cpus_busy(miss["wrk_cpu_s"], miss["seconds"]),
        "hit_upstream_requests": hit["upstream_requests"],
        "miss_upstream_requests": miss["upstream_requests"],
        "hit_requests": hit["requests"], "miss_requests": miss["requests"],
    }


def unverified(rounds: list[dict[str, Any]], processes: int) -> list[str]:
    """What contradicts "hits reached no upstream, misses all did", round by round.

    A worker process that had not yet stored the answer may send it upstream
    once, so a hit run may reach nginx at most once per further process.
    """
    problems = []
    for number, r in enumerate(rounds, 1):
        if r["hit_upstream_requests"] > processes - 1:
            problems.append(f"round {number}: the cache-hit run sent "
                            f"{r['hit_upstream_requests']} requests to nginx")
        if r["miss_upstream_requests"] < r["miss_requests"]:
            problems.append(f"round {number}: the proxied miss run sent "
                            f"{r['miss_upstream_requests']} requests to nginx for "
                            f"{r['miss_requests']} answers")
    return problems


def cache_hit_comparison(miss_runs: list[dict[str, Any]], hit_runs: list[dict[str, Any]],
                         probes: dict[str, str], processes: int) -> dict[str, Any]:
    """Hit ÷ miss, CPU/request and req/s, per round and the median of the rounds' ratios.

    Per-round ratios pair runs that ran one after the other, so the noise a
    round shares cancels; ``verified`` is false when nginx's counter
    contradicts a run's claim to be a hit or a miss.
    """
    rounds = [round_figures(miss, hit) for miss, hit in zip(miss_runs, hit_runs)]
    problems = unverified(rounds, processes)
    out: dict[str, Any] = {"rounds": rounds, "probes": probes,
                           "verified": not problems, "problems": problems}
    for field in ("cpu_ratio", "rps_ratio", "hit_rps", "miss_rps", "hit_cpu_us_per_request",
                  "miss_cpu_us_per_request", "hit_gateway_cpus", "miss_gateway_cpus",
                  "hit_wrk_cpus", "miss_wrk_cpus"):
        value = median([r[field] for r in rounds])
        out[f"median_{field}"] = None if value is None else round(value, 3)
    return out
