"""``--profile``: where the gateway spends its CPU under load, sampled with py-spy."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from harness.errors import BenchError
from harness.wrk import run_wrk


def record_profile(pid: int, url: str, wrk: str, seconds: float, out_dir: Path,
                   name: str) -> Path:
    """Sample ``pid`` with py-spy while wrk loads ``url`` at 64 connections; the raw stacks.

    They go to ``out_dir/profile-<name>.txt``.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"profile-{name}.txt"
    spy = subprocess.Popen([py_spy, "record", "-r", "250", "-d", f"{seconds:g}", "-p", str(pid),
                            "-f", "raw", "-o", str(raw), "--nonblocking"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_wrk(wrk, url, 64, seconds + 1)
        spy_out, _ = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {spy_out.strip()}")
    return raw


def top_frames(counter: Counter[str], total: int, k: int) -> list[dict[str, Any]]:
    """The ``k`` most sampled frames, with their share of all ``total`` samples."""
    return [{"frame": f, "pct": round(100 * c / total, 1), "samples": c}
            for f, c in counter.most_common(k)]


def summarise_profile(raw: Path) -> dict[str, Any]:
    """Own time by function and by source file, and inclusive time, from collapsed stacks."""
    own: Counter[str] = Counter()        # by function, leaf frame only
    inclusive: Counter[str] = Counter()  # by function, anywhere in the stack
    own_file: Counter[str] = Counter()   # by source file, leaf frame only
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        m = re.search(r"\((.*)\)$", frames[-1])
        own_file[m.group(1) if m else frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return {"samples": total, "raw": str(raw), "top_own": top_frames(own, total, 15),
            "top_own_by_file": top_frames(own_file, total, 15),
            "top_inclusive": top_frames(inclusive, total, 40)}


def profile_gateway(pid: int, url: str, wrk: str, seconds: float, out_dir: Path,
                    name: str) -> dict[str, Any]:
    """Sample a gateway with py-spy under 64-connection load; top own time."""
    return summarise_profile(record_profile(pid, url, wrk, seconds, out_dir, name))
