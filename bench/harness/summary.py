"""Medians over rounds, and the comparisons the variants were run for."""

from __future__ import annotations

import statistics
from typing import Any

from harness.rounds import Runs
from harness.scenarios import SCENARIOS, SMALL_64C, Scenario
from harness.variants import LIMITER_OFF, LIMITER_ON, ONE_PROCESS, Variant, workers_variant_name


def median(values: list[float | None]) -> float | None:
    """The median of the values that are there (a run without requests has no CPU/request)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(runs: list[dict[str, Any]], field: str) -> float | None:
    """The median of one figure over rounds."""
    return median([r[field] for r in runs])


def summarise_scenario(scenario: Scenario, runs: Runs) -> dict[str, Any]:
    """Direct and gateway medians of one scenario, their ratio and the latency added."""
    d, g = runs[scenario.key]["direct"], runs[scenario.key]["gateway"]
    s = {
        "description": scenario.description, "connections": scenario.connections,
        "direct_rps": medians(d, "rps"),
        "gateway_rps": medians(g, "rps"),
        "direct_p50_ms": medians(d, "p50_ms"),
        "gateway_p50_ms": medians(g, "p50_ms"),
        "gateway_cpu_us_per_request": medians(g, "cpu_us_per_request"),
    }
    s["rps_ratio"] = s["gateway_rps"] / s["direct_rps"] if s["direct_rps"] else None
    s["added_p50_ms"] = s["gateway_p50_ms"] - s["direct_p50_ms"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}


def summarise_variants(runs: Runs, variants: list[Variant]) -> dict[str, Any]:
    """Each variant's medians of req/s, p50 and CPU/request."""
    small = runs[SMALL_64C.key]
    return {v.name: {"label": v.label, "wrk_threads": v.wrk_threads or 2,
                     "rps": medians(small[v.name], "rps"),
                     "p50_ms": medians(small[v.name], "p50_ms"),
                     "cpu_us_per_request": medians(small[v.name], "cpu_us_per_request")}
            for v in variants}


def limiter_cost(runs: Runs, variant_summary: dict[str, Any]) -> dict[str, Any]:
    """CPU/request of the limiter twins, on − off, per round and as the median of those."""
    pairs = zip(runs[SMALL_64C.key][LIMITER_ON], runs[SMALL_64C.key][LIMITER_OFF])
    diffs = [on["cpu_us_per_request"] - off["cpu_us_per_request"] for on, off in pairs
             if on["cpu_us_per_request"] is not None
             and off["cpu_us_per_request"] is not None]
    on, off = variant_summary[LIMITER_ON], variant_summary[LIMITER_OFF]
    return {
        "cpu_us_per_request_on": on["cpu_us_per_request"],
        "cpu_us_per_request_off": off["cpu_us_per_request"],
        "per_round_difference_us": [round(d, 1) for d in diffs],
        "median_difference_us": round(median(diffs), 1) if diffs else None,
        "rps_on": on["rps"], "rps_off": off["rps"],
    }


def workers_comparison(runs: Runs, workers: int) -> dict[str, Any]:
    """Throughput of ``--workers N`` ÷ one process, both with wrk on 1 thread."""
    one = runs[SMALL_64C.key][ONE_PROCESS]
    many = runs[SMALL_64C.key][workers_variant_name(workers)]
    ratio = (medians(many, "rps") / medians(one, "rps") if medians(one, "rps") else None)
    return {
        "workers": workers, "wrk_threads": 1,
        "rps_one_process": medians(one, "rps"),
        "rps_workers": medians(many, "rps"),
        "ratio": round(ratio, 3) if ratio else None,
        "per_round_ratio": [round(m["rps"] / o["rps"], 3) if o["rps"] else None
                            for o, m in zip(one, many)],
        "note": "wrk, nginx and the gateway share the machine's CPUs: a lower bound",
    }


def summarise_runs(runs: Runs, variants: list[Variant], limiter_twins: bool,
                   compare_workers: int, memory_after: dict[str, float]) -> dict[str, Any]:
    """The results' figures from the rounds, under their keys in the JSON results."""
    summary = {scenario.key: summarise_scenario(scenario, runs) for scenario in SCENARIOS}
    out: dict[str, Any] = {"runs": runs, "summary": summary,
                           "small_64c_variants": summarise_variants(runs, variants)}
    if limiter_twins:
        out["limiter_cost_in_gateway"] = limiter_cost(runs, out["small_64c_variants"])
    if compare_workers:
        out["workers_comparison"] = workers_comparison(runs, compare_workers)
    out["gateway_memory_after_runs_mb"] = {
        "rss": round(memory_after["VmRSS"], 1), "hwm": round(memory_after["VmHWM"], 1)}
    return out
