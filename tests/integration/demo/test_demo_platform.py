"""The demo platform: ports, logging, lifecycle and shared error handling."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, cast

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.iweb import IRequest

from deltagw.demo._http import install_json_errors
from deltagw.demo.platform import DemoPlatform, default_state_dir
from tests.support import wait_until

if TYPE_CHECKING:
    from conftest import Client, MakePlatform

SERVICES = ("auth", "storage", "analytics")


def test_services_listen_on_distinct_loopback_ports(platform: DemoPlatform) -> None:
    """Each backend has its own port on 127.0.0.1."""
    assert set(platform.urls) == set(SERVICES)
    ports = set()
    for url in platform.urls.values():
        host, _, port = url.removeprefix("http://").partition(":")
        assert host == "127.0.0.1"
        ports.add(int(port))
    assert len(ports) == 3


def _json_lines(events: list[LogEvent]) -> list[dict[str, Any]]:
    """The gateway's structured lines among ``events``, decoded."""
    return [json.loads(str(e["message"][0])) for e in events if e.get("_structlog")]


def test_start_logs_one_line_per_service(make_platform: MakePlatform) -> None:
    """Starting logs where each service listens, once, even if started twice."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        platform = make_platform()
        platform.privilegedStartService()
        urls = dict(platform.urls)
        platform.startService()
    finally:
        globalLogPublisher.removeObserver(observer)

    assert platform.urls == urls
    assert [(e["event"], e["component"], e["service"], e["url"]) for e in _json_lines(events)] == [
        ("demo_listening", "demo", name, urls[name]) for name in SERVICES
    ]


@pytest_twisted.ensureDeferred
async def test_backends_log_json_lines_without_query_strings(platform: DemoPlatform, client: Any) -> None:
    """Each request to a backend is one JSON line marked with its backend, its path
    without the query: an ?access_token=... or a password never reaches the log."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        await client.get(platform.urls["storage"] + "/products?access_token=SECRET123&x=1")
        await client.get(platform.urls["analytics"] + "/pcr/NIFTY?access_token=SECRET123")
        await client.post(platform.urls["auth"] + "/login",
                          {"email": "nobody@example.com", "password": "hunter2-SECRET"})
        await wait_until(lambda: len([e for e in _json_lines(events) if e["event"] == "demo_request"]) == 3)
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [e for e in _json_lines(events) if e["event"] == "demo_request"]
    assert [(e["component"], e["method"], e["path"]) for e in lines] == [
        ("demo-storage", "GET", "/products"), ("demo-analytics", "GET", "/pcr/NIFTY"),
        ("demo-auth", "POST", "/login"),
    ]
    everything = repr([dict(e) for e in events])
    assert "SECRET123" not in everything and "hunter2" not in everything


def test_start_service_alone_binds_the_ports(make_platform: MakePlatform) -> None:
    """A platform started without the privileged step still listens."""
    platform = make_platform()

    platform.startService()

    assert set(platform.urls) == set(SERVICES)


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_ports(reactor: Any, platform: DemoPlatform) -> None:
    """After stopService no backend accepts connections."""
    await platform.stopService()

    for url in platform.urls.values():
        port = int(url.rpartition(":")[2])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        with pytest.raises(ConnectionRefusedError):
            await endpoint.connect(Factory.forProtocol(Protocol))


@pytest.mark.parametrize("service", SERVICES)
@pytest_twisted.ensureDeferred
async def test_unknown_routes_get_a_json_404(
    client: Client, platform: DemoPlatform, service: str
) -> None:
    """Every backend answers an unknown route with a JSON 404."""
    reply = await client.get(platform.urls[service] + "/no/such/route")

    assert reply.status == 404
    assert reply.content_type == "application/json"
    assert reply.json == {"error": "Not found"}


