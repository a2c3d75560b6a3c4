"""One benchmark run, step by step: start the servers, load them, measure the rest, report.

Figures go into ``Run.results`` (written as JSON at the end), errors into
``Run.errors`` (exit status 1); a ``BenchError`` ends the run early.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cache_hit import cache_hit_comparison, check_answers_from_cache, check_forwards
from harness.cpu_memory import OtherProcessesMeter, proc_memory_mb
from harness.errors import BenchError
from harness.fixtures import chain_body, check_bodies, underlying_body
from harness.gateway_log import scan_gateway_log
from harness.idle_connections import hold_idle_connections
from harness.locations import LOOPBACK, Tools
from harness.machine import machine_info
from harness.processes import (
    NGINX_STATUS_PATH,
    Launcher,
    Processes,
    run_limiter_script,
    start_nginx,
)
from harness.profiling import profile_gateway
from harness.report import print_header, print_report, print_targets
from harness.rounds import Runs, build_plan, run_rounds, warm_up
from harness.scenarios import SMALL_64C, scenario_urls
from harness.summary import summarise_runs
from harness.targets import evaluate_targets
from harness.variants import CACHE_HIT, Variant, start_variants


@dataclass
class Run:
    """One run's options, tools and children, and what it has found so far."""

    args: argparse.Namespace
    tools: Tools
    procs: Processes
    tmp: Path
    nofile: int                  # our open-file limit, raised: idle connections need it
    results: dict[str, Any] = field(default_factory=dict)   # written as JSON at the end
    errors: list[str] = field(default_factory=list)          # any makes the exit status 1


@dataclass
class Servers:
    """What a run started and loads: nginx, the gateway, and the variants next to it."""

    nginx_port: int
    nginx: subprocess.Popen
    gateway_port: int
    gateway: subprocess.Popen
    gateway_log: Path
    urls: dict[str, dict[str, str]]
    variants: list[Variant]
    variant_logs: list[Path]
    cache_probes: dict[str, str]   # Cache-Status of the miss and the hit before the load

    @property
    def nginx_status_url(self) -> str:
        """nginx's request counter."""
        return f"http://{LOOPBACK}:{self.nginx_port}{NGINX_STATUS_PATH}"


def run_settings(args: argparse.Namespace, nofile: int) -> dict[str, Any]:
    """The options that shape the figures, for the JSON results."""
    return {"duration_s": args.duration, "rounds": args.rounds,
            "warmup_s": args.warmup, "workers": args.workers,
            "compare_workers": args.compare_workers,
            "limiter_cost": args.limiter_cost, "baseline": args.baseline,
            "cache_hit": args.cache_hit,
            "idle_connections": None if args.no_idle else args.idle_connections,
            "nofile_limit": nofile}


def start_servers(run: Run) -> Servers:
    """nginx and the gateway, checked byte for byte before any load; then the variants."""
    nginx_port, nginx = start_nginx(run.tmp, run.procs, run.tools.nginx)
    launcher = Launcher(run.tmp, run.procs, run.tools.twistd, nginx_port)
    gateway_port, gateway, gateway_log = launcher.start_gateway(run.args.workers)
    print(f"  nginx on {LOOPBACK}:{nginx_port}, gateway (pid {gateway.pid}) on "
          f"{LOOPBACK}:{gateway_port}, work dir {run.tmp}")
    run.results["bodies"] = {"small_bytes": len(underlying_body()),
                             "chain_bytes": len(chain_body())}
    run.errors += check_bodies(nginx_port, gateway_port, "before load")
    if run.errors:
        raise BenchError("; ".join(run.errors))
    urls = scenario_urls(nginx_port, gateway_port)
    variants, variant_logs = start_variants(run.args, launcher, urls[SMALL_64C.key]["gateway"],
                                            gateway.pid)
    cache_probes = probe_hit_and_miss(variants, urls[SMALL_64C.key]["gateway"],
                                      run.args.workers or 1)
    return Servers(nginx_port, nginx, gateway_port, gateway, gateway_log, urls, variants,
                   variant_logs, cache_probes)


def probe_hit_and_miss(variants: list[Variant], gateway_url: str,
                       processes: int) -> dict[str, str]:
    """Before the load: the gateway forwards the hot key, the cache-hit twin answers it.

    Their ``Cache-Status``; none when the cache-hit twin does not run.
    """
    hit = next((v for v in variants if v.name == CACHE_HIT), None)
    if hit is None:
        return {}
    probes = {"miss": check_forwards(gateway_url),
              "hit": check_answers_from_cache(hit.url, processes)}
    print(f"  hot key: the gateway answers Cache-Status: {probes['miss']}; "
          f"the cache-hit twin: {probes['hit']}")
    return probes


def run_load(run: Run, servers: Servers) -> tuple[Runs, dict[str, float]]:
    """Warm-up, the rounds, then the bodies again; the runs and the gateway's memory after."""
    args, wrk = run.args, run.tools.wrk
    plan = build_plan(servers.urls, servers.gateway.pid, servers.variants)
    if args.warmup:
        warm_up(plan, wrk, args.warmup)
    gateway_pid = servers.gateway.pid
    measured = [gateway_pid, servers.nginx.pid,
                *sorted({v.pid for v in servers.variants} - {gateway_pid})]
    meter = OtherProcessesMeter(measured)
    runs = run_rounds(plan, wrk, args.rounds, args.duration, args.limiter_cost,
                      servers.nginx_status_url, run.errors)
    memory_after = proc_memory_mb(gateway_pid)
    others = meter.cpus_busy()
    run.results["other_processes_cpus_busy"] = round(max(0.0, others), 2)
    if others > 0.1:
        print(f"  WARNING: other processes kept {others:.2f} CPUs busy during the runs "
              f"(of {os.cpu_count()}); the figures are noisy", file=sys.stderr)
    run.errors += check_bodies(servers.nginx_port, servers.gateway_port, "after load")
    return runs, memory_after


