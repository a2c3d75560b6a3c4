"""The start-up path: installed plugin, real twistd processes, JSON stdout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.plugin import getPlugins
from twisted.web.server import NOT_DONE_YET

from deltagw import __version__
from tests.daemon import TWISTD, Twistd, parse_json_lines
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]


def test_plugin_is_registered():
    """getPlugins(IServiceMaker) yields the deltagw service maker."""
    names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
    assert "deltagw" in names


def test_plugin_directory_is_not_a_package():
    """twisted/plugins holds only the plugin module, no __init__.py, no dropin.cache."""
    assert sorted(p.name for p in (REPO / "twisted" / "plugins").iterdir() if p.name != "__pycache__") == [
        "deltagw_plugin.py"
    ]
    assert not (REPO / "twisted" / "__init__.py").exists()


def test_twistd_lists_plugin_and_options():
    """`twistd --help` lists deltagw and `twistd -n deltagw --help` its options."""
    top = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert "deltagw" in top.stdout
    sub = subprocess.run([TWISTD, "-n", "deltagw", "--help"], capture_output=True, text=True, timeout=60)
    for option in ("--port", "--service-name", "--auth-url", "--storage-url", "--analytics-url"):
        assert option in sub.stdout


@pytest.mark.parametrize(
    "env, setting",
    [
        ({"STORAGE_TIMEOUT": "soon"}, "STORAGE_TIMEOUT"),
        ({"AUTH_SERVICE_URL": "auth:8001"}, "AUTH_SERVICE_URL"),
        ({"PORT": "tcp:notaport"}, "PORT"),
        ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES"),
    ],
)
def test_bad_setting_stops_startup_with_one_line(env, setting):
    """A bad value exits non-zero with one line that names the setting."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "deltagw"],
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0], lines


@pytest.mark.parametrize(
    "command",
    [[TWISTD, "-n", "deltagw", "--version"], [sys.executable, "-m", "deltagw", "--version"],
     [str(Path(sys.executable).parent / "deltagw"), "--version"]],
    ids=["twistd", "python-m", "console-command"],
)
def test_version_is_deltagws(command):
    """Each way of asking prints deltagw's own version, and exits 0."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deltagw {__version__} (Twisted ")


def test_bad_option_names_the_option():
    """A bad --storage-url names the option, not the variable it beat."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "deltagw", "--storage-url", "ftp://x"],
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--storage-url" in result.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SPEEDUPS")}


@pytest_twisted.ensureDeferred
async def test_twistd_serves_proxies_and_logs_json_lines(upstream):
    """`twistd -n deltagw` serves /health and a proxied call; every stdout line is JSON."""
    daemon = Twistd.plugin("--storage-url", upstream.url, env={"SERVICE_NAME": "gw-under-test"})
    try:
        port = await daemon.port()
        health = await treq.get(f"http://127.0.0.1:{port}/health")
        assert json.loads(await health.content()) == {"status": "healthy", "service": "gw-under-test", "version": __version__}
        proxied = await treq.get(f"http://127.0.0.1:{port}/api/data/products?limit=5")
        assert proxied.code == 200
        await proxied.content()
        assert upstream.seen[-1].uri == b"/products?limit=5"
        await wait_until(lambda: "outgoing_response" in daemon.output().split("/api/data/products")[-1])
    finally:
        assert await daemon.stop() == 0, daemon.output()
    events = parse_json_lines(daemon.lines())
    responses = [e for e in events if e.get("event") == "outgoing_response"]
    proxied_event = next(e for e in responses if e["path"] == "/api/data/products")
    assert proxied_event["upstream"] == "storage"
    for field in ("method", "status_code", "latency_ms", "request_id", "client", "upstream_latency_ms"):
        assert field in proxied_event
    # One line a request at info: its access line (incoming_request is debug).
    assert not any(e.get("event") == "incoming_request" for e in events)


@pytest_twisted.ensureDeferred
async def test_gateway_tac_serves_same_service(upstream):
    """`twistd -ny gateway.tac` serves the gateway, configured from the environment."""
    daemon = Twistd(
        [TWISTD, "-n", "--pidfile=", "-y", str(REPO / "gateway.tac")],
        env={"STORAGE_SERVICE_URL": upstream.url},
        cwd=str(REPO),
    )
    try:
        port = await daemon.port()
        response = await treq.get(f"http://127.0.0.1:{port}/api/v1/data/products")
        assert response.code == 200
        await response.content()
    finally:
        await daemon.stop()
    parse_json_lines(daemon.lines())


@pytest_twisted.ensureDeferred
async def test_large_body_streams_with_bounded_memory(upstream):
    """A 50 MB upstream body passes through while the gateway grows by less than 20 MB."""
    total = 50 * 1024 * 1024
    chunk = b"x" * 65536

    def respond(request, seen):
        request.setHeader(b"Content-Length", b"%d" % total)
        state = {"sent": 0, "paused": False}

        class Producer:
            def resumeProducing(self):
                state["paused"] = False
                while not state["paused"] and state["sent"] < total:
                    request.write(chunk)
                    state["sent"] += len(chunk)
                if state["sent"] >= total:
                    request.unregisterProducer()
                    request.finish()

            def pauseProducing(self):
                state["paused"] = True

            def stopProducing(self):
                state["sent"] = total

        producer = Producer()
        request.registerProducer(producer, True)
        reactor.callLater(0, producer.resumeProducing)
        return NOT_DONE_YET

    upstream.respond = respond
    daemon = Twistd.plugin("--storage-url", upstream.url)
    try:
        port = await daemon.port()
        warm = await treq.get(f"http://127.0.0.1:{port}/health")
        await warm.content()
        before = daemon.rss_kb()
        received = 0

        def collect(data: bytes) -> None:
            nonlocal received
            received += len(data)

        response = await treq.get(f"http://127.0.0.1:{port}/api/data/products", unbuffered=True)
        await treq.collect(response, collect)
        peak = daemon.rss_kb("VmHWM")
        assert received == total
        assert peak - before < 20 * 1024, f"grew by {(peak - before) / 1024:.1f} MB"
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_sigusr2_empties_the_cache_and_the_daemon_serves_on(upstream):
    """kill -USR2: the process forgets what it stored (logged with the count), keeps serving,
    and the next request for a stored URL goes upstream again."""
    upstream.respond = lambda request, seen: (
        request.setHeader(b"Cache-Control", b"max-age=600"), b'["NIFTY"]')[1]
    daemon = Twistd.plugin("--storage-url", upstream.url)
    try:
        port = await daemon.port()
        url = f"http://127.0.0.1:{port}/api/data/products"
        for _ in range(2):
            await (await treq.get(url)).content()
        assert len(upstream.seen) == 1
        daemon.process.send_signal(signal.SIGUSR2)
        await wait_until(lambda: '"cache_purged"' in daemon.output())
        again = await treq.get(url)
        assert (again.code, await again.content()) == (200, b'["NIFTY"]')
        assert len(upstream.seen) == 2
    finally:
        assert await daemon.stop() == 0, daemon.output()
    purges = [e for e in parse_json_lines(daemon.lines()) if e.get("event") == "cache_purged"]
    assert [(e["signal"], e["purged"]) for e in purges] == [("SIGUSR2", 1)]
