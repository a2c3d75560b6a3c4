"""Run ``twistd`` as a real subprocess, the way the README tells users to.

`Twistd` is the one helper every subprocess test uses. Its stdout is a pipe
read as it comes: by the reactor while it runs (an async test), and by
``select`` in the blocking waits of a plain test, so a chatty child never
blocks on a full pipe and no test sleeps to wait for it. stderr goes to a
file.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from tests.support import wait_until

TWISTD = str(Path(sys.executable).parent / "twistd")
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"
START_DEADLINE = 30.0
STOP_DEADLINE = 30.0

SYSTEMD_EXEC = """
import os, sys
fd = int(os.environ.pop("DGW_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="deltagw.socket")
os.execv(sys.argv[1], sys.argv[1:])
"""
"""Run as ``python -c SYSTEMD_EXEC twistd ...``: hands the socket in DGW_FD over
as systemd would (fd 3, LISTEN_FDS, and LISTEN_PID naming the exec'd process,
which the parent cannot know before it starts)."""

_STARTING_ON = re.compile(r"(?:GatewaySite|WorkerSupervisor) starting on (\d+)")


def signals_as_from_a_terminal() -> None:
    """SIGINT and SIGHUP at their defaults in a child, as in a process started
    from a shell prompt, whatever this test run inherited: ``nohup`` ignores
    SIGHUP, and a shell ignores SIGINT in the jobs it starts in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def child_environ(**extra: str) -> dict[str, str]:
    """Our environment without what systemd, a deployment or a source tree would add.

    NOTIFY_SOCKET, LISTEN_* and WATCHDOG_* belong to whoever started *us*;
    DELTAGW_* and REDIS_URL would change the gateway under test; twistd must
    find the installed deltagw, never a source tree on PYTHONPATH.
    """
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "DELTAGW_"))
    }
    env.pop("PYTHONPATH", None)
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


def twistd_argv(*options: str) -> list[str]:
    """``twistd --nodaemon --pidfile= deltagw [options]``: as systemd and Docker run it."""
    return [TWISTD, "--nodaemon", "--pidfile=", "deltagw", *options]


