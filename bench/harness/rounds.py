"""The measured load: every scenario's endpoints, one wrk run each, in interleaved rounds.

Direct and gateway runs alternate within each round so that machine noise
hits both sides alike; the figures are the medians over rounds.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from harness.cpu_memory import children_cpu_seconds, tree_cpu_seconds
from harness.processes import nginx_requests_served, nginx_requests_settled
from harness.scenarios import SCENARIOS, SMALL_64C
from harness.variants import BASELINE, LIMITER_OFF, LIMITER_ON, Variant
from harness.wrk import run_wrk

# {scenario key: {endpoint name: [one result per round]}}
Runs = dict[str, dict[str, list[dict[str, Any]]]]


class Endpoint(NamedTuple):
    """One wrk run of a round."""

    name: str                 # its key in the results: "direct", "gateway" or a variant's
    url: str
    wrk_threads: int | None   # None: 1 thread for 1 connection, 2 otherwise
    cpu_pid: int | None       # whose CPU counts; None for nginx (not measured)


def build_plan(urls: dict[str, dict[str, str]], gateway_pid: int,
               variants: list[Variant]) -> dict[str, list[Endpoint]]:
    """What each scenario runs in a round, in order: nginx, the gateway, then the variants."""
    plan = {s.key: [Endpoint("direct", urls[s.key]["direct"], None, None),
                    Endpoint("gateway", urls[s.key]["gateway"], None, gateway_pid)]
            for s in SCENARIOS}
    plan[SMALL_64C.key] += [Endpoint(v.name, v.url, v.wrk_threads, v.pid) for v in variants]
    baseline = next((v for v in variants if v.name == BASELINE), None)
    if baseline:
        # Calibration for the latency target too: what a bare Twisted proxy adds.
        plan["small_1c"].append(Endpoint(BASELINE, baseline.url, None, baseline.pid))
    return plan


def warm_up(plan: dict[str, list[Endpoint]], wrk: str, seconds: float) -> None:
    """Unrecorded load on every endpoint first, so no round pays for filling pools and caches."""
    for scenario in SCENARIOS:
        for endpoint in plan[scenario.key]:
            run_wrk(wrk, endpoint.url, scenario.connections, seconds, endpoint.wrk_threads)


def round_order(endpoints: list[Endpoint], round_number: int,
                swap_limiter_twins: bool) -> list[Endpoint]:
    """The plan's order; in even rounds the limiter twins swap, so neither always goes first."""
    order = list(endpoints)
    if round_number % 2 == 0 and swap_limiter_twins:
        i, j = (next(n for n, e in enumerate(order) if e.name == name)
                for name in (LIMITER_ON, LIMITER_OFF))
        order[i], order[j] = order[j], order[i]
    return order


def measure(wrk: str, endpoint: Endpoint, connections: int, duration: float,
            nginx_status_url: str) -> dict[str, Any]:
    """One wrk run, with the CPU its server used and the requests that reached nginx meanwhile.

    The CPU is the measured process's and its children's (workers'); nginx's
    count tells a cache hit, which sends it nothing, from a forwarded request.
    """
    pid = endpoint.cpu_pid
    served0 = nginx_requests_settled(nginx_status_url)
    cpu0 = tree_cpu_seconds(pid) if pid else 0.0
    kids0 = children_cpu_seconds(pid) if pid else {}
    r = run_wrk(wrk, endpoint.url, connections, duration, endpoint.wrk_threads)
    cpu1 = tree_cpu_seconds(pid) if pid else 0.0
    kids1 = children_cpu_seconds(pid) if pid else {}
    # Less one: the second reading counts itself.
    r["upstream_requests"] = nginx_requests_served(nginx_status_url) - served0 - 1
    if len(kids1) > 1:
        # How evenly the kernel spread the connections over the workers.
        r["worker_cpu_s"] = [round(kids1[k] - kids0.get(k, 0.0), 3) for k in sorted(kids1)]
    if pid:
        r["gateway_cpu_s"] = round(cpu1 - cpu0, 3)
        r["cpu_us_per_request"] = (
            round((cpu1 - cpu0) * 1e6 / r["requests"], 1) if r["requests"] else None)
    return r


def record_wrk_errors(what: str, r: dict[str, Any], raw: str, errors: list[str]) -> bool:
    """Non-2xx/3xx answers or socket errors make the run invalid: print wrk's report."""
    bad = [f"{n} {v}" for n, v in r["socket_errors"].items() if v]
    if not (r["non_2xx_3xx"] or bad):
        return False
    msg = (f"{what}: non-2xx/3xx responses "
           f"{r['non_2xx_3xx']}, socket errors {', '.join(bad) or 'none'}")
    print(f"  ERROR {msg}\n{raw}", file=sys.stderr)
    errors.append(msg)
    return True


def run_line(round_number: int, key: str, endpoint: Endpoint, r: dict[str, Any],
             failed: bool) -> str:
    """The progress line of one run."""
    cpu = f", CPU {r['cpu_us_per_request']} µs/req" if endpoint.cpu_pid else ""
    split = (f", per worker CPU {' / '.join(f'{c:.2f}' for c in r['worker_cpu_s'])} s"
             if "worker_cpu_s" in r else "")
    return (f"  round {round_number} {key:<10} {endpoint.name:<22} {r['rps']:>10.0f} req/s "
            f"p50 {r['p50_ms']:.3f} ms{cpu}{split}{'  (ERRORS)' if failed else ''}")


def run_rounds(plan: dict[str, list[Endpoint]], wrk: str, rounds: int, duration: float,
               swap_limiter_twins: bool, nginx_status_url: str, errors: list[str]) -> Runs:
    """Every scenario's endpoints, ``rounds`` times; wrk's errors go to ``errors``."""
    runs: Runs = {key: {endpoint.name: [] for endpoint in endpoints}
                  for key, endpoints in plan.items()}
    for round_number in range(1, rounds + 1):
        for scenario in SCENARIOS:
            swap = swap_limiter_twins and scenario.key == SMALL_64C.key
            for endpoint in round_order(plan[scenario.key], round_number, swap):
                r = measure(wrk, endpoint, scenario.connections, duration, nginx_status_url)
                raw = r.pop("raw")
                failed = record_wrk_errors(f"round {round_number} {scenario.key} {endpoint.name}",
                                           r, raw, errors)
                runs[scenario.key][endpoint.name].append(r)
                print(run_line(round_number, scenario.key, endpoint, r, failed))
    return runs
