"""The text report (stdout) and the JSON results file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from harness.scenarios import SCENARIOS, SMALL_64C


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "-" when there is no figure."""
    return "-" if value is None else format(value, spec)


def verdict(ok: bool | str | None) -> str:
    """PASS/FAIL, SKIP when not run, or the text itself ("INFO": a figure without a target)."""
    if isinstance(ok, str):
        return ok
    return {True: "PASS", False: "FAIL", None: "SKIP"}[ok]


def print_header(machine: dict[str, Any]) -> None:
    """What runs where: the first lines of the report."""
    if not machine.get("installed_matches_checkout"):
        print("WARNING: the installed deltagw differs from the checkout; run "
              "`.venv/bin/pip install -q .` to benchmark the working tree", file=sys.stderr)
    print(f"deltagw benchmark — {machine['date']} — {machine['nproc']} CPU "
          f"({machine['cpu_model']}), Python {machine.get('python')}, "
          f"Twisted {machine.get('twisted')}, deltagw {machine.get('deltagw')} "
          f"@ {machine['git_commit']}")
    print(f"  load average at start {' '.join(machine['loadavg_at_start'])}; "
          f"kernel {machine['kernel']}, {machine['wrk']}, {machine['nginx']}")


def print_scenario_table(summary: dict[str, Any]) -> None:
    """Direct and gateway medians, one line per scenario."""
    print()
    print(f"{'scenario':<42}{'direct req/s':>13}{'gateway req/s':>15}{'ratio':>8}"
          f"{'direct p50':>12}{'gateway p50':>13}{'CPU/req':>10}")
    for scenario in SCENARIOS:
        s = summary[scenario.key]
        print(f"{s['description']:<42}{fmt(s['direct_rps'], ',.0f'):>13}"
              f"{fmt(s['gateway_rps'], ',.0f'):>15}{fmt(s['rps_ratio'], '.3f'):>8}"
              f"{fmt(s['direct_p50_ms'], '.3f') + ' ms':>12}"
              f"{fmt(s['gateway_p50_ms'], '.3f') + ' ms':>13}"
              f"{fmt(s['gateway_cpu_us_per_request'], '.0f') + ' µs':>10}")


def print_variant_table(gateway: dict[str, Any], variants: dict[str, Any],
                        workers: dict[str, Any] | None) -> None:
    """The gateway's small_64c medians, then every variant's."""
    print(f"\nsmall JSON (~600 B), 64 connections, same rounds{'':<14}"
          f"{'req/s':>10}{'p50':>12}{'CPU/req':>10}")
    rows = [("gateway (the main one, limiter on), wrk 2 threads", gateway["gateway_rps"],
             gateway["gateway_p50_ms"], gateway["gateway_cpu_us_per_request"])]
    rows += [(v["label"] + ("" if v["wrk_threads"] == 1 else ", wrk 2 threads"),
              v["rps"], v["p50_ms"], v["cpu_us_per_request"])
             for v in variants.values()]
    for label, rps, p50, cpu in rows:
        print(f"  {label:<66}{fmt(rps, ',.0f'):>10}{fmt(p50, '.3f') + ' ms':>12}"
              f"{fmt(cpu, '.0f') + ' µs':>10}")
    if workers:
        print(f"  (--workers {workers['workers']}: CPU/req sums the parent and its "
              f"workers; wrk (1 thread), nginx and the gateway share the "
              f"{os.cpu_count()} CPUs, so the ratio is a lower bound)")


def hit_miss(figures: dict[str, Any], field: str, spec: str, prefix: str = "") -> str:
    """``hit / miss`` of one figure of the cache-hit comparison."""
    return (f"{fmt(figures[f'{prefix}hit_{field}'], spec)} / "
            f"{fmt(figures[f'{prefix}miss_{field}'], spec)}")


def cache_hit_row(label: str, figures: dict[str, Any], prefix: str = "") -> str:
    """One line of the cache-hit table: a round's figures, or (``prefix="median_"``) the medians."""
    reached_nginx = "" if prefix else hit_miss(figures, "upstream_requests", ",")
    return (f"  {label:<9}{fmt(figures[f'{prefix}rps_ratio'], '.2f') + ' ×':>8}"
            f"{hit_miss(figures, 'rps', ',.0f', prefix):>17}"
            f"{fmt(figures[f'{prefix}cpu_ratio'], '.2f') + ' ×':>9}"
            f"{hit_miss(figures, 'cpu_us_per_request', '.0f', prefix) + ' µs':>14}"
            f"{hit_miss(figures, 'gateway_cpus', '.2f', prefix):>14}"
            f"{hit_miss(figures, 'wrk_cpus', '.2f', prefix):>13}{reached_nginx:>18}").rstrip()


