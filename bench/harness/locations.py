"""Where the benchmark's files are, and the one address everything listens on."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"