@implementer(IReadDescriptor)
class Twistd:
    """A twistd child process (or anything that logs like one), its stdout read line by line.

    Args:
        argv: The command.
        env: Added to this process's environment (PORT defaults to a free loopback port).
        cwd: Where it runs.
        pass_fds: Descriptors it inherits (a socket passed as systemd would).
        own_session: Start it in a session of its own, so that `kill` ends
            every process it started (``--workers``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | Path | None = None,
        pass_fds: Sequence[int] = (),
        own_session: bool = False,
    ) -> None:
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close)
        self.process = subprocess.Popen(
            list(argv), env={**os.environ, "PORT": LOOPBACK_ANY_PORT, **env}, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            pass_fds=tuple(pass_fds), start_new_session=own_session,
            preexec_fn=signals_as_from_a_terminal,
        )
        assert self.process.stdout is not None
        self._fd = self.process.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._own_session = own_session
        self._partial = b""
        self._lines: list[str] = []
        self._at_end = False
        self._final_stderr = ""
        reactor.addReader(self)

    @classmethod
    def plugin(cls, *options: str, env: Mapping[str, str] | None = None) -> Twistd:
        """``twistd -n deltagw [options]`` (no pid file, as under systemd/Docker)."""
        return cls(twistd_argv(*options), env or {})

    # IReadDescriptor: the reactor drains stdout while it runs.

    def fileno(self) -> int:
        return self._fd if not self._at_end else -1

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        self._read_available()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        pass

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "Twistd"

    def _read_available(self) -> None:
        """Take what stdout holds now; at its end, stop watching it."""
        while not self._at_end:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._at_end = True
                reactor.removeReader(self)
                if self._partial:
                    self._lines.append(self._partial.decode("utf-8", "replace"))
                    self._partial = b""
                return
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            self._lines.extend(line.decode("utf-8", "replace") for line in complete)

    # What it printed.

    def lines(self) -> list[str]:
        """Every non-empty stdout line so far."""
        self._read_available()
        return [line for line in self._lines if line.strip()]

    def events(self) -> list[dict[str, Any]]:
        """Every stdout line so far as a JSON object (fails on one that is not)."""
        return parse_json_lines(self.lines(), self.output)

    def output(self) -> str:
        """Everything it printed so far, for failure messages."""
        return "--- stdout\n" + "\n".join(self.lines()) + "\n--- stderr\n" + self._stderr_text()

    def _stderr_text(self) -> str:
        if self._stderr.closed:
            return self._final_stderr
        self._stderr.seek(0)
        return self._stderr.read()

    # Waiting, blocking (plain tests).

    def wait_for_line(self, predicate: Callable[[str], Any], timeout: float = START_DEADLINE) -> str:
        """The first stdout line (old or new) that satisfies ``predicate``."""
        return self._wait(lambda: next((line for line in self.lines() if predicate(line)), None),
                          timeout)

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = START_DEADLINE
    ) -> Any:
        """Block until ``predicate(events so far)`` is truthy; return its value."""
        return self._wait(lambda: predicate(self.events()), timeout)

    def _wait(self, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout} s\n{self.output()}")
            if self._at_end:
                raise AssertionError(f"stdout closed (exit {self.process.wait()})\n{self.output()}")
            select.select([self._fd], [], [], remaining)

    def terminate(self, timeout: float = STOP_DEADLINE) -> int:
        """SIGTERM it and wait for its exit status (blocking)."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._read_to_end()
        return code

    def _read_to_end(self, timeout: float = 5.0) -> None:
        """What it printed before exiting (a worker it started may hold the pipe a little longer)."""
        deadline = time.monotonic() + timeout
        while not self._at_end and time.monotonic() < deadline:
            if select.select([self._fd], [], [], deadline - time.monotonic())[0]:
                self._read_available()

    # Waiting, with the reactor running (async tests).

    async def port(self, timeout: float = START_DEADLINE) -> int:
        """The port it listens on, read from its own log."""

        def found() -> int | None:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited {self.process.returncode}:\n{self.output()}")
            match = _STARTING_ON.search("\n".join(self.lines()))
            return int(match.group(1)) if match else None

        return await wait_until(found, timeout=timeout)

    async def stop(self, timeout: float = STOP_DEADLINE) -> int:
        """SIGTERM it (if still running) and return its exit status; killed past ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await wait_until(lambda: self.process.poll() is not None, timeout=timeout)
            except AssertionError:
                self.kill()
        code = self.process.wait()
        self.close()
        return code

    # The end.

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Its memory, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not found")

    def kill(self) -> None:
        """SIGKILL it (and, in a session of its own, everything it started)."""
        try:
            if self._own_session:
                os.killpg(self.process.pid, signal.SIGKILL)
            elif self.process.poll() is None:
                self.process.kill()
        except ProcessLookupError:
            pass
        self.process.wait()

    def close(self) -> None:
        """Kill it if it still runs, keep what it printed, close its files (idempotent)."""
        if self._stderr.closed:
            return
        self.kill()
        self._read_to_end()
        if not self._at_end:
            self._at_end = True
            reactor.removeReader(self)
        self._final_stderr = self._stderr_text()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._stderr.close()


def listening_port(line: str) -> int:
    """The port of a ``... starting on <port>`` log line."""
    return int(json.loads(line)["event"].rsplit(" ", 1)[1])


def is_starting_on(line: str) -> bool:
    """Whether a log line says a port is listening."""
    return "starting on" in line


def get_health(port: int, daemon: Twistd, timeout: float = START_DEADLINE) -> bytes:
    """GET /health on loopback (blocking); a failure shows what the daemon printed."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as response:
            assert response.status == 200
            return response.read()
    except OSError as e:
        raise AssertionError(f"GET /health failed: {e!r}\n{daemon.output()}") from e


def parse_json_lines(
    lines: list[str], context: Callable[[], str] = lambda: ""
) -> list[dict[str, Any]]:
    """Every line as a JSON object (fails on the first that is not one)."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{context()}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events