def print_cache_hit(comparison: dict[str, Any]) -> None:
    """Hit ÷ miss per round and the medians of the rounds' ratios, with what they rest on."""
    probes = comparison["probes"]
    print(f"\ncache hit (twin) ÷ proxied miss (the gateway), {SMALL_64C.description}, "
          f"one hot key; pairs are hit / miss")
    print(f"  Cache-Status before the load: miss {probes['miss']!r}, hit {probes['hit']!r}")
    print(f"  {'':<9}{'req/s ÷':>8}{'req/s':>17}{'CPU ÷':>9}{'CPU/req':>14}"
          f"{'gateway CPUs':>14}{'wrk CPUs':>13}{'reached nginx':>18}")
    for number, figures in enumerate(comparison["rounds"], 1):
        print(cache_hit_row(f"round {number}", figures))
    print(cache_hit_row("median", comparison, "median_"))
    if not comparison["verified"]:
        print("  NOT VERIFIED: " + "; ".join(comparison["problems"]))


def limiter_line(limiter: dict[str, Any]) -> str:
    """bench/limiter.py's figures in one line."""
    redis = limiter["redis"]
    return (f"limiter on its own (bench/limiter.py): in-process "
            f"{limiter['local']['us_per_call']:.2f} µs CPU per consume; Redis "
            + (redis["skipped"] if "skipped" in redis else
               f"{redis['median_ms']:.3f} ms median, {redis['p99_ms']:.3f} ms "
               f"p99, {redis['failures']} timeouts/failures, client CPU "
               f"{redis['client_cpu_us_per_call']:.0f} µs/call incl. kernel "
               f"loopback (redis {redis['redis_version']})"))


def print_machine_lines(results: dict[str, Any]) -> None:
    """How busy the rest of the machine was, and the gateway's memory and log."""
    mem = results["gateway_memory_after_runs_mb"]
    print(f"other processes on the machine during the runs: "
          f"{results['other_processes_cpus_busy']:.2f} CPUs busy (of {os.cpu_count()})")
    print(f"gateway memory after the runs: RSS {mem['rss']} MB, peak (VmHWM) {mem['hwm']} MB; "
          f"access log {results['gateway_log']['lines']} lines, "
          f"{sum(results['gateway_log']['errors'].values())} error/critical events")


def idle_line(idle: dict[str, Any]) -> str:
    """The idle connections' figures in one line."""
    return (f"idle connections: {idle['held']} of {idle['requested']} held "
            f"(established in {idle['seconds_to_establish']} s), gateway RSS "
            f"{idle['rss_mb_while_held']} MB while held, {idle['rss_mb_after_close']} MB "
            f"after closing; /health while held: {idle['health_while_held']}")


def print_profile(profile: dict[str, Any], what: str) -> None:
    """py-spy's top frames by own time, and the top source files, of ``what``."""
    print(f"\npy-spy, {what} at 64 connections, top 15 by own time "
          f"({profile['samples']} samples, raw: {profile['raw']}):")
    for row in profile["top_own"]:
        print(f"  {row['pct']:>5.1f}%  {row['frame']}")
    print("by source file, own time:")
    for row in profile["top_own_by_file"][:10]:
        print(f"  {row['pct']:>5.1f}%  {row['frame']}")


def print_report(results: dict[str, Any]) -> None:
    """Everything but the targets: tables of medians, then one line per other measurement."""
    print_scenario_table(results["summary"])
    if results["small_64c_variants"]:
        print_variant_table(results["summary"][SMALL_64C.key], results["small_64c_variants"],
                            results.get("workers_comparison"))
    if "cache_hit" in results:
        print_cache_hit(results["cache_hit"])
    if "limiter" in results:
        print(limiter_line(results["limiter"]))
    print_machine_lines(results)
    if results.get("idle"):
        print(idle_line(results["idle"]))
    if "profile" in results:
        print_profile(results["profile"], "gateway")
    if "profile_cache_hit" in results:
        print_profile(results["profile_cache_hit"], "cache-hit twin")


def print_targets(targets: list[dict[str, str]]) -> None:
    """One line per target: verdict, target, figure."""
    print("\ntargets:")
    for target in targets:
        print(f"  {target['result']:<5} {target['target']:<52} {target['value']}")


def write_results(path: Path, results: dict[str, Any]) -> int:
    """Write the JSON results, say where, list the errors; the exit status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {path} ({results['elapsed_s']} s)")
    if results["errors"]:
        print("ERRORS:", *results["errors"], sep="\n  ", file=sys.stderr)
        return 1
    return 0
