"""The README's quick start, run exactly as written against `twistd -n deltagw --demo`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from tests.daemon import Daemon

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_script() -> str:
    """The shell block under the README's "Quick start" heading."""
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


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
    daemon = Daemon.plugin("--demo", "--demo-state", str(tmp_path))
    try:
        port = await daemon.port()
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
