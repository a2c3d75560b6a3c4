"""The machine and the software a run measured, for the JSON results.

Figures only compare across runs on the same machine and versions, so every
run records them, and whether the installed deltagw is the checkout's.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from harness.locations import REPO_DIR, venv_python

# Run by the venv's Python: the versions the gateway runs with, not ours.
VERSIONS_PROBE = (
    "import json, sys, twisted, importlib.metadata as m;"
    "print(json.dumps({'python': sys.version.split()[0], 'twisted': twisted.__version__,"
    "'deltagw': m.version('deltagw'), 'klein': m.version('klein'),"
    "'treq': m.version('treq'), 'deltagw_path': __import__('deltagw').__path__[0]}))")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def installed_versions(python: str) -> dict[str, Any]:
    """Versions of Python, Twisted, deltagw, klein and treq in the venv, and where deltagw is."""
    try:
        return json.loads(subprocess.run([python, "-c", VERSIONS_PROBE], capture_output=True,
                                         cwd="/", text=True, timeout=30).stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {"python": platform.python_version()}


def installed_matches_checkout(installed: Path) -> bool:
    """Whether every .py file of the installed deltagw is the checkout's, byte for byte."""
    checkout = REPO_DIR / "deltagw"
    names = {p.relative_to(checkout) for p in checkout.rglob("*.py")} | \
        {p.relative_to(installed) for p in installed.rglob("*.py")}
    return all(
        (checkout / n).is_file() and (installed / n).is_file()
        and (checkout / n).read_bytes() == (installed / n).read_bytes() for n in names)


def first_line(argv: list[str]) -> str:
    """The first line a command prints (on stdout or stderr), or "unknown"."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` if the gateway's code has uncommitted changes."""
    commit = first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--",
                            "deltagw", "twisted", "setup.py"],
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def machine_info(twistd: str) -> dict[str, Any]:
    """Date, CPUs, kernel, versions (of the venv that holds ``twistd``) and git commit."""
    model = cpu_model()
    versions = installed_versions(venv_python(twistd))
    # The benchmark runs the installed package: does it match the checkout?
    installed = Path(versions.pop("deltagw_path", "/nonexistent"))
    versions["installed_matches_checkout"] = installed_matches_checkout(installed)
    commit = git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        **versions,
        "wrk": first_line(["wrk", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "git_commit": commit,
    }