@pytest.mark.parametrize(
    ("service", "method", "path", "allowed"),
    [
        ("auth", "GET", "/register", "POST"),
        ("storage", "POST", "/products", "GET, HEAD"),
        ("analytics", "DELETE", "/pcr/NIFTY", "GET, HEAD"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_methods_get_a_json_405(
    client: Client,
    platform: DemoPlatform,
    service: str,
    method: str,
    path: str,
    allowed: str,
) -> None:
    """Every backend answers a wrong method with a JSON 405 and an Allow header."""
    reply = await client.request(method, platform.urls[service] + path)

    assert reply.status == 405
    assert reply.content_type == "application/json"
    assert reply.json == {"error": "Method not allowed"}
    assert reply.header("allow") == allowed


@pytest.mark.parametrize(
    ("xdg_state_home", "expected"),
    [
        pytest.param("/srv/state", "/srv/state/deltagw", id="xdg"),
        pytest.param(None, "/home/dana/.local/state/deltagw", id="unset"),
        pytest.param(
            "relative/state", "/home/dana/.local/state/deltagw", id="relative"
        ),
    ],
)
def test_default_state_dir_follows_xdg(
    monkeypatch: Any, xdg_state_home: str | None, expected: str
) -> None:
    """The state directory is $XDG_STATE_HOME/deltagw, else ~/.local/state/deltagw."""
    monkeypatch.setenv("HOME", "/home/dana")
    if xdg_state_home is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)

    assert default_state_dir() == expected


def test_state_dir_is_created_private(platform: DemoPlatform, state_dir: Any) -> None:
    """A missing state directory is created readable by its owner only."""
    assert os.stat(state_dir.path).st_mode & 0o777 == 0o700


class Broken:
    """A Klein app whose only route fails, to exercise the catch-all handler."""

    app = Klein()
    install_json_errors(app)

    @app.route("/")
    def fail(self, request: IRequest) -> bytes:
        """Raise an error no handler expects."""
        raise RuntimeError("secret internals")


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_get_a_json_500_without_the_traceback() -> None:
    """A bug in a handler answers a generic JSON 500; the details stay in the log."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        stub: Any = StubTreq(Broken().app.resource())  # Its methods are dynamic.
        response = await stub.get("http://demo/")
        body = await response.content()
    finally:
        globalLogPublisher.removeObserver(observer)

    assert response.code == 500
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body) == {"error": "Internal server error"}
    assert b"secret internals" not in body
    [line] = [e for e in _json_lines(events) if e["event"] == "demo_unhandled_error"]
    assert line["level"] == "error" and line["component"] == "demo"
    assert "RuntimeError" in line["exception"] and "\n" not in json.dumps(line)


@pytest_twisted.ensureDeferred
async def test_answers_say_how_long_a_cache_may_keep_them(
    client: Client, platform: DemoPlatform
) -> None:
    """Market data says how fresh it stays, as a real market-data service would
    (RFC 9111 §5.2.2.1); the auth service's answers may never be stored; errors say nothing."""
    storage, analytics, auth = (platform.urls[name] for name in ("storage", "analytics", "auth"))
    expected = {
        f"{storage}/products": "max-age=60",
        f"{storage}/underlying/NIFTY": "max-age=1",
        f"{storage}/option/chain/NIFTY": "max-age=1",
        f"{analytics}/pcr/NIFTY": "max-age=1",
        f"{analytics}/volatility-surface/NIFTY": "max-age=5",
        f"{storage}/underlying/NOPE": None,
    }
    seen = {url: (await client.get(url)).header("cache-control") for url in expected}
    assert seen == expected
    registered = await client.post(
        f"{auth}/register",
        {"email": "cache@example.com", "password": "correct horse battery", "name": "C"},
    )
    assert (registered.status, registered.header("cache-control")) == (201, "no-store")
    verified = await client.post(f"{auth}/verify", {"token": registered.json["token"]})
    assert (verified.status, verified.header("cache-control")) == (200, "no-store")
