"""systemd integration: sd_notify, the watchdog, socket activation, the units.

The unit tests talk to real ``AF_UNIX`` datagram sockets that stand in for
systemd's notify socket; the subprocess tests run the installed
``twistd --nodaemon --pidfile= deltagw`` exactly as ``deploy/deltagw.service``
does and play systemd's part around it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from deltagw.process.systemd import SystemdNotifier, notify, watchdog_interval
from tests.daemon import (
    LOOPBACK_ANY_PORT,
    START_DEADLINE,
    STOP_DEADLINE,
    SYSTEMD_EXEC,
    TWISTD,
    Twistd,
    child_environ,
    get_health,
    is_starting_on,
    listening_port,
    twistd_argv,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Generous: a cold start of twistd imports Twisted, Klein and treq.


# ---------------------------------------------------------------------------
# A stand-in for systemd's notify socket


class NotifySocket:
    """A bound datagram socket and the ``NOTIFY_SOCKET`` value naming it."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name

    def receive(self, timeout: float = 5.0) -> bytes:
        """The next datagram; fails the test if none arrives in time."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(
                f"no sd_notify message within {timeout:.1f} s"
                " (is SystemdNotifier in the service tree?)"
            ) from None

    def receive_until(self, wanted: bytes, timeout: float) -> list[bytes]:
        """Every message up to and including one with the line ``wanted``."""
        deadline = time.monotonic() + timeout
        seen: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {wanted!r} within {timeout} s; got {seen!r}")
            message = self.receive(remaining)
            seen.append(message)
            if wanted in message.split(b"\n"):
                return seen

    def pending(self) -> list[bytes]:
        """Datagrams already queued, without waiting (sending is synchronous)."""
        self.sock.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.sock.recv(4096))
        except BlockingIOError:
            return messages


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A notify socket on a short filesystem path (``sun_path`` holds 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="dgw-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield NotifySocket(sock, path)


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    """A notify socket in Linux's abstract namespace (``@name``)."""
    name = f"deltagw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifySocket(sock, "@" + name)


# ---------------------------------------------------------------------------
# notify()


def test_notify_sends_to_a_socket_path(notify_socket: NotifySocket) -> None:
    """A message reaches the socket that NOTIFY_SOCKET names by path."""
    assert notify(b"READY=1", {"NOTIFY_SOCKET": notify_socket.name}) is True
    assert notify_socket.receive() == b"READY=1"


def test_notify_sends_to_an_abstract_socket(abstract_notify_socket: NotifySocket) -> None:
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    assert notify(b"STATUS=hi\nREADY=1", {"NOTIFY_SOCKET": abstract_notify_socket.name}) is True
    assert abstract_notify_socket.receive() == b"STATUS=hi\nREADY=1"


