"""The README's quick start, run exactly as written against `twistd -n deltagw --demo`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from tests.daemon import Twistd
from tests.support import wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(heading: str) -> str:
    """The first shell block under one of the README's ``##`` headings."""
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def quick_start_script() -> str:
    """The shell block under the README's "Quick start" heading."""
    return readme_block("Quick start")


def json_documents(text: str) -> list:
    decoder = json.JSONDecoder()
    documents, position = [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
    return documents


@pytest_twisted.ensureDeferred
async def test_readme_walkthrough_works_as_written(tmp_path):
    """Register, log in, who-am-I, data, analytics and logout all answer through the gateway."""
    daemon = Twistd.plugin("--demo", "--demo-state", str(tmp_path))
    try:
        port = await daemon.port()
        ready = f"DeltaStream is ready at http://localhost:{port} - API docs: http://localhost:{port}/api/docs/ui"
        await wait_until(lambda: ready in daemon.output())
        script = "set -euo pipefail\n" + quick_start_script().replace("localhost:8000", f"127.0.0.1:{port}")
        result = await threads.deferToThread(
            subprocess.run, ["bash", "-c", script], capture_output=True, text=True, timeout=120
        )
    finally:
        await daemon.stop()
    assert result.returncode == 0, result.stderr
    register, me, products, underlying, chain, pcr, surface, logout = json_documents(result.stdout)
    assert register["message"] == "User registered successfully"
    assert me == {"user_id": str(register["user"]["id"]), "email": "trader@example.com"}
    assert {"NIFTY", "BANKNIFTY", "FINNIFTY"} <= set(products["products"])
    assert underlying["count"] == 5 and len(underlying["ticks"]) == 5
    assert chain["product"] == "NIFTY" and chain["calls"] and chain["puts"]
    assert pcr["product"] == "NIFTY"
    assert surface["surface"] and len(surface["surface"]) == len(surface["expiries"])
    assert "error" not in logout


@pytest_twisted.ensureDeferred
async def test_readme_runs_as_written_top_to_bottom(tmp_path):
    """On a copy of the checkout, as a newcomer would: "Run it" (a fresh venv,
    then the demo), the Quick start against it, then the Examples; Ctrl-C
    ends the demo and leaves no pid file behind."""
    checkout = tmp_path / "deltagw"
    shutil.copytree(README.parent, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "bench"))
    install, run = readme_block("Run it").strip().splitlines()
    installed = await threads.deferToThread(
        subprocess.run, ["bash", "-c", install], cwd=checkout, capture_output=True, text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    environ = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path),
               "PORT": "tcp:0:interface=127.0.0.1"}
    demo = Twistd(["bash", "-c", f"exec {run}"], environ, cwd=str(checkout))
    try:
        port = await demo.port(timeout=60)
        await wait_until(lambda: "DeltaStream is ready at" in demo.output())
        for heading in ("Quick start", "Examples"):
            script = "set -euo pipefail\n" + readme_block(heading).replace("localhost:8000", f"127.0.0.1:{port}")
            result = await threads.deferToThread(
                subprocess.run, ["bash", "-c", script], capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0, (heading, result.stderr)
            if heading == "Quick start":
                # One answer a line: each is a whole JSON document.
                assert all(json.loads(line) is not None for line in result.stdout.splitlines())
                assert len(result.stdout.splitlines()) == 8
        demo.process.send_signal(signal.SIGINT)
        await wait_until(lambda: demo.process.poll() is not None, timeout=30)
    finally:
        await demo.stop()
    assert demo.process.returncode == -signal.SIGINT
    assert not (checkout / "twistd.pid").exists()
