"""deploy/docker-compose.yml: a whole DeltaStream, checked without a Docker engine.

No Docker engine runs where the tests run, so ``docker compose up`` is never
run here. What can be checked is, first, the file's structure against what
it must do (the gateway built from the repository's Dockerfile and run with
``--demo``, a Redis named by REDIS_URL, the published port being PORT, only
settings deltagw.config knows, a healthcheck on /health); and then what the
gateway container would run: the compose file's own command line and
environment, as a real ``twistd`` subprocess on a free loopback port
instead of 8000, against a real ``redis-server`` instead of the ``redis``
service, until /health/ready says the Redis limiter is connected and data
and analytics routes answer 200 through the demo's backends.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest_twisted
import treq
import yaml
from twisted.internet import threads

from deltagw.config import SETTINGS, load_settings
from tests.daemon import TWISTD, Twistd
from tests.redis_server import RedisServer
from tests.support import eventually
from tests.system.test_docker import DOCKERFILE, cmd, instructions

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
SETTING_NAMES = frozenset(setting.env for setting in SETTINGS)
REDIS_DEFAULT_PORT = 6379


def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either of compose's two spellings."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(entry.split("=", 1) for entry in env)
    assert all(isinstance(value, str) for value in env.values()), (
        "quote every value: compose passes strings"
    )
    return dict(env)


def _published_container_ports(service: dict[str, Any]) -> list[int]:
    """The container side of each ``ports`` entry ([host_ip:][host:]container)."""
    found = []
    for entry in service["ports"]:
        if isinstance(entry, dict):
            found.append(int(entry["target"]))
        else:
            found.append(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return found


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, f"expected a duration in seconds such as 30s, got {duration!r}"
    return float(match.group(1))


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    return test[1:]


def _image_state_dir() -> str:
    """Where the image keeps the demo's state: $XDG_STATE_HOME/deltagw."""
    environment = " ".join(rest for keyword, rest in instructions() if keyword == "ENV")
    match = re.search(r"\bXDG_STATE_HOME=(\S+)", environment)
    assert match, "the Dockerfile sets no XDG_STATE_HOME"
    return f"{match.group(1).rstrip('/')}/deltagw"


def test_services_are_the_gateway_and_redis() -> None:
    """The platform is two services, both restarted by Docker when they die."""
    services = _compose()["services"]
    assert set(services) == {"gateway", "redis"}
    for name, service in services.items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_gateway_builds_from_the_repositorys_dockerfile() -> None:
    """build.context is the repository (``..`` from deploy/) and its Dockerfile."""
    build = _service("gateway")["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_gateway_runs_the_images_command_with_demo() -> None:
    """The command is the image's CMD plus --demo: the gateway and its reference backends."""
    command = _service("gateway")["command"]
    assert isinstance(command, list), "exec form, so no shell stands between Docker and twistd"
    assert "--demo" in command
    assert command == [*cmd(), "--demo"]


def test_every_environment_name_is_a_setting_and_every_value_parses() -> None:
    """Only names deltagw.config knows, with values it accepts."""
    env = _environment(_service("gateway"))
    assert set(env) <= SETTING_NAMES, sorted(set(env) - SETTING_NAMES)
    load_settings(env)


def test_redis_url_names_the_redis_service() -> None:
    """REDIS_URL reaches the redis service by its compose name, on Redis's port."""
    url = urlsplit(_environment(_service("gateway"))["REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname in _compose()["services"]
    assert url.hostname == "redis"
    assert (url.port or REDIS_DEFAULT_PORT) == REDIS_DEFAULT_PORT
    redis = _service("redis")
    assert "--port" not in redis.get("command", []), "REDIS_URL assumes Redis's own port"


def test_gateway_waits_for_a_healthy_redis() -> None:
    """The gateway starts once redis answers PING (its readiness would wait anyway)."""
    assert _service("gateway")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _healthcheck_argv(_service("redis")) == ["redis-cli", "ping"]


def test_published_port_is_port() -> None:
    """The container port published is the one PORT makes the gateway listen on."""
    port = _environment(_service("gateway"))["PORT"]
    assert port.isdigit(), f"PORT={port!r}: compose publishes a plain port number"
    assert _published_container_ports(_service("gateway")) == [int(port)]


def test_healthcheck_hits_health_on_port() -> None:
    """The gateway's healthcheck GETs /health on PORT inside the container."""
    port = _environment(_service("gateway"))["PORT"]
    argv = _healthcheck_argv(_service("gateway"))
    assert any(f"http://127.0.0.1:{port}/health'" in arg for arg in argv), argv


def test_demo_state_outlives_the_container() -> None:
    """A named volume sits where the image keeps the demo's users and secret."""
    targets = {str(volume).split(":")[1] for volume in _service("gateway")["volumes"]}
    assert _image_state_dir() in targets


def test_stop_grace_period_covers_the_drain() -> None:
    """``docker compose stop`` waits longer than SHUTDOWN_GRACE before SIGKILL."""
    env = _environment(_service("gateway"))
    grace = load_settings(env).shutdown_grace
    assert _seconds(_service("gateway")["stop_grace_period"]) > grace


def _on_loopback(url: str, port: int) -> str:
    """``url`` (the compose REDIS_URL) with its host and port made the test Redis's."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


async def _get(port: int, path: str) -> tuple[int, Any]:
    response = await treq.get(f"http://127.0.0.1:{port}{path}")
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_the_gateway_container_command_serves_a_platform(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The compose command line and environment (PORT on a free loopback port,
    REDIS_URL at a real redis-server, the demo's state in a scratch directory)
    give a gateway that gets ready with Redis connected and answers data and
    analytics routes through the demo backends; its healthcheck passes; every
    client's budget is kept in Redis."""
    gateway = _service("gateway")
    command = gateway["command"]
    assert command[0] == "twistd"
    env = _environment(gateway)
    env.update(
        PORT="tcp:0:interface=127.0.0.1",
        REDIS_URL=_on_loopback(env["REDIS_URL"], redis_server.port),
        XDG_STATE_HOME=str(tmp_path / "state"),
    )
    daemon = Twistd([TWISTD, *command[1:]], env, cwd=str(tmp_path))
    try:
        port = await daemon.port(timeout=30)

        async def ready() -> Any:
            status, document = await _get(port, "/health/ready")
            return document if status == 200 else None

        document = await eventually(ready, timeout=30)
        assert document["rate_limiter"] == {"backend": "redis", "state": "connected"}

        status, products = await _get(port, "/api/data/products")
        assert status == 200, products
        assert "NIFTY" in products["products"]
        status, pcr = await _get(port, "/api/analytics/pcr/NIFTY")
        assert status == 200, pcr
        assert pcr["product"] == "NIFTY"

        buckets = redis_server.command(b"KEYS", b"deltagw:rl:*")
        assert buckets.startswith(b"*") and not buckets.startswith(b"*0"), buckets

        probe = [sys.executable if arg == "python" else arg for arg in _healthcheck_argv(gateway)]
        probe = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in probe]
        check = await threads.deferToThread(
            subprocess.run, probe, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.output()
