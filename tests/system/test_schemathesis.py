"""Property-based API testing: schemathesis against `twistd -n deltagw --demo`.

Schemathesis reads the gateway's own OpenAPI document from the running
gateway's /api/docs, generates valid and invalid requests for every
operation and runs every check it has (``--checks all``): no 500, and every
status, header, content type and body must be what the document says. A
finding is fixed in the gateway, the document or the demo backends, never
excluded here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from deltagw.web.application import _UNSAFE_PARAM
from deltagw.web.openapi import PATH_VALUE_PATTERN
from tests.daemon import Twistd

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")

# Bounded and reproducible: 50 cases per operation and phase, generated in
# deterministic mode (no seed, no example database), by one worker so the
# requests (and the auth service's state they build up) come in one order.
COMMAND = [
    "run",
    "--checks", "all",
    "--max-examples", "50",
    "--generation-deterministic",
    "--workers", "1",
    "--request-timeout", "30",
]


@pytest.mark.soak
@pytest_twisted.ensureDeferred
async def test_every_answer_matches_the_published_document(tmp_path: Path) -> None:
    """Schemathesis with all checks finds no 500 and no answer that contradicts /api/docs."""
    # Rate limiting off: schemathesis sends well over a bucket's worth of
    # requests, and the 429s (documented on every limited operation) are
    # tested in test_ratelimit_*; here they would only hide the answers.
    daemon = Twistd.plugin(
        "--demo", "--demo-state", str(tmp_path / "state"),
        env={"RATE_LIMIT_REQUESTS": "0", "RATE_LIMIT_AUTH_REQUESTS": "0"},
    )
    # An empty configuration file, so that no schemathesis.toml from the
    # surroundings changes the run; schemathesis also writes its own
    # caches (.schemathesis, .hypothesis) into the working directory.
    config = tmp_path / "schemathesis.toml"
    config.write_text("")
    started = time.monotonic()
    try:
        port = await daemon.port()
        result = await threads.deferToThread(
            subprocess.run,
            [SCHEMATHESIS, "--config-file", str(config), "--no-color", *COMMAND,
             f"http://127.0.0.1:{port}/api/docs"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
    finally:
        await daemon.stop()
    output = result.stdout + result.stderr
    print(output)
    print(f"schemathesis run took {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, output


_SAMPLES = [
    "NIFTY", "BANK NIFTY", "a.b", ".a", "a.", ".a.b.", "é", "%", "?", "#", "x" * 300,
    "", ".", "..", "...", "a..b", "a/b", "a\\b", "a\x00", "\x1f", "a\x7f", "\t", "..a", "a..",
]


@pytest.mark.parametrize("value", _SAMPLES)
def test_path_parameter_pattern_matches_the_gateway(value: str) -> None:
    """The documented path parameter pattern accepts exactly what the gateway forwards."""
    documented = re.search(PATH_VALUE_PATTERN, value) is not None
    forwarded = value != "" and _UNSAFE_PARAM.search(value) is None
    assert documented == forwarded
