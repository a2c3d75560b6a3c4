#!/usr/bin/env python3
"""deltagw benchmark: the gateway in front of nginx, compared with nginx alone.

One command (``.venv/bin/python bench/run.py``) starts an unprivileged nginx
serving fixed JSON bodies on loopback, starts ``twistd -n deltagw`` pointed at
it, and drives both with ``wrk``, interleaving direct and gateway runs so that
machine noise hits both sides alike. It reports medians over rounds, ratios to
the direct runs, the gateway's CPU time per request and memory, holds many
idle keep-alive connections, checks the issue's targets, and writes
``bench/results/latest.json``.

Standard library only (run it with the venv's Python so ``twistd`` is found).
Exit status: 0 when every run was clean (a missed target is reported, not an
error); 1 on errors (non-2xx responses, socket errors, wrong bodies, a process
that would not start); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.cpu_memory import (children_cpu_seconds, machine_busy_seconds, ours_cpu_seconds,
                                proc_memory_mb, tree_cpu_seconds)
from harness.errors import BenchError, Interrupted
from harness.fixtures import check_bodies, chain_body, underlying_body
from harness.gateway_log import scan_gateway_log
from harness.idle_connections import hold_idle_connections
from harness.locations import BENCH_DIR, LOOPBACK, REPO_DIR
from harness.machine import machine_info
from harness.polling import http_get, wait_until
from harness.processes import (Processes, raise_nofile, run_limiter_script, start_baseline,
                               start_gateway, start_nginx)
from harness.profiling import profile_gateway
from harness.wrk import run_wrk

# (key, description, direct path on nginx, gateway path, connections)
SCENARIOS = [
    ("small_1c", "small JSON (~600 B), 1 connection",
     "/underlying/NIFTY", "/api/data/underlying/NIFTY", 1),
    ("small_64c", "small JSON (~600 B), 64 connections",
     "/underlying/NIFTY", "/api/data/underlying/NIFTY", 64),
    ("chain_16c", "20 KB JSON pass-through, 16 connections",
     "/option/chain/NIFTY", "/api/data/chain/NIFTY", 16),
]

# The issue's targets.
TARGET_CPU_US = 350.0
TARGET_ADDED_P50_MS = 0.35
TARGET_THROUGHPUT_RATIO = 0.06
TARGET_PASSTHROUGH_RATIO = 0.06
TARGET_RSS_MB = 80.0
TARGET_IDLE_CONNECTIONS = 10_000
TARGET_IDLE_RSS_MB = 300.0
TARGET_WORKERS_RATIO = 1.6      # issue 9 item 3: 2 workers vs 1 process at 64 connections
TARGET_LIMITER_LOCAL_US = 5.0   # issue 5 item 7 (bench/limiter.py)
TARGET_LIMITER_REDIS_MS = 1.0
TARGET_CPU_VS_BASELINE = 0.85   # gateway CPU/request ÷ the bare Twisted proxy's (64 connections)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- main


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def verdict(ok: bool | str | None) -> str:
    if isinstance(ok, str):  # "INFO": a figure reported without a target
        return ok
    return {True: "PASS", False: "FAIL", None: "SKIP"}[ok]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per wrk run, whole (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of interleaved direct/gateway runs (default 3, min 1)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unrecorded load per scenario and target first, whole (default 1; 0 = none)")
    parser.add_argument("--idle-connections", type=int, default=TARGET_IDLE_CONNECTIONS,
                        metavar="N", help="idle keep-alive connections to hold (default 10000)")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-connections scenario")
    parser.add_argument("--workers", type=int, default=None,
                        help="pass --workers=N to the gateway (only if it supports it)")
    parser.add_argument("--compare-workers", type=int, default=2, metavar="N",
                        help="also run small_64c through one process and through --workers N, "
                             "wrk with 1 thread for both, and report the throughput ratio "
                             "(default 2; 0 = off)")
    parser.add_argument("--limiter-cost", action=argparse.BooleanOptionalAction, default=True,
                        help="also run small_64c through a gateway with RATE_LIMIT_REQUESTS=0 "
                             "(CPU/request difference) and run bench/limiter.py (default on)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run small_64c through bench/baseline_proxy.py, a bare "
                             "Twisted proxy, for calibration (default on)")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                        help="also run small_64c through a twin gateway with SPEEDUPS=0 (stock "
                             "public Twisted only) and report its CPU/request (default on)")
    parser.add_argument("--previous-twistd", type=Path, default=None, metavar="PATH",
                        help="also run small_64c through a gateway started with this twistd "
                             "(another venv, e.g. the code before a change): before and after "
                             "in the same run")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="also sample the gateway with py-spy under the 64-connection "
                             "load for SECONDS and print the top 15 frames by own time")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.json",
                        help="results file (default bench/results/latest.json)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temporary directory (logs, nginx conf) for inspection")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.idle_connections < 0:
        parser.error("--rounds must be ≥ 1, --duration > 0, --warmup and --idle-connections ≥ 0")
    if args.compare_workers == 1 or args.compare_workers < 0:
        parser.error("--compare-workers must be 0 (off) or ≥ 2")
    if args.compare_workers and (args.workers or 1) > 1:
        parser.error("--compare-workers compares with a single-process gateway: omit --workers")

    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    twistd = next((str(p) for p in (Path(sys.executable).parent / "twistd",
                                     REPO_DIR / ".venv" / "bin" / "twistd") if p.exists()), None)
    missing = [name for name, path in (("wrk", wrk), ("nginx", nginx), ("twistd", twistd)) if not path]
    if missing:
        print(f"bench: not found: {', '.join(missing)}", file=sys.stderr)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    # Ctrl-C must unwind through the cleanup even if our parent ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    nofile = raise_nofile()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="deltagw-bench-"))
    errors: list[str] = []
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        results["machine"] = machine_info(twistd)
        results["settings"] = {"duration_s": args.duration, "rounds": args.rounds,
                               "warmup_s": args.warmup, "workers": args.workers,
                               "compare_workers": args.compare_workers,
                               "limiter_cost": args.limiter_cost, "baseline": args.baseline,
                               "idle_connections": None if args.no_idle else args.idle_connections,
                               "nofile_limit": nofile}
        m = results["machine"]
        if not m.get("installed_matches_checkout"):
            print("WARNING: the installed deltagw differs from the checkout; run "
                  "`.venv/bin/pip install -q .` to benchmark the working tree", file=sys.stderr)
        print(f"deltagw benchmark — {m['date']} — {m['nproc']} CPU ({m['cpu_model']}), "
              f"Python {m.get('python')}, Twisted {m.get('twisted')}, deltagw {m.get('deltagw')} "
              f"@ {m['git_commit']}")
        print(f"  load average at start {' '.join(m['loadavg_at_start'])}; "
              f"kernel {m['kernel']}, {m['wrk']}, {m['nginx']}")

        direct_port, nginx_proc = start_nginx(tmp, procs, nginx)
        gw_port, gw, gw_log = start_gateway(tmp, procs, twistd, direct_port, args.workers)
        print(f"  nginx on {LOOPBACK}:{direct_port}, gateway (pid {gw.pid}) on {LOOPBACK}:{gw_port}, "
              f"work dir {tmp}")
        results["bodies"] = {"small_bytes": len(underlying_body()), "chain_bytes": len(chain_body())}
        errors += check_bodies(direct_port, gw_port, "before load")
        if errors:
            raise BenchError("; ".join(errors))

        urls = {key: {"direct": f"http://{LOOPBACK}:{direct_port}{dpath}",
                      "gateway": f"http://{LOOPBACK}:{gw_port}{gpath}"}
                for key, _, dpath, gpath, _ in SCENARIOS}

        # Variants of small_64c run in the same rounds, right after the gateway's run:
        # (name, label, url, wrk threads or None for the default, pid whose CPU counts).
        small_path = SCENARIOS[1][3]
        variants: list[tuple[str, str, str, int | None, int]] = []
        variant_logs: list[Path] = []
        if args.limiter_cost:
            # Two fresh twins that serve only this load, so that both have the same
            # history (the main gateway serves every scenario); their order
            # alternates between rounds.
            for name, label, env in (
                    ("limiter_on", "limiter on (large budget)", {}),
                    ("limiter_off", "limiter off (RATE_LIMIT_REQUESTS=0)",
                     {"RATE_LIMIT_REQUESTS": "0"})):
                port, proc, log = start_gateway(tmp, procs, twistd, direct_port, args.workers,
                                                name=f"gateway-{name.replace('_', '-')}",
                                                extra_env=env)
                variants.append((f"gateway_{name}", f"gateway twin, {label}",
                                 f"http://{LOOPBACK}:{port}{small_path}", None, proc.pid))
                variant_logs.append(log)
        twins = [("stock", "gateway twin, SPEEDUPS=0", twistd, {"SPEEDUPS": "0"})
                 ] if args.stock else []
        if args.previous_twistd:
            twins.append(("previous", f"previous gateway ({args.previous_twistd})",
                          str(args.previous_twistd), {}))
        for name, label, command, env in twins:
            port, proc, log = start_gateway(tmp, procs, command, direct_port, args.workers,
                                            name=f"gateway-{name}", extra_env=env)
            variants.append((f"gateway_{name}", label,
                             f"http://{LOOPBACK}:{port}{small_path}", None, proc.pid))
            variant_logs.append(log)
        baseline: tuple[str, int] | None = None
        if args.baseline:
            port, proc = start_baseline(tmp, procs, str(Path(twistd).parent / "python"),
                                        direct_port)
            baseline = (f"http://{LOOPBACK}:{port}{SCENARIOS[1][2]}", proc.pid)
            variants.append(("baseline_proxy", "bare Twisted proxy (bench/baseline_proxy.py)",
                             baseline[0], None, proc.pid))
        if args.compare_workers:
            port, proc, log = start_gateway(tmp, procs, twistd, direct_port, args.compare_workers,
                                            name=f"gateway-workers{args.compare_workers}")
            # /health answers once any worker serves; wait for all of them to exist
            # (the warm-up then gives each time to adopt the socket).
            wait_until(lambda: len(children_cpu_seconds(proc.pid)) >= args.compare_workers,
                       20, f"{args.compare_workers} workers", alive=lambda: proc.poll() is None)
            if not args.warmup:
                time.sleep(2)
            variants.append(("gateway_1proc_t1", "gateway, 1 process, wrk 1 thread",
                             urls["small_64c"]["gateway"], 1, gw.pid))
            variants.append((f"gateway_workers{args.compare_workers}_t1",
                             f"gateway --workers {args.compare_workers}, wrk 1 thread",
                             f"http://{LOOPBACK}:{port}{small_path}", 1, proc.pid))
            variant_logs.append(log)
        for name, label, url, _, pid in variants:
            status, body, _ = http_get(url)
            if status != 200 or body != underlying_body():
                raise BenchError(f"body check: {label} answered {status} with "
                                 f"{len(body)} bytes, not the fixture")
        if variants:
            print("  also at 64 connections: " + "; ".join(
                f"{label} (pid {pid})" for _, label, _, _, pid in variants))

        # What each scenario runs in a round: (target, url, wrk threads, pid for CPU).
        plan: dict[str, list[tuple[str, str, int | None, int | None]]] = {
            key: [("direct", urls[key]["direct"], None, None),
                  ("gateway", urls[key]["gateway"], None, gw.pid)] for key, *_ in SCENARIOS}
        plan["small_64c"] += [(name, url, threads, pid) for name, _, url, threads, pid in variants]
        if baseline:
            # Calibration for the latency target too: what a bare Twisted proxy adds.
            plan["small_1c"].append(("baseline_proxy", baseline[0], None, baseline[1]))
        if args.warmup:
            for key, _, _, _, conns in SCENARIOS:
                for target, url, threads, _ in plan[key]:
                    run_wrk(wrk, url, conns, args.warmup, threads)

        # How much of the machine did other processes take? (noise indicator)
        measured = [gw.pid, nginx_proc.pid, *sorted({pid for *_, pid in variants} - {gw.pid})]
        busy0, ours0, wall0 = machine_busy_seconds(), ours_cpu_seconds(measured), \
            time.monotonic()
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            key: {target: [] for target, *_ in plan[key]} for key, *_ in SCENARIOS}
        for rnd in range(1, args.rounds + 1):
            for key, desc, _, _, conns in SCENARIOS:
                order = list(plan[key])
                if rnd % 2 == 0 and key == "small_64c" and args.limiter_cost:
                    i, j = (next(n for n, t in enumerate(order) if t[0] == name)
                            for name in ("gateway_limiter_on", "gateway_limiter_off"))
                    order[i], order[j] = order[j], order[i]
                for target, url, threads, pid in order:
                    # The process and its children: a --workers parent and its workers.
                    cpu0 = tree_cpu_seconds(pid) if pid else 0.0
                    kids0 = children_cpu_seconds(pid) if pid else {}
                    r = run_wrk(wrk, url, conns, args.duration, threads)
                    cpu1 = tree_cpu_seconds(pid) if pid else 0.0
                    kids1 = children_cpu_seconds(pid) if pid else {}
                    split = ""
                    if len(kids1) > 1:
                        # How evenly the kernel spread the connections over the workers.
                        r["worker_cpu_s"] = [round(kids1[k] - kids0.get(k, 0.0), 3)
                                             for k in sorted(kids1)]
                        split = f", per worker CPU {' / '.join(f'{c:.2f}' for c in r['worker_cpu_s'])} s"
                    if pid:
                        r["gateway_cpu_s"] = round(cpu1 - cpu0, 3)
                        r["cpu_us_per_request"] = (
                            round((cpu1 - cpu0) * 1e6 / r["requests"], 1) if r["requests"] else None)
                    raw = r.pop("raw")
                    bad = [f"{n} {v}" for n, v in r["socket_errors"].items() if v]
                    if r["non_2xx_3xx"] or bad:
                        msg = (f"round {rnd} {key} {target}: non-2xx/3xx responses "
                               f"{r['non_2xx_3xx']}, socket errors {', '.join(bad) or 'none'}")
                        print(f"  ERROR {msg}\n{raw}", file=sys.stderr)
                        errors.append(msg)
                    runs[key][target].append(r)
                    cpu = f", CPU {r['cpu_us_per_request']} µs/req" if pid else ""
                    print(f"  round {rnd} {key:<10} {target:<22} {r['rps']:>10.0f} req/s "
                          f"p50 {r['p50_ms']:.3f} ms{cpu}{split}"
                          f"{'  (ERRORS)' if r['non_2xx_3xx'] or bad else ''}")
        memory_after = proc_memory_mb(gw.pid)
        others = ((machine_busy_seconds() - busy0)
                  - (ours_cpu_seconds(measured) - ours0)) / (time.monotonic() - wall0)
        results["other_processes_cpus_busy"] = round(max(0.0, others), 2)
        if others > 0.1:
            print(f"  WARNING: other processes kept {others:.2f} CPUs busy during the runs "
                  f"(of {os.cpu_count()}); the figures are noisy", file=sys.stderr)
        errors += check_bodies(direct_port, gw_port, "after load")

        summary: dict[str, Any] = {}
        for key, desc, _, _, conns in SCENARIOS:
            d, g = runs[key]["direct"], runs[key]["gateway"]
            s = {
                "description": desc, "connections": conns,
                "direct_rps": median([r["rps"] for r in d]),
                "gateway_rps": median([r["rps"] for r in g]),
                "direct_p50_ms": median([r["p50_ms"] for r in d]),
                "gateway_p50_ms": median([r["p50_ms"] for r in g]),
                "gateway_cpu_us_per_request": median([r["cpu_us_per_request"] for r in g]),
            }
            s["rps_ratio"] = s["gateway_rps"] / s["direct_rps"] if s["direct_rps"] else None
            s["added_p50_ms"] = s["gateway_p50_ms"] - s["direct_p50_ms"]
            summary[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
        results["runs"] = runs
        results["summary"] = summary
        results["small_64c_variants"] = variant_summary = {
            name: {"label": label, "wrk_threads": threads or 2,
                   "rps": median([r["rps"] for r in runs["small_64c"][name]]),
                   "p50_ms": median([r["p50_ms"] for r in runs["small_64c"][name]]),
                   "cpu_us_per_request": median([r["cpu_us_per_request"]
                                                 for r in runs["small_64c"][name]])}
            for name, label, _, threads, _ in variants}
        limiter_cost = workers_cmp = None
        if args.limiter_cost:
            pairs = zip(runs["small_64c"]["gateway_limiter_on"],
                        runs["small_64c"]["gateway_limiter_off"])
            diffs = [on["cpu_us_per_request"] - off["cpu_us_per_request"] for on, off in pairs
                     if on["cpu_us_per_request"] is not None
                     and off["cpu_us_per_request"] is not None]
            on, off = (variant_summary[f"gateway_limiter_{x}"] for x in ("on", "off"))
            limiter_cost = results["limiter_cost_in_gateway"] = {
                "cpu_us_per_request_on": on["cpu_us_per_request"],
                "cpu_us_per_request_off": off["cpu_us_per_request"],
                "per_round_difference_us": [round(d, 1) for d in diffs],
                "median_difference_us": round(median(diffs), 1) if diffs else None,
                "rps_on": on["rps"], "rps_off": off["rps"],
            }
        if args.compare_workers:
            one = runs["small_64c"]["gateway_1proc_t1"]
            many = runs["small_64c"][f"gateway_workers{args.compare_workers}_t1"]
            ratio = (median([r["rps"] for r in many]) / median([r["rps"] for r in one])
                     if median([r["rps"] for r in one]) else None)
            workers_cmp = results["workers_comparison"] = {
                "workers": args.compare_workers, "wrk_threads": 1,
                "rps_one_process": median([r["rps"] for r in one]),
                "rps_workers": median([r["rps"] for r in many]),
                "ratio": round(ratio, 3) if ratio else None,
                "per_round_ratio": [round(m["rps"] / o["rps"], 3) if o["rps"] else None
                                    for o, m in zip(one, many)],
                "note": "wrk, nginx and the gateway share the machine's CPUs: a lower bound",
            }
        results["gateway_memory_after_runs_mb"] = {
            "rss": round(memory_after["VmRSS"], 1), "hwm": round(memory_after["VmHWM"], 1)}

        if args.profile:
            print(f"  profiling the gateway with py-spy for {args.profile:g}s at 64 connections…")
            results["profile"] = profile_gateway(gw.pid, urls["small_64c"]["gateway"], wrk,
                                                 args.profile, args.output.parent)

        idle = None
        if not args.no_idle and args.idle_connections:
            need = args.idle_connections + 256
            if nofile < need:
                raise BenchError(f"RLIMIT_NOFILE is {nofile}; {need} needed for "
                                 f"{args.idle_connections} idle connections")
            print(f"  holding {args.idle_connections} idle keep-alive connections…")
            idle = hold_idle_connections(gw_port, args.idle_connections, gw.pid)
            idle["rss_mb_after_close"] = round(proc_memory_mb(gw.pid)["VmRSS"], 1)
            results["idle"] = idle
            if idle["errors"] or idle["held"] != args.idle_connections:
                msg = (f"idle connections: {idle['held']} of {args.idle_connections} held, "
                       f"errors {idle['errors']}")
                print(f"  ERROR {msg}", file=sys.stderr)
                errors.append(msg)
            if idle["health_while_held"] != 200:
                errors.append(f"idle connections: /health answered {idle['health_while_held']} "
                              "while they were held")

        if args.limiter_cost:
            print("  measuring the limiter on its own (bench/limiter.py)…")
            results["limiter"] = run_limiter_script(str(Path(twistd).parent / "python"),
                                                    tmp, procs)

        if gw.poll() is not None:
            errors.append(f"the gateway exited with status {gw.returncode} during the run")
        for name, status in procs.exited():
            if name != "limiter":
                errors.append(f"{name} exited with status {status} during the run")
        for log in variant_logs:
            for what, count in scan_gateway_log(log)["errors"].items():
                msg = f"{log.stem} logged {count} × {what}"
                print(f"  ERROR {msg}", file=sys.stderr)
                errors.append(msg)
        results["gateway_log"] = scan_gateway_log(gw_log)
        bad = {k: v for k, v in results["gateway_log"]["responses_by_status_and_outcome"].items()
               if not k.startswith(("2", "3"))}
        if bad:
            print(f"  gateway access log, non-2xx/3xx answers by status and outcome: {bad}",
                  file=sys.stderr)
        for what, count in results["gateway_log"]["errors"].items():
            msg = f"the gateway logged {count} × {what}"
            print(f"  ERROR {msg}", file=sys.stderr)
            errors.append(msg)

        # ---- report
        sm, th, ch = summary["small_1c"], summary["small_64c"], summary["chain_16c"]
        print()
        print(f"{'scenario':<42}{'direct req/s':>13}{'gateway req/s':>15}{'ratio':>8}"
              f"{'direct p50':>12}{'gateway p50':>13}{'CPU/req':>10}")
        for key, *_ in SCENARIOS:
            s = summary[key]
            print(f"{s['description']:<42}{fmt(s['direct_rps'], ',.0f'):>13}"
                  f"{fmt(s['gateway_rps'], ',.0f'):>15}{fmt(s['rps_ratio'], '.3f'):>8}"
                  f"{fmt(s['direct_p50_ms'], '.3f') + ' ms':>12}"
                  f"{fmt(s['gateway_p50_ms'], '.3f') + ' ms':>13}"
                  f"{fmt(s['gateway_cpu_us_per_request'], '.0f') + ' µs':>10}")
        if variants:
            g = summary["small_64c"]
            print(f"\nsmall JSON (~600 B), 64 connections, same rounds{'':<14}"
                  f"{'req/s':>10}{'p50':>12}{'CPU/req':>10}")
            rows = [("gateway (the main one, limiter on), wrk 2 threads", g["gateway_rps"],
                     g["gateway_p50_ms"], g["gateway_cpu_us_per_request"])]
            rows += [(v["label"] + ("" if v["wrk_threads"] == 1 else ", wrk 2 threads"),
                      v["rps"], v["p50_ms"], v["cpu_us_per_request"])
                     for v in variant_summary.values()]
            for label, rps, p50, cpu in rows:
                print(f"  {label:<66}{fmt(rps, ',.0f'):>10}{fmt(p50, '.3f') + ' ms':>12}"
                      f"{fmt(cpu, '.0f') + ' µs':>10}")
            if workers_cmp:
                print(f"  (--workers {workers_cmp['workers']}: CPU/req sums the parent and its "
                      f"workers; wrk (1 thread), nginx and the gateway share the "
                      f"{os.cpu_count()} CPUs, so the ratio is a lower bound)")
        if "limiter" in results:
            lim = results["limiter"]
            print(f"limiter on its own (bench/limiter.py): in-process "
                  f"{lim['local']['us_per_call']:.2f} µs CPU per consume; Redis "
                  + (lim["redis"]["skipped"] if "skipped" in lim["redis"] else
                     f"{lim['redis']['median_ms']:.3f} ms median, {lim['redis']['p99_ms']:.3f} ms "
                     f"p99, {lim['redis']['failures']} timeouts/failures, client CPU "
                     f"{lim['redis']['client_cpu_us_per_call']:.0f} µs/call incl. kernel "
                     f"loopback (redis {lim['redis']['redis_version']})"))
        mem = results["gateway_memory_after_runs_mb"]
        print(f"other processes on the machine during the runs: "
              f"{results['other_processes_cpus_busy']:.2f} CPUs busy (of {os.cpu_count()})")
        print(f"gateway memory after the runs: RSS {mem['rss']} MB, peak (VmHWM) {mem['hwm']} MB; "
              f"access log {results['gateway_log']['lines']} lines, "
              f"{sum(results['gateway_log']['errors'].values())} error/critical events")
        if idle:
            print(f"idle connections: {idle['held']} of {idle['requested']} held "
                  f"(established in {idle['seconds_to_establish']} s), gateway RSS "
                  f"{idle['rss_mb_while_held']} MB while held, {idle['rss_mb_after_close']} MB "
                  f"after closing; /health while held: {idle['health_while_held']}")
        if "profile" in results:
            print(f"\npy-spy, gateway at 64 connections, top 15 by own time "
                  f"({results['profile']['samples']} samples, raw: {results['profile']['raw']}):")
            for row in results["profile"]["top_own"]:
                print(f"  {row['pct']:>5.1f}%  {row['frame']}")
            print("by source file, own time:")
            for row in results["profile"]["top_own_by_file"][:10]:
                print(f"  {row['pct']:>5.1f}%  {row['frame']}")

        cpu = th["gateway_cpu_us_per_request"]
        targets = [
            ("CPU per proxied small request (64 conns) ≤ 350 µs", f"{fmt(cpu, '.0f')} µs",
             None if cpu is None else cpu <= TARGET_CPU_US),
            ("added median latency at 1 connection ≤ 0.35 ms", f"{sm['added_p50_ms']:.3f} ms",
             sm["added_p50_ms"] <= TARGET_ADDED_P50_MS),
            ("throughput at 64 connections ≥ 0.06 × direct", f"{fmt(th['rps_ratio'], '.3f')} ×",
             th["rps_ratio"] is not None and th["rps_ratio"] >= TARGET_THROUGHPUT_RATIO),
            ("20 KB pass-through ≥ 0.06 × direct", f"{fmt(ch['rps_ratio'], '.3f')} ×",
             ch["rps_ratio"] is not None and ch["rps_ratio"] >= TARGET_PASSTHROUGH_RATIO),
            ("RSS ≤ 80 MB after the runs", f"{mem['rss']} MB", mem["rss"] <= TARGET_RSS_MB),
            ("10,000 idle connections held, RSS < 300 MB",
             f"{idle['held']} held, {idle['rss_mb_while_held']} MB" if idle else "not run",
             None if not idle or idle["requested"] < TARGET_IDLE_CONNECTIONS else
             idle["held"] >= TARGET_IDLE_CONNECTIONS
             and idle["rss_mb_while_held"] < TARGET_IDLE_RSS_MB),
        ]
        if args.limiter_cost:
            lim = results["limiter"]
            loc, red = lim["local"], lim["redis"]
            targets += [
                ("in-process limiter CPU per consume < 5 µs",
                 f"{loc['us_per_call']:.2f} µs ({loc['calls']:,} calls, {loc['keys']:,} keys)",
                 loc["us_per_call"] < TARGET_LIMITER_LOCAL_US),
                ("Redis limiter median latency < 1 ms",
                 red["skipped"] if "skipped" in red else
                 f"{red['median_ms']:.3f} ms, p99 {red['p99_ms']:.3f} ms "
                 f"({red['calls']:,} sequential, {red['failures']} failed)",
                 None if "skipped" in red else
                 red["median_ms"] < TARGET_LIMITER_REDIS_MS and not red["failures"]),
                ("limiter cost through the gateway (64 conns)",
                 f"{fmt(limiter_cost['median_difference_us'], '+.0f')} µs/req CPU, twins on − off "
                 f"(rounds: {', '.join(f'{d:+.0f}' for d in limiter_cost['per_round_difference_us'])}; "
                 f"noisy)", "INFO"),
            ]
        else:
            targets += [("in-process limiter CPU per consume < 5 µs", "not run", None),
                        ("Redis limiter median latency < 1 ms", "not run", None)]
        if workers_cmp:
            targets.append((f"{workers_cmp['workers']} workers ≥ 1.6 × one process (64 conns)",
                            f"{fmt(workers_cmp['ratio'], '.2f')} × "
                            f"({fmt(workers_cmp['rps_workers'], ',.0f')} vs "
                            f"{fmt(workers_cmp['rps_one_process'], ',.0f')} req/s; rounds "
                            f"{', '.join(fmt(x, '.2f') for x in workers_cmp['per_round_ratio'])}; "
                            f"lower bound, shared CPUs)",
                            workers_cmp["ratio"] is not None
                            and workers_cmp["ratio"] >= TARGET_WORKERS_RATIO))
        else:
            targets.append(("2 workers ≥ 1.6 × one process (64 conns)", "not run", None))
        if args.baseline:
            b = variant_summary["baseline_proxy"]["cpu_us_per_request"]
            cpu_g = summary["small_64c"]["gateway_cpu_us_per_request"]
            ratio = cpu_g / b if b and cpu_g else None
            targets.append((f"gateway CPU/req (64 conns) ≤ {TARGET_CPU_VS_BASELINE} × bare proxy's",
                            f"{fmt(ratio, '.3f')} × ({fmt(cpu_g, '.0f')} vs {fmt(b, '.0f')} µs)",
                            None if ratio is None else ratio <= TARGET_CPU_VS_BASELINE))
            for name in ("gateway_stock", "gateway_previous"):
                if name in variant_summary:
                    v = variant_summary[name]["cpu_us_per_request"]
                    targets.append((f"{variant_summary[name]['label']} CPU/req ÷ bare proxy's",
                                    f"{fmt(v / b if b and v else None, '.3f')} × "
                                    f"({fmt(v, '.0f')} µs)", "INFO"))
            base_1c = median([r["p50_ms"] for r in runs["small_1c"]["baseline_proxy"]])
            added_base = base_1c - summary["small_1c"]["direct_p50_ms"]
            targets.append(("bare Twisted proxy added p50 (1 conn), calibration",
                            f"{fmt(added_base, '.3f')} ms; gateway "
                            f"{fmt(summary['small_1c']['added_p50_ms'], '.3f')} ms", "INFO"))
        results["targets"] = [{"target": t, "value": v, "result": verdict(ok)}
                              for t, v, ok in targets]
        print("\ntargets:")
        for t, v, ok in targets:
            print(f"  {verdict(ok):<5} {t:<52} {v}")
    except BenchError as e:
        errors.append(str(e))
    except (KeyboardInterrupt, Interrupted):
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        return 130
    finally:
        procs.stop_all()
        if args.keep_tmp:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results["errors"] = errors
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {args.output} ({results['elapsed_s']} s)")
    if errors:
        print("ERRORS:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
