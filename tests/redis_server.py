"""A throw-away ``redis-server`` for tests that need the real thing.

The Redis limiter's promises (one shared budget across connections, NOSCRIPT
recovery, fail-open during an outage, reconnection afterwards) are promises
about a real server's behaviour, so its tests run one: on a free loopback
port, in a temporary directory, with persistence off (``--save ''
--appendonly no``) so nothing outlives the test. The server can be stopped,
paused (SIGSTOP: a server that accepts bytes but never answers, i.e. a slow
Redis) and restarted on the same port, which is what a client's reconnection
logic sees in production.

Waiting is polling with a deadline: the helper blocks on the server's log pipe
(``select``), so it wakes as soon as the server says something, and confirms
with a PING. A missing ``redis-server`` raises `RedisServerError`: CI must
run these tests, so they fail rather than skip.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

STARTUP_DEADLINE = 10.0
"""Seconds a start may take before the test fails (generous for slow CI)."""

STOP_DEADLINE = 10.0
"""Seconds a stop may take before the server is killed outright."""


class RedisServerError(Exception):
    """The test Redis could not be found, started or reached in time."""


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port.

    Returns:
        A port number that was free a moment ago; a later bind may still
        lose a race, which `RedisServer.start` reports as a start failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.5) -> bool:
    """Tell whether a Redis on loopback ``port`` answers PING with PONG.

    Args:
        port: The TCP port on 127.0.0.1.
        timeout: Seconds for connecting and for the answer.

    Returns:
        True only for a ``+PONG`` answer; refused, reset, silent or other
        answers (``-LOADING``) are all "not ready".
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on a fixed loopback port.

    The port is chosen once, at the first `start`, and kept across `stop` /
    `start` so that clients configured with it reconnect to the new process.

    Attributes:
        port: The loopback TCP port (0 until the first start).
        host: Always ``127.0.0.1``.
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path, executable: str = "redis-server") -> None:
        """Prepare (not start) a server.

        Args:
            directory: An empty temporary directory for the server's working
                files and log; nothing is written there with persistence off,
                but Redis insists on a working directory.
            executable: The server binary, looked up on PATH.

        Raises:
            RedisServerError: The binary is not installed.
        """
        found = shutil.which(executable)
        if found is None:
            raise RedisServerError(
                f"{executable!r} not found on PATH; install redis-server "
                "(Debian: apt-get install redis-server) to run these tests"
            )
        self._executable = found
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.port = 0

    @property
    def running(self) -> bool:
        """Whether a server process is alive (possibly paused)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it answers PING.

        Raises:
            RedisServerError: It exited or did not answer before
                `STARTUP_DEADLINE`; its log is in the message.
        """
        if self.running:
            raise RedisServerError("redis-server is already running")
        if self.port == 0:
            self.port = free_port()
        self._process = subprocess.Popen(
            [
                self._executable,
                "--port", str(self.port),
                "--bind", self.host,
                "--dir", str(self._directory),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "notice",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._wait_until_ready(self._process)

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Poll until PONG, waking on the server's log output, up to a deadline."""
        assert process.stdout is not None
        log = bytearray()
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not ping(self.port):
            if process.poll() is not None:
                log += process.stdout.read()
                raise RedisServerError(
                    f"redis-server exited with {process.returncode}:\n"
                    + log.decode(errors="replace")
                )
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill(process)
                raise RedisServerError(
                    f"redis-server did not answer PING within {STARTUP_DEADLINE}s:\n"
                    + log.decode(errors="replace")
                )
            # Block until the server logs something ("Ready to accept
            # connections" is the line we hope for), at most a short slice.
            readable, _, _ = select.select([process.stdout], [], [], min(left, 0.05))
            if readable:
                log += os.read(process.stdout.fileno(), 65536)

    def command(self, *args: bytes) -> bytes:
        """Run one command on a fresh connection and return the raw reply.

        For test set-up and inspection (``SCRIPT FLUSH``, ``PTTL``), outside
        the client under test. Replies are small, one read is enough.
        """
        encoded = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args
        )
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            s.sendall(encoded)
            return s.recv(65536)

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL after `STOP_DEADLINE`) and reap it.

        The port stays reserved in ``self.port`` for a later `start`.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            # A stopped process cannot act on SIGTERM until it is continued.
            process.send_signal(signal.SIGCONT)
            self._paused = False
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self._kill(process)
        if process.stdout is not None:
            process.stdout.close()

    def restart(self) -> None:
        """Stop the server if it runs, then start a fresh one on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        if self._process is None:
            raise RedisServerError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server (see `pause`) run again."""
        if self._process is None:
            raise RedisServerError("redis-server is not running")
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        """Kill and reap a server that would not go quietly."""
        process.kill()
        process.wait()
