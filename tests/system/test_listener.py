"""The listening service: a port it cannot get stops start-up; stopping closes the port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from deltagw.service import Listener

TWISTD = Path(sys.executable).parent / "twistd"


class _LaterEndpoint:
    """An endpoint whose listen settles only when the test says so."""

    def __init__(self) -> None:
        self.cancelled = False
        self.pending: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.cancelled = True

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return self.pending


def test_a_port_in_use_stops_startup_with_one_line_naming_the_setting() -> None:
    """Listening on a taken port raises SystemExit with one line naming PORT and the reason."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        number = taken.getsockname()[1]
        listener = Listener(
            TCP4ServerEndpoint(reactor, number, interface="127.0.0.1"),
            protocol.Factory.forProtocol(protocol.Protocol),
            f"PORT='tcp:{number}'",
        )
        with pytest.raises(SystemExit) as raised:
            listener.privilegedStartService()
    message = str(raised.value)
    assert message.startswith(f"deltagw: PORT='tcp:{number}': ") and "\n" not in message
    assert "already in use" in message


def test_twistd_exits_with_one_line_when_the_port_is_taken() -> None:
    """`twistd -n deltagw` on a taken port exits 1 with one error line that names PORT."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        number = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SPEEDUPS")}
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "deltagw"],
            env={**env, "PORT": f"tcp:{number}:interface=127.0.0.1"},
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    errors = [json.loads(line) for line in result.stdout.splitlines()
              if json.loads(line).get("level") == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["event"].startswith("deltagw: PORT=") and "already in use" in errors[0]["event"]


@pytest_twisted.ensureDeferred
async def test_listening_fires_with_the_port_and_stopping_closes_it() -> None:
    """listening() gives the bound port, before and after it is bound; stopService closes it."""
    listener = Listener(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        protocol.Factory.forProtocol(protocol.Protocol),
    )
    early = listener.listening()
    listener.privilegedStartService()
    listener.startService()  # listens once only
    port = await early
    assert port is await listener.listening()
    number = port.getHost().port
    await listener.stopService()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", number)) != 0


def test_stopping_before_the_port_is_bound_cancels_listening() -> None:
    """A stop while the endpoint is still working cancels its listen."""
    endpoint = _LaterEndpoint()
    listener = Listener(endpoint, protocol.Factory())
    listener.startService()
    stopped: list[Any] = []
    listener.stopService().addBoth(stopped.append)
    assert endpoint.cancelled and stopped == [None]


def test_a_later_failure_fails_listening_without_stopping_startup() -> None:
    """A failure the endpoint reports after start-up makes listening() fail, with the reason."""
    endpoint = _LaterEndpoint()
    listener = Listener(endpoint, protocol.Factory())
    listener.startService()
    waiting = listener.listening()
    endpoint.pending.errback(CannotListenError("127.0.0.1", 1, OSError("refused")))
    results: list[Any] = []
    waiting.addBoth(results.append)
    listener.listening().addBoth(results.append)
    assert all(isinstance(r, Failure) and r.check(CannotListenError) for r in results)
    assert len(results) == 2
