"""CPU time and memory of processes, read from /proc and getrusage.

The gateway's CPU per request is the benchmark's main figure; the machine's
busy time tells how much other processes disturbed the run.
"""

from __future__ import annotations

import os
import resource
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/pid/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (nginx master + worker)."""
    total = 0.0
    try:
        total = proc_cpu_seconds(pid)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                total += proc_cpu_seconds(int(child))
    except (OSError, ValueError):
        pass
    return total


def children_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each direct child of ``pid`` (the workers of a --workers parent)."""
    out: dict[int, float] = {}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                try:
                    out[int(child)] = proc_cpu_seconds(int(child))
                except (OSError, ValueError):
                    pass
    except OSError:
        pass
    return out


def ours_cpu_seconds(pids: list[int]) -> float:
    """CPU used by this benchmark: itself, finished children (wrk) and ``pids``."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(tree_cpu_seconds(p) for p in pids))


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB (MiB)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


class OtherProcessesMeter:
    """CPUs kept busy by processes other than the benchmark's, from now until ``cpus_busy()``.

    wrk, nginx and the gateways share the machine; anything else that runs
    meanwhile makes the figures noisy, and this says how much.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.machine_busy0 = machine_busy_seconds()
        self.ours0 = ours_cpu_seconds(pids)
        self.wall0 = time.monotonic()

    def cpus_busy(self) -> float:
        """How many CPUs' worth other processes used since the start, on average."""
        return ((machine_busy_seconds() - self.machine_busy0)
                - (ours_cpu_seconds(self.pids) - self.ours0)) / (time.monotonic() - self.wall0)