def measure_idle_connections(count: int, nofile: int, servers: Servers,
                             errors: list[str]) -> dict[str, Any]:
    """Hold ``count`` idle connections on the gateway; all must be held, /health must answer."""
    need = count + 256
    if nofile < need:
        raise BenchError(f"RLIMIT_NOFILE is {nofile}; {need} needed for "
                         f"{count} idle connections")
    print(f"  holding {count} idle keep-alive connections…")
    idle = hold_idle_connections(servers.gateway_port, count, servers.gateway.pid)
    idle["rss_mb_after_close"] = round(proc_memory_mb(servers.gateway.pid)["VmRSS"], 1)
    if idle["errors"] or idle["held"] != count:
        msg = f"idle connections: {idle['held']} of {count} held, errors {idle['errors']}"
        print(f"  ERROR {msg}", file=sys.stderr)
        errors.append(msg)
    if idle["health_while_held"] != 200:
        errors.append(f"idle connections: /health answered {idle['health_while_held']} "
                      "while they were held")
    return idle


def check_children(procs: Processes, gateway: subprocess.Popen, errors: list[str]) -> None:
    """A server that exited during the run invalidates it."""
    if gateway.poll() is not None:
        errors.append(f"the gateway exited with status {gateway.returncode} during the run")
    for name, status in procs.exited():
        if name != "limiter":
            errors.append(f"{name} exited with status {status} during the run")


def check_gateway_logs(servers: Servers, results: dict[str, Any], errors: list[str]) -> None:
    """Error/critical events in any gateway's log are errors; the main log's counts are kept."""
    for log in servers.variant_logs:
        for what, count in scan_gateway_log(log)["errors"].items():
            msg = f"{log.stem} logged {count} × {what}"
            print(f"  ERROR {msg}", file=sys.stderr)
            errors.append(msg)
    results["gateway_log"] = scan_gateway_log(servers.gateway_log)
    bad = {k: v for k, v in results["gateway_log"]["responses_by_status_and_outcome"].items()
           if not k.startswith(("2", "3"))}
    if bad:
        print(f"  gateway access log, non-2xx/3xx answers by status and outcome: {bad}",
              file=sys.stderr)
    for what, count in results["gateway_log"]["errors"].items():
        msg = f"the gateway logged {count} × {what}"
        print(f"  ERROR {msg}", file=sys.stderr)
        errors.append(msg)


def profile_gateways(run: Run, servers: Servers) -> None:
    """``--profile``: py-spy on the gateway at 64 connections, and on the cache-hit twin."""
    seconds, out_dir = run.args.profile, run.args.output.parent
    print(f"  profiling the gateway with py-spy for {seconds:g}s at 64 connections…")
    run.results["profile"] = profile_gateway(servers.gateway.pid,
                                             servers.urls[SMALL_64C.key]["gateway"],
                                             run.tools.wrk, seconds, out_dir, SMALL_64C.key)
    hit = next((v for v in servers.variants if v.name == CACHE_HIT), None)
    if hit:
        print(f"  profiling the cache-hit twin with py-spy for {seconds:g}s at 64 connections…")
        run.results["profile_cache_hit"] = profile_gateway(hit.pid, hit.url, run.tools.wrk,
                                                           seconds, out_dir, "cache_hit")


def measure_after_rounds(run: Run, servers: Servers) -> None:
    """What the options add after the rounds: a profile, idle connections, the limiter alone."""
    args = run.args
    if args.profile:
        profile_gateways(run, servers)
    if not args.no_idle and args.idle_connections:
        run.results["idle"] = measure_idle_connections(args.idle_connections, run.nofile,
                                                       servers, run.errors)
    if args.limiter_cost:
        print("  measuring the limiter on its own (bench/limiter.py)…")
        run.results["limiter"] = run_limiter_script(run.tools.twistd, run.tmp, run.procs)


def compare_cache_hit(run: Run, runs: Runs, servers: Servers) -> None:
    """Hit ÷ miss in each round; a run that nginx's counter contradicts is an error."""
    small = runs[SMALL_64C.key]
    comparison = cache_hit_comparison(small["gateway"], small[CACHE_HIT], servers.cache_probes,
                                      run.args.workers or 1)
    run.results["cache_hit"] = comparison
    for problem in comparison["problems"]:
        print(f"  ERROR cache hit vs miss: {problem}", file=sys.stderr)
        run.errors.append(f"cache hit vs miss: {problem}")


def run_benchmark(run: Run) -> None:
    """Every step of a run, in order, up to the printed targets."""
    args, results = run.args, run.results
    results["machine"] = machine_info(run.tools.twistd)
    results["settings"] = run_settings(args, run.nofile)
    print_header(results["machine"])
    servers = start_servers(run)
    runs, memory_after = run_load(run, servers)
    results.update(summarise_runs(runs, servers.variants, args.limiter_cost,
                                  args.compare_workers, memory_after))
    if servers.cache_probes:
        compare_cache_hit(run, runs, servers)
    measure_after_rounds(run, servers)
    check_children(run.procs, servers.gateway, run.errors)
    check_gateway_logs(servers, results, run.errors)
    print_report(results)
    results["targets"] = evaluate_targets(results)
    print_targets(results["targets"])
