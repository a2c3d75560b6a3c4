"""The two ways a benchmark run ends early."""

from __future__ import annotations


class BenchError(Exception):
    """Something went wrong that makes the run invalid (exit status 1)."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so cleanup runs."""