def test_notify_without_notify_socket_does_nothing() -> None:
    """Outside systemd (no NOTIFY_SOCKET, or an empty one) notify is a no-op."""
    assert notify(b"READY=1", {}) is False
    assert notify(b"READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_notify_to_a_missing_socket_raises() -> None:
    """A named socket that does not exist is an error the caller can log."""
    with pytest.raises(OSError):
        notify(b"READY=1", {"NOTIFY_SOCKET": f"/nonexistent-{uuid.uuid4().hex}/notify"})


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    """Pings go at half of WATCHDOG_USEC, and only when WATCHDOG_PID is unset or ours."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None


# ---------------------------------------------------------------------------
# SystemdNotifier with a fake clock


def test_notifier_sends_ready_only_once_the_port_listens(notify_socket: NotifySocket) -> None:
    """READY=1 waits for the readiness Deferred, and then goes out at once."""
    listening: defer.Deferred[Any] = defer.Deferred()
    notifier = SystemdNotifier(
        task.Clock(), {"NOTIFY_SOCKET": notify_socket.name}, ready=lambda: listening
    )
    notifier.startService()
    assert notify_socket.pending() == []
    listening.callback("port")
    assert notify_socket.pending() == [b"READY=1"]
    notifier.stopService()


def test_notifier_leaves_the_readiness_result_alone(notify_socket: NotifySocket) -> None:
    """The readiness Deferred's own callbacks still see its result (the port)."""
    listening: defer.Deferred[Any] = defer.Deferred()
    notifier = SystemdNotifier(
        task.Clock(), {"NOTIFY_SOCKET": notify_socket.name}, ready=lambda: listening
    )
    notifier.startService()
    listening.callback("port")
    seen: list[Any] = []
    listening.addCallback(seen.append)
    assert seen == ["port"]
    notifier.stopService()


def test_notifier_pings_the_watchdog_at_half_its_timeout(notify_socket: NotifySocket) -> None:
    """WATCHDOG=1 goes out on readiness and then every WATCHDOG_USEC/2 of reactor time."""
    clock = task.Clock()
    environ = {
        "NOTIFY_SOCKET": notify_socket.name,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = SystemdNotifier(clock, environ)
    notifier.startService()
    assert notify_socket.pending() == [b"READY=1", b"WATCHDOG=1"]
    clock.advance(0.99)
    assert notify_socket.pending() == []
    clock.advance(0.01)
    assert notify_socket.pending() == [b"WATCHDOG=1"]
    clock.pump([1.0, 1.0, 1.0])
    assert notify_socket.pending() == [b"WATCHDOG=1"] * 3
    notifier.stopService()


def test_notifier_sends_stopping_and_stops_pinging_on_stop(notify_socket: NotifySocket) -> None:
    """stopService sends STOPPING=1 and leaves no watchdog timer behind."""
    clock = task.Clock()
    environ = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "2000000"}
    notifier = SystemdNotifier(clock, environ)
    notifier.startService()
    notify_socket.pending()
    notifier.stopService()
    assert notify_socket.pending() == [b"STOPPING=1"]
    assert clock.getDelayedCalls() == []
    clock.advance(10.0)
    assert notify_socket.pending() == []


def test_notifier_ignores_a_watchdog_meant_for_another_process(
    notify_socket: NotifySocket,
) -> None:
    """A WATCHDOG_PID that is not ours (inherited variables) starts no pings."""
    clock = task.Clock()
    environ = {
        "NOTIFY_SOCKET": notify_socket.name,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = SystemdNotifier(clock, environ)
    notifier.startService()
    assert notify_socket.pending() == [b"READY=1"]
    assert clock.getDelayedCalls() == []
    notifier.stopService()


def test_notifier_stopped_before_ready_never_sends_ready(notify_socket: NotifySocket) -> None:
    """A stop before the port listens sends STOPPING=1 and never READY=1."""
    listening: defer.Deferred[Any] = defer.Deferred()
    notifier = SystemdNotifier(
        task.Clock(), {"NOTIFY_SOCKET": notify_socket.name}, ready=lambda: listening
    )
    notifier.startService()
    notifier.stopService()
    listening.callback("port")
    assert notify_socket.pending() == [b"STOPPING=1"]


def test_notifier_that_never_gets_ready_sends_nothing(notify_socket: NotifySocket) -> None:
    """A failed readiness Deferred means no READY=1 (systemd then fails the start)."""
    listening: defer.Deferred[Any] = defer.Deferred()
    notifier = SystemdNotifier(
        task.Clock(), {"NOTIFY_SOCKET": notify_socket.name}, ready=lambda: listening
    )
    notifier.startService()
    listening.errback(OSError("address in use"))
    listening.addErrback(lambda _: None)  # its owner handles the failure
    assert notify_socket.pending() == []
    notifier.stopService()


def test_notifier_survives_a_vanished_notify_socket() -> None:
    """A notify socket that cannot be reached is logged, never raised."""
    clock = task.Clock()
    environ = {"NOTIFY_SOCKET": f"/nonexistent-{uuid.uuid4().hex}/notify", "WATCHDOG_USEC": "2000000"}
    notifier = SystemdNotifier(clock, environ)
    notifier.startService()
    clock.advance(5.0)
    assert notifier._watchdog is not None and notifier._watchdog.running
    notifier.stopService()


def test_notifier_outside_systemd_is_harmless() -> None:
    """Without NOTIFY_SOCKET the notifier starts and stops without effect."""
    clock = task.Clock()
    notifier = SystemdNotifier(clock, {})
    notifier.startService()
    notifier.stopService()
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# The real daemon, as deltagw.service runs it


def test_twistd_notifies_ready_watchdog_and_stopping(
    daemons: Callable[..., Twistd], abstract_notify_socket: NotifySocket
) -> None:
    """Under Type=notify the daemon sends READY=1, pings the watchdog, and STOPPING=1 on SIGTERM."""
    env = child_environ(
        PORT=LOOPBACK_ANY_PORT,
        NOTIFY_SOCKET=abstract_notify_socket.name,
        WATCHDOG_USEC="200000",
    )
    daemon = daemons(twistd_argv(), env)
    try:
        abstract_notify_socket.receive_until(b"READY=1", START_DEADLINE)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{daemon.output()}") from None
    # READY=1 promises a listening port.
    port = listening_port(daemon.wait_for_line(is_starting_on, START_DEADLINE))
    get_health(port, daemon, timeout=10)
    # Two pings after READY=1: the reactor timer really runs (every 0.1 s).
    abstract_notify_socket.receive_until(b"WATCHDOG=1", 10.0)
    abstract_notify_socket.receive_until(b"WATCHDOG=1", 10.0)
    daemon.process.send_signal(signal.SIGTERM)
    abstract_notify_socket.receive_until(b"STOPPING=1", STOP_DEADLINE)
    # A drained stop is a normal exit: 0, not twistd's re-raised SIGTERM (-15).
    assert daemon.process.wait(timeout=STOP_DEADLINE) == 0, daemon.output()




def test_twistd_serves_on_a_socket_passed_by_systemd(daemons: Callable[..., Twistd]) -> None:
    """With LISTEN_FDS=1 and PORT=systemd:domain=INET:index=0 the daemon serves on fd 3."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        fd = listener.fileno()
        # systemd passes sockets from fd 3 on, and LISTEN_PID must be the pid
        # of the process that reads them, which Popen cannot know in advance:
        # a tiny wrapper moves the socket to fd 3, sets LISTEN_PID to its own
        # pid and execs twistd, which keeps that pid. (Python rather than
        # `sh -c 'LISTEN_PID=$$ exec ...'`: dash cannot redirect fds above 9.)
        # systemd (since v227) also names each socket, by default after its
        # unit, and Twisted wants as many names as descriptors.
        wrapper = [sys.executable, "-c", SYSTEMD_EXEC, *twistd_argv()]
        env = child_environ(PORT="systemd:domain=INET:index=0", DGW_FD=str(fd))
        daemon = daemons(wrapper, env, pass_fds=[fd])
        # The kernel queues our connection on the inherited socket until
        # twistd accepts it: no need to wait for the start-up first.
        assert b'"healthy"' in get_health(port, daemon)
        assert daemon.terminate() == 0, daemon.output()


# ---------------------------------------------------------------------------
# The unit files


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed here (apt-get install systemd provides it)",
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/deltagw.service and deltagw.socket have no errors systemd can find."""
    # verify checks that ExecStart= exists; /opt/deltagw/venv is where a real
    # install puts it, so point the copy at this venv's twistd instead.
    service = (DEPLOY / "deltagw.service").read_text()
    assert "ExecStart=/opt/deltagw/venv/bin/twistd " in service
    (tmp_path / "deltagw.service").write_text(
        service.replace("/opt/deltagw/venv/bin/twistd", str(TWISTD))
    )
    shutil.copy(DEPLOY / "deltagw.socket", tmp_path / "deltagw.socket")
    result = subprocess.run(
        ["systemd-analyze", "verify", "deltagw.service", "deltagw.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_unit_runs_the_documented_command() -> None:
    """The unit is Type=notify with a watchdog and runs twistd without a pid file."""
    lines = (DEPLOY / "deltagw.service").read_text().splitlines()
    assert "Type=notify" in lines
    assert "WatchdogSec=30" in lines
    assert "ExecStart=/opt/deltagw/venv/bin/twistd --nodaemon --pidfile= deltagw" in lines


def test_env_example_selects_the_socket_passed_by_systemd() -> None:
    """The env example's PORT takes fd 3 from deltagw.socket (ListenStream=8000)."""
    env = (DEPLOY / "deltagw.env.example").read_text().splitlines()
    assert "PORT=systemd:domain=INET:index=0" in env
    assert "ListenStream=8000" in (DEPLOY / "deltagw.socket").read_text().splitlines()
