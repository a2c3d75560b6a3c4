"""Run ``twistd`` as a real subprocess, the way the README tells users to."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support import wait_until

TWISTD = str(Path(sys.executable).parent / "twistd")
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

_STARTING_ON = re.compile(r"GatewaySite starting on (\d+)")


def signals_as_from_a_terminal() -> None:
    """SIGINT and SIGHUP at their defaults in a child, as in a process started
    from a shell prompt, whatever this test run inherited: ``nohup`` ignores
    SIGHUP, and a shell ignores SIGINT in the jobs it starts in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Daemon:
    """A twistd process whose stdout is captured to a file for inspection."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.stdout = tempfile.NamedTemporaryFile(prefix="deltagw-", suffix=".log", delete=False)
        full_env = {**os.environ, "PORT": "tcp:0:interface=127.0.0.1", **env}
        self.process = subprocess.Popen(
            args, env=full_env, cwd=cwd, stdout=self.stdout, stderr=subprocess.STDOUT,
            preexec_fn=signals_as_from_a_terminal,
        )

    @classmethod
    def plugin(cls, *options: str, env: dict[str, str] | None = None) -> Daemon:
        """``twistd -n deltagw [options]`` (no pid file, as under systemd/Docker)."""
        return cls([TWISTD, "-n", "--pidfile=", "deltagw", *options], env or {})

    def output(self) -> str:
        if self.stdout.closed:
            return self._final_output
        return Path(self.stdout.name).read_text(errors="replace")

    def lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.strip()]

    async def port(self, timeout: float = 15) -> int:
        """The port the gateway listens on, read from its own log."""

        def found() -> int | None:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited {self.process.returncode}:\n{self.output()}")
            match = _STARTING_ON.search(self.output())
            return int(match.group(1)) if match else None

        return await wait_until(found, timeout=timeout)

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not found")

    async def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await wait_until(lambda: self.process.poll() is not None, timeout=timeout)
            except AssertionError:
                self.process.kill()
                self.process.wait()
        self._final_output = self.output()
        self.stdout.close()
        os.unlink(self.stdout.name)
        return self.process.returncode


def parse_json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Every line as a JSON object (fails on the first that is not one)."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events
