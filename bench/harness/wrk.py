"""Running ``wrk --latency`` and reading its report."""

from __future__ import annotations

import re
import resource
import subprocess
from typing import Any

from harness.errors import BenchError

LATENCY_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def latency_ms(text: str) -> float:
    """A time as wrk prints it (``812.00us``, ``1.20ms``, ``2s``) in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * LATENCY_UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/sec, p50, completed requests, the run's length and errors from wrk's report."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+\w+)", out, re.M)
    if not (rps and p50 and total):
        raise BenchError(f"cannot parse wrk output:\n{out}")
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        socket_errors = dict(zip(socket_errors, map(int, se.groups())))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "seconds": latency_ms(total.group(2)) / 1e3,
        "p50_ms": latency_ms(p50.group(1)),
        "requests": int(total.group(1)),
        "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors,
    }


def reaped_children_cpu_seconds() -> float:
    """utime + stime of the children this process has waited for, wrk's runs among them."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(wrk: str, url: str, connections: int, duration: float,
            threads: int | None = None) -> dict[str, Any]:
    """One wrk run; its parsed figures, its own CPU time, and its whole report under ``raw``.

    Without ``threads``: 1 thread for 1 connection, 2 otherwise. wrk shares
    the CPUs with what it loads, so its CPU time tells whether it, rather
    than the server, set the pace.
    """
    threads = threads or (1 if connections == 1 else 2)
    duration = max(1, round(duration))  # wrk takes whole seconds only
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url]
    # No other child is reaped while wrk runs: the difference is wrk's alone.
    cpu_before = reaped_children_cpu_seconds()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    wrk_cpu_s = reaped_children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {' '.join(argv)}: "
                         f"{(done.stderr or done.stdout).strip()[:300]}")
    result = parse_wrk(done.stdout)
    result["wrk_cpu_s"] = round(wrk_cpu_s, 3)
    result["raw"] = done.stdout
    return result
