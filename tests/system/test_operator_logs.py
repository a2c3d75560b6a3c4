"""Logs an operator can use, from real twistd processes: where they go, their
levels, LOG_LEVEL, and the last lines of a process stopped by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest_twisted
import treq

from tests.daemon import TWISTD, Twistd, parse_json_lines
from tests.support import closed_port_url, wait_until

_STARTING_ON = re.compile(r"GatewaySite starting on (\d+)")


def _port_in(text: str) -> int | None:
    match = _STARTING_ON.search(text)
    return int(match.group(1)) if match else None


@pytest_twisted.ensureDeferred
async def test_logfile_is_honoured(tmp_path: Path):
    """--logfile=PATH: the JSON lines go to PATH, none to stdout."""
    logfile = tmp_path / "gateway.log"
    daemon = Twistd([TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "deltagw"], {})
    try:
        port = await wait_until(lambda: logfile.exists() and _port_in(logfile.read_text()))
        response = await treq.get(f"http://127.0.0.1:{port}/health")
        assert response.code == 200
        await response.content()
        await wait_until(lambda: "outgoing_response" in logfile.read_text())
    finally:
        assert await daemon.stop() == 0
    events = parse_json_lines([line for line in logfile.read_text().splitlines() if line])
    assert [(e["event"], e["path"]) for e in events if "path" in e] == [
        ("outgoing_response", "/health")]
    assert daemon.lines() == []


def test_syslog_is_refused_with_one_line():
    """--syslog would turn JSON lines into syslog text: refused at start, exit 1, one line."""
    done = subprocess.run([TWISTD, "-n", "--syslog", "--pidfile=", "deltagw"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "--syslog is not supported" in lines[0], lines


@pytest_twisted.ensureDeferred
async def test_ctrl_c_writes_the_last_lines():
    """SIGINT: the access line of the last request and twistd's last line are written."""
    daemon = Twistd.plugin()
    port = await daemon.port()
    response = await treq.get(f"http://127.0.0.1:{port}/health")
    await response.content()
    daemon.process.send_signal(signal.SIGINT)
    await wait_until(lambda: daemon.process.poll() is not None, timeout=15)
    events = parse_json_lines(daemon.lines())
    await daemon.stop()
    assert daemon.process.returncode == -signal.SIGINT
    assert [e["path"] for e in events if e.get("event") == "outgoing_response"] == ["/health"]
    assert events[-1]["event"] == "Server Shut Down."


@pytest_twisted.ensureDeferred
async def test_levels_by_outcome_and_log_level():
    """LOG_LEVEL=warning keeps an upstream failure (a warning) and drops a 200 and a 404 (info)."""
    port = _free_port()
    daemon = Twistd.plugin(env={"LOG_LEVEL": "warning", "STORAGE_SERVICE_URL": closed_port_url(),
                                "RETRIES": "0", "PORT": f"tcp:{port}:interface=127.0.0.1"})
    try:
        # Its start-up lines are info: readiness is asked, not read from the log.
        await wait_until(lambda: _answers(port), timeout=15)
        for path in ("/health", "/nowhere", "/api/data/products"):
            response = await treq.get(f"http://127.0.0.1:{port}{path}")
            await response.content()
        await wait_until(lambda: "outgoing_response" in daemon.output())
    finally:
        assert await daemon.stop() == 0
    events = parse_json_lines(daemon.lines())
    responses = [e for e in events if e.get("event") == "outgoing_response"]
    assert [(e["path"], e["status_code"], e["outcome"], e["level"]) for e in responses] == [
        ("/api/data/products", 503, "upstream_refused", "warning"),
    ]
    assert all(e["level"] in ("warning", "error", "critical") for e in events), events


@pytest_twisted.ensureDeferred
async def test_log_level_debug_adds_a_line_when_each_request_arrives():
    """LOG_LEVEL=debug: each request's incoming_request line, then its access line."""
    daemon = Twistd.plugin(env={"LOG_LEVEL": "debug"})
    try:
        port = await daemon.port()
        for path in ("/health", "/nowhere"):
            response = await treq.get(f"http://127.0.0.1:{port}{path}")
            await response.content()
        await wait_until(lambda: daemon.output().count("outgoing_response") == 2)
    finally:
        assert await daemon.stop() == 0
    events = [e for e in parse_json_lines(daemon.lines())
              if e.get("event") in ("incoming_request", "outgoing_response")]
    assert [(e["event"], e["path"], e["level"]) for e in events] == [
        ("incoming_request", "/health", "debug"), ("outgoing_response", "/health", "info"),
        ("incoming_request", "/nowhere", "debug"), ("outgoing_response", "/nowhere", "info"),
    ]
    assert events[0]["request_id"] == events[1]["request_id"] != events[2]["request_id"]
    assert events[2]["request_id"] == events[3]["request_id"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_access_line_levels():
    """internal_error is an error; failing upstreams, shedding and open circuits warnings; the rest info."""
    from deltagw.web.site import _level_of

    assert _level_of("internal_error", 500) == "error"
    for outcome in ("upstream_timeout", "upstream_refused", "circuit_open", "shed",
                    "auth_unavailable", "rate_limiter_unavailable"):
        assert _level_of(outcome, 503) == "warning", outcome
    assert _level_of("upstream_error", 502) == "warning"
    for outcome, status in (("upstream_error", 404), ("ok", 200), ("not_found", 404),
                            ("unauthorized", 401), ("rate_limited", 429), ("client_closed", 499)):
        assert _level_of(outcome, status) == "info", outcome


def test_a_port_in_use_stops_startup_with_one_line():
    """PORT already taken: exit 1, and the one error line names PORT (no traceback lines)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "deltagw"],
            env={"PATH": os.environ["PATH"], "PORT": f"tcp:{port}:interface=127.0.0.1"},
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    events = parse_json_lines([line for line in done.stdout.splitlines() if line.strip()])
    errors = [e for e in events if e["level"] in ("error", "critical")]
    assert len(errors) == 1 and "PORT=" in errors[0]["event"] and "in use" in errors[0]["event"]
    assert done.stderr.strip() == ""
