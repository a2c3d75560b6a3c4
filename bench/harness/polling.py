"""Asking a server whether it answers: one HTTP GET, and polling with a deadline."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Callable

from harness.errors import BenchError


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of ``GET url``; an HTTP error status is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_until(check: Callable[[], bool], deadline_s: float, what: str,
               alive: Callable[[], bool] | None = None) -> None:
    """Poll ``check()`` until it returns true, or fail after ``deadline_s``.

    ``alive`` tells a process that died while starting from one that is slow,
    so that a crash fails at once instead of at the deadline.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.01
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise BenchError(f"{what}: the process exited while starting")
        try:
            if check():
                return
        except OSError as e:
            last = e
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise BenchError(f"{what}: not ready after {deadline_s:.0f}s ({last})")
