"""SIGHUP re-reads --config in a real twistd process; in-flight requests keep the old one."""

from __future__ import annotations

import json
import signal

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.web.server import NOT_DONE_YET

from tests.daemon import Twistd, parse_json_lines
from tests.support import RecordingUpstream, listen, wait_until


@pytest_twisted.ensureDeferred
async def test_sighup_applies_valid_config_and_rejects_invalid(tmp_path):
    """A valid file takes effect for new requests, in-flight ones finish; a bad file changes nothing."""
    first, second = RecordingUpstream(), RecordingUpstream()
    held: list = []
    first.respond = lambda request, seen: (held.append(request), NOT_DONE_YET)[1]
    second.respond = lambda request, seen: b'{"from":"second"}'
    ports = [listen(first), listen(second)]
    config = tmp_path / "deltagw.toml"
    config.write_text(f'STORAGE_SERVICE_URL = "{ports[0].url}"\nCORS_ORIGINS = "https://old.example"\n')
    daemon = Twistd.plugin("--config", str(config))
    try:
        port = await daemon.port()
        base = f"http://127.0.0.1:{port}"
        in_flight = defer.ensureDeferred(treq.get(base + "/api/data/products"))
        await wait_until(lambda: held)

        config.write_text(
            f'STORAGE_SERVICE_URL = "{ports[1].url}"\nCORS_ORIGINS = ["https://new.example"]\n'
            "RATE_LIMIT_REQUESTS = 1000\n"
        )
        daemon.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "config_reloaded" in daemon.output())
        after = await treq.get(base + "/api/data/products", headers={"Origin": "https://new.example"})
        assert json.loads(await after.content()) == {"from": "second"}
        assert after.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://new.example"]
        assert after.headers.getRawHeaders(b"x-ratelimit-limit") == [b"1000"]

        held[0].write(b'{"from":"first"}')
        held[0].finish()
        finished = await in_flight
        assert json.loads(await finished.content()) == {"from": "first"}

        config.write_text('STORAGE_SERVICE_URL = "not a url"\n')
        daemon.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "config_rejected" in daemon.output())
        still = await treq.get(base + "/api/data/products")
        assert json.loads(await still.content()) == {"from": "second"}
    finally:
        await daemon.stop()
        for listening in ports:
            await listening.port.stopListening()
    events = parse_json_lines(daemon.lines())
    rejected = next(e for e in events if e.get("event") == "config_rejected")
    assert "STORAGE_SERVICE_URL" in rejected["reason"] and rejected["level"] == "error"
