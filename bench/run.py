#!/usr/bin/env python3
"""deltagw benchmark: the gateway in front of nginx, compared with nginx alone.

One command (``.venv/bin/python bench/run.py``) starts an unprivileged nginx
serving fixed JSON bodies on loopback, starts ``twistd -n deltagw`` pointed at
it, and drives both with ``wrk``, interleaving direct and gateway runs so that
machine noise hits both sides alike. It reports medians over rounds, ratios to
the direct runs, the gateway's CPU time per request and memory, holds many
idle keep-alive connections, checks the performance targets, and writes
``bench/results/latest.json``.

Standard library only (run it with the venv's Python so ``twistd`` is found).
Exit status: 0 when every run was clean (a missed target is reported, not an
error); 1 on errors (non-2xx responses, socket errors, wrong bodies, a process
that would not start); 130 when interrupted.

This file is the command line; the run's steps are in
``bench/harness/benchmark.py`` and the pieces they use beside it.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.benchmark import Run, run_benchmark
from harness.errors import BenchError, Interrupted
from harness.locations import BENCH_DIR, find_tools
from harness.processes import Processes, raise_nofile
from harness.report import write_results
from harness.targets import TARGET_IDLE_CONNECTIONS


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked against each other."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per wrk run, whole (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of interleaved direct/gateway runs (default 3, min 1)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unrecorded load per scenario and target first, "
                             "whole (default 1; 0 = none)")
    parser.add_argument("--idle-connections", type=int, default=TARGET_IDLE_CONNECTIONS,
                        metavar="N", help="idle keep-alive connections to hold (default 10000)")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-connections scenario")
    parser.add_argument("--workers", type=int, default=None,
                        help="pass --workers=N to the gateway (only if it supports it)")
    parser.add_argument("--compare-workers", type=int, default=2, metavar="N",
                        help="also run small_64c through one process and through --workers N, "
                             "wrk with 1 thread for both, and report the throughput ratio "
                             "(default 2; 0 = off)")
    parser.add_argument("--cache-hit", action=argparse.BooleanOptionalAction, default=True,
                        help="also run small_64c through a twin gateway with CACHE_TTL=data:3600, "
                             "which answers it from its cache, and compare its CPU/request and "
                             "req/s with the gateway's proxied miss (default on)")
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
    return args


def on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C, through the cleanup."""
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Ctrl-C must unwind through the cleanup even if our parent ignored SIGINT."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the exit status (0 clean, 1 errors, 130 interrupted)."""
    args = parse_arguments(argv)
    tools = find_tools()
    missing = tools.missing()
    if missing:
        print(f"bench: not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    install_signal_handlers()
    nofile = raise_nofile()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="deltagw-bench-"))
    run = Run(args, tools, procs, tmp, nofile)
    started = time.monotonic()
    try:
        run_benchmark(run)
    except BenchError as e:
        run.errors.append(str(e))
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
    run.results["errors"] = run.errors
    run.results["elapsed_s"] = round(time.monotonic() - started, 1)
    return write_results(args.output, run.results)


if __name__ == "__main__":
    sys.exit(main())
