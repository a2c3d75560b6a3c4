"""``--workers N``: one parent binds the port, N twistd workers serve it.

The subprocess tests run the installed ``twistd -n --pidfile= deltagw
--workers 2`` in its own process group (so teardown can kill the workers
too), read its JSON lines from a pipe with deadlines, and tell workers apart
by the ``pid`` every worker line carries. The supervisor's restart and stop
logic is also tested against a fake reactor and clock.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error, protocol, reactor, task, tcp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from deltagw.config import ConfigError, load_settings
from deltagw.process.cache_purge import PURGE_SIGNAL
from deltagw.process.workers import (
    LISTEN_FD_ENV,
    InheritedPortEndpoint,
    WorkerSupervisor,
    _AdoptingReactor,
    listen_endpoint,
    worker_environment,
)
from tests.daemon import (
    LOOPBACK_ANY_PORT,
    START_DEADLINE,
    STOP_DEADLINE,
    SYSTEMD_EXEC,
    Twistd,
    child_environ,
    twistd_argv,
)
from tests.redis_server import RedisServer

# ---------------------------------------------------------------------------
# A supervisor process and its workers


def serving(daemon: Twistd, count: int, timeout: float = START_DEADLINE) -> tuple[int, set[int]]:
    """Wait until ``count`` live workers listen; their port and pids."""

    def ready(events: list[dict[str, Any]]) -> Any:
        pids = listening_pids(events) - dead_pids(events)
        return len(pids) >= count and (port_of(events), pids)

    return daemon.wait_for(ready, timeout)


def listening_pids(events: list[dict[str, Any]]) -> set[int]:
    return {e["pid"] for e in events if "GatewaySite" in e.get("event", "")
            and "starting on" in e["event"]}


def dead_pids(events: list[dict[str, Any]]) -> set[int]:
    return {e["worker_pid"] for e in events if e.get("event") in ("worker_died", "worker_exited")}


def port_of(events: list[dict[str, Any]]) -> int | None:
    for e in events:
        if e.get("event", "").startswith("WorkerSupervisor starting on "):
            return int(e["event"].rsplit(" ", 1)[1])
    return None


@pytest.fixture
def supervised(daemons: Callable[..., Twistd]) -> Callable[..., Twistd]:
    """Start supervisors in sessions of their own: teardown kills them and every worker."""
    return functools.partial(daemons, own_session=True)


def served_by(daemon: Twistd, port: int, path: str = "/health",
              context: ssl.SSLContext | None = None) -> tuple[int, int]:
    """One request on a fresh connection: its status and the pid that answered it."""
    status, pid, _ = answered_by(daemon, port, path, context)
    return status, pid


def answered_by(daemon: Twistd, port: int, path: str = "/health",
                context: ssl.SSLContext | None = None) -> tuple[int, int, bytes]:
    """One request on a fresh connection: its status, the pid that answered and the body."""
    request_id = uuid.uuid4().hex
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path, headers={"X-Request-ID": request_id, "Connection": "close"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    event = daemon.wait_for(lambda events: next(
        (e for e in events if e.get("event") == "outgoing_response"
         and e.get("request_id") == request_id), None), timeout=10)
    return response.status, event["pid"], body


def serving_pids(daemon: Twistd, port: int, wanted: Callable[[set[int]], bool],
                 timeout: float = 30.0, **kwargs: Any) -> set[int]:
    """Request on fresh connections until the set of answering pids is ``wanted``."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while not wanted(seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"only pids {seen} answered within {timeout} s\n{daemon.output()}")
        status, pid = served_by(daemon, port, **kwargs)
        assert status == 200
        seen.add(pid)
    return seen


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------
# Real processes


def test_two_workers_share_one_port_and_both_serve(supervised: Callable[..., Twistd]) -> None:
    """The parent binds once; both workers adopt that port and each answers requests."""
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(PORT=LOOPBACK_ANY_PORT))
    port, pids = serving(daemon, 2)
    assert port is not None and len(pids) == 2
    parent = daemon.process.pid
    assert parent not in pids
    # Every worker listens on the parent's port, with the socket it inherited.
    starts = [e for e in daemon.events() if e.get("pid") in pids and "starting on" in e["event"]]
    assert {int(e["event"].rsplit(" ", 1)[1]) for e in starts} == {port}
    assert {e["worker"] for e in starts} == {0, 1}
    assert serving_pids(daemon, port, lambda seen: len(seen) == 2) == pids


def test_a_killed_worker_is_replaced(supervised: Callable[..., Twistd]) -> None:
    """SIGKILL a worker: the parent starts a new one in its slot, and it serves."""
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(PORT=LOOPBACK_ANY_PORT))
    port, pids = serving(daemon, 2)
    victim = min(pids)
    slot = next(e["worker"] for e in daemon.events() if e.get("pid") == victim)
    os.kill(victim, signal.SIGKILL)
    died = daemon.wait_for(lambda events: next(
        (e for e in events if e.get("event") == "worker_died" and e["worker_pid"] == victim), None))
    assert died["signal"] == signal.SIGKILL and died["worker"] == slot
    _, now = serving(daemon, 2)
    (newcomer,) = now - pids
    assert next(e["worker"] for e in daemon.events() if e.get("pid") == newcomer) == slot
    survivor = (pids - {victim}).pop()
    assert serving_pids(daemon, port, lambda seen: newcomer in seen) <= {newcomer, survivor}


class _HeldUpstream(BaseHTTPRequestHandler):
    """Answers 200 only once the test releases it."""

    arrived: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        self.arrived.set()
        self.release.wait(30)
        body = b'["held"]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving_upstream(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a free loopback port, in threads of its own; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def held_upstream() -> Iterator[type[_HeldUpstream]]:
    handler = type("Held", (_HeldUpstream,), {"arrived": threading.Event(),
                                              "release": threading.Event()})
    with serving_upstream(handler) as url:
        handler.url = url  # type: ignore[attr-defined]
        try:
            yield handler
        finally:
            handler.release.set()


def test_sigterm_drains_every_worker_and_the_parent_exits_0(
    supervised: Callable[..., Twistd], held_upstream: Any
) -> None:
    """SIGTERM to the parent reaches the workers; an in-flight request still
    completes, and the parent exits 0 only after every worker has exited."""
    daemon = supervised(
        twistd_argv("--workers", "2"),
        child_environ(PORT=LOOPBACK_ANY_PORT, STORAGE_SERVICE_URL=held_upstream.url,
                      SHUTDOWN_GRACE="20", RETRIES="0"),
    )
    port, pids = serving(daemon, 2)
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        client.sendall(b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert held_upstream.arrived.wait(30), daemon.output()
        daemon.process.send_signal(signal.SIGTERM)
        # Both workers start draining; the held request is still in flight.
        daemon.wait_for(lambda events: {e["pid"] for e in events
                                        if e.get("event") == "drain_started"} == pids)
        assert daemon.process.poll() is None
        held_upstream.release.set()
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    finally:
        client.close()
    assert response.startswith(b"HTTP/1.1 200"), (response, daemon.output())
    assert response.endswith(b'["held"]')
    assert daemon.process.wait(timeout=STOP_DEADLINE) == 0, daemon.output()
    daemon.wait_for(lambda events: any(e.get("event") == "workers_stopped" for e in events))
    exited = {e["worker_pid"] for e in daemon.events() if e.get("event") == "worker_exited"}
    assert exited == pids
    assert all(gone(pid) for pid in pids)
    assert not any(e.get("event") == "worker_died" for e in daemon.events())


def test_rate_limits_per_worker_warning_without_redis(supervised: Callable[..., Twistd]) -> None:
    """With more than one worker and no REDIS_URL, start-up warns that budgets are per worker."""
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(PORT=LOOPBACK_ANY_PORT))
    warning = daemon.wait_for(lambda events: next(
        (e for e in events if e.get("event") == "rate_limits_per_worker"), None))
    assert warning["level"] == "warning" and warning["workers"] == 2
    assert "REDIS_URL" in warning["note"]


def test_no_rate_limit_warning_with_redis(supervised: Callable[..., Twistd]) -> None:
    """With REDIS_URL the budgets are shared, so nothing is warned (no Redis needs to run)."""
    daemon = supervised(
        twistd_argv("--workers", "2"),
        child_environ(PORT=LOOPBACK_ANY_PORT, REDIS_URL="redis://127.0.0.1:1"),
    )
    daemon.wait_for(lambda events: any(e.get("event") == "workers_starting" for e in events))
    assert not any(e.get("event") == "rate_limits_per_worker" for e in daemon.events())


def test_workers_spend_one_budget_through_redis(
    supervised: Callable[..., Twistd], redis_server: RedisServer
) -> None:
    """With REDIS_URL, two workers grant a client one budget between them.

    Each worker refusing (429) with only 6 grants in all means neither
    counted alone: budgets of their own would have granted 6 each. The
    limiter fails closed, so a worker whose Redis connection is not ready
    yet answers "Rate limit service unavailable" instead of granting
    outside the shared budget; those answers are left out.
    """
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(
        PORT=LOOPBACK_ANY_PORT, REDIS_URL=f"redis://127.0.0.1:{redis_server.port}",
        RATE_LIMIT_REQUESTS="6", RATE_LIMIT_WINDOW="600", RATE_LIMIT_FAIL_CLOSED="1",
        # Nothing listens here: a granted request is a 503, a refused one a 429.
        STORAGE_SERVICE_URL="http://127.0.0.1:1",
    ))
    port, pids = serving(daemon, 2)
    answers: list[tuple[int, int]] = []
    # Which worker accepts a connection is the kernel's choice; on a
    # loaded machine one may take a long run of them before the other.
    while {pid for status, pid in answers if status == 429} != pids:
        assert len(answers) < 1000, answers
        status, pid, body = answered_by(daemon, port, "/api/data/products")
        if b"Rate limit service unavailable" not in body:
            answers.append((status, pid))
    statuses = [status for status, _ in answers]
    assert statuses == [503] * 6 + [429] * (len(answers) - 6), daemon.output()


def test_sighup_reloads_the_config_file_in_every_worker(
    supervised: Callable[..., Twistd], tmp_path: Path
) -> None:
    """Workers start from --config; SIGHUP to the parent makes each of them re-read it."""
    config = tmp_path / "gw.toml"
    config.write_text('SERVICE_NAME = "before"\n')
    daemon = supervised(twistd_argv("--workers", "2", "--config", str(config)),
                        child_environ(PORT=LOOPBACK_ANY_PORT))
    port, pids = serving(daemon, 2)
    assert names_served(daemon, port, pids) == {"before"}

    config.write_text('SERVICE_NAME = "after"\n')
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda events: {e["pid"] for e in events
                                    if e.get("event") == "config_reloaded"} == pids)
    assert names_served(daemon, port, pids) == {"after"}
    assert daemon.process.poll() is None and listening_pids(daemon.events()) == pids


def test_a_sighup_storm_leaves_the_parent_and_its_workers_serving(
    supervised: Callable[..., Twistd], tmp_path: Path
) -> None:
    """50 SIGHUPs back to back: no process dies, no worker is replaced, the last
    config is what every worker serves."""
    config = tmp_path / "gw.toml"
    config.write_text('SERVICE_NAME = "before"\n')
    daemon = supervised(twistd_argv("--workers", "2", "--config", str(config)),
                        child_environ(PORT=LOOPBACK_ANY_PORT))
    port, pids = serving(daemon, 2)
    config.write_text('SERVICE_NAME = "after"\n')
    for _ in range(50):
        daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda events: {e["pid"] for e in events
                                    if e.get("event") == "config_reloaded"} == pids)
    assert names_served(daemon, port, pids) == {"after"}
    assert daemon.process.poll() is None and listening_pids(daemon.events()) == pids
    assert not [e for e in daemon.events() if e.get("event") == "worker_died"]


def names_served(daemon: Twistd, port: int, pids: set[int]) -> set[str]:
    """The service names /health gives, asked until every worker in ``pids`` answered."""
    names: dict[int, str] = {}
    deadline = time.monotonic() + START_DEADLINE
    while set(names) != pids:
        assert time.monotonic() < deadline, f"only {names} answered\n{daemon.output()}"
        status, pid, body = answered_by(daemon, port)
        assert status == 200
        names[pid] = json.loads(body)["service"]
    return set(names.values())


def test_workers_option_beats_variable_and_one_worker_means_no_supervisor(
    supervised: Callable[..., Twistd],
) -> None:
    """WORKERS=3 is overridden by --workers 1: the gateway serves in-process, unsupervised."""
    daemon = supervised(twistd_argv("--workers", "1"), child_environ(PORT=LOOPBACK_ANY_PORT, WORKERS="3"))
    daemon.wait_for(lambda events: any("GatewaySite starting on" in e.get("event", "")
                                       for e in events))
    assert not any(e.get("component") == "workers" for e in daemon.events())


@pytest.mark.parametrize("speedups", ["1", "0"])
def test_workers_serve_tls_on_an_ssl_port(
    supervised: Callable[..., Twistd], tmp_path: Path, speedups: str
) -> None:
    """With an ssl: PORT the parent binds plain TCP and every worker speaks TLS on it,
    with and without SPEEDUPS."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    port_spec = "ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem"
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(PORT=port_spec, SPEEDUPS=speedups))
    port, pids = serving(daemon, 2)
    assert all("(TLS)" in e["event"] for e in daemon.events()
               if e.get("pid") in pids and "starting on" in e.get("event", ""))
    assert serving_pids(daemon, port, lambda seen: len(seen) == 2, context=context) == pids
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = plain.recv(65536)
    assert not answer.startswith(b"HTTP/"), answer


def test_workers_share_a_socket_passed_by_systemd(supervised: Callable[..., Twistd]) -> None:
    """PORT=systemd:...: the parent adopts systemd's socket and hands it to every worker."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        fd = listener.fileno()
        wrapper = [sys.executable, "-c", SYSTEMD_EXEC, *twistd_argv("--workers", "2")]
        env = child_environ(PORT="systemd:domain=INET:index=0", DGW_FD=str(fd))
        daemon = supervised(wrapper, env, pass_fds=[fd])
    served_port, pids = serving(daemon, 2)
    assert served_port == port
    assert serving_pids(daemon, port, lambda seen: len(seen) == 2) == pids


def test_a_bad_workers_value_stops_startup() -> None:
    """--workers 0 is a configuration error that names the option."""
    result = subprocess.run(twistd_argv("--workers", "0"), env=child_environ(PORT=LOOPBACK_ANY_PORT),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--workers" in result.stdout + result.stderr


# ---------------------------------------------------------------------------
# The worker's endpoint


@pytest.mark.parametrize("speedups, per_wake_up", [("1", 1), ("0", 3)])
def test_adopted_port_accepts_one_connection_per_wake_up(speedups: str, per_wake_up: int) -> None:
    """With SPEEDUPS a worker's port takes one waiting connection each time it is
    woken, so workers sharing the socket take turns; without, Twisted's stock port
    takes the whole burst."""
    settings = load_settings({"PORT": LOOPBACK_ANY_PORT, "SPEEDUPS": speedups})
    built: list[Any] = []
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    factory.buildProtocol = lambda addr: built.append(addr) or protocol.Protocol()  # type: ignore[method-assign]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = listen_endpoint(reactor, settings, {LISTEN_FD_ENV: str(os.dup(listener.fileno()))})
        ports: list[Any] = []
        endpoint.listen(factory).addCallback(ports.append)
        (port,) = ports
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            assert (type(port) is tcp.Port) == (speedups == "0")
            port.doRead()
            assert len(built) == per_wake_up
        finally:
            for client in clients:
                client.close()
            port.stopListening()


def test_listen_endpoint_binds_port_outside_a_worker() -> None:
    """Without DELTAGW_LISTEN_FD the endpoint is PORT's own."""
    settings = load_settings({"PORT": LOOPBACK_ANY_PORT})
    endpoint = listen_endpoint(task.Clock(), settings, {})
    assert not isinstance(endpoint, InheritedPortEndpoint)


def test_listen_endpoint_adopts_the_inherited_socket_in_a_worker() -> None:
    """With DELTAGW_LISTEN_FD the endpoint adopts that descriptor (and closes it)."""
    settings = load_settings({"PORT": LOOPBACK_ANY_PORT})
    adopted: list[tuple[int, int, Any]] = []

    class Reactor:
        def adoptStreamPort(self, fd: int, family: int, factory: Any) -> str:
            adopted.append((fd, family, factory))
            return "port"

    with socket.create_server(("127.0.0.1", 0)) as listener:
        fd = os.dup(listener.fileno())
        endpoint = listen_endpoint(Reactor(), settings, {LISTEN_FD_ENV: str(fd)})
        results: list[Any] = []
        endpoint.listen("factory").addBoth(results.append)
    assert results == ["port"]
    assert adopted == [(fd, socket.AF_INET, "factory")]
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("speedups", ["1", "0"])
def test_a_worker_wraps_an_ssl_port_in_tls(speedups: str, tmp_path: Path) -> None:
    """A worker adopting the socket of an ssl: PORT puts the site behind TLS, in both modes."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    description = f"ssl:0:privateKey={tmp_path / 'both.pem'}"
    settings = load_settings({"PORT": description, "SPEEDUPS": speedups})
    adopted: list[Any] = []

    class Reactor:
        def adoptStreamPort(self, fd: int, family: int, factory: Any) -> str:
            adopted.append(factory)
            return "port"

    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = listen_endpoint(Reactor(), settings, {LISTEN_FD_ENV: str(os.dup(listener.fileno()))})
        results: list[Any] = []
        endpoint.listen("site").addBoth(results.append)
    assert results == ["port"]
    (factory,) = adopted
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.wrappedFactory == "site"


def test_a_worker_refuses_plaintext_on_an_ssl_port() -> None:
    """Were an ssl: endpoint to ask for a plain listen, the worker refuses rather than serve plaintext."""
    adopting = _AdoptingReactor(object(), -1, take_turns=False)
    adopting.tls = True
    with pytest.raises(ConfigError, match="without TLS"):
        adopting.listenTCP(0, protocol.Factory())


def test_worker_environment_hands_options_down_as_variables() -> None:
    """Options become variables; systemd's variables stay with the parent; WORKERS=1."""
    environ = {"PORT": "8000", "LISTEN_FDS": "1", "NOTIFY_SOCKET": "@x", "WORKERS": "4",
               "SERVICE_NAME": "from-env"}
    options = {"service-name": "from-option", "workers": "2", "port": None}
    env = worker_environment(environ, options, {}, "tcp:8000:interface=0.0.0.0", 1)
    assert env["SERVICE_NAME"] == "from-option"
    assert env["WORKERS"] == "1"
    assert env["PORT"] == "tcp:8000:interface=0.0.0.0"
    assert env[LISTEN_FD_ENV] == "3" and env["DELTAGW_WORKER"] == "1"
    assert "LISTEN_FDS" not in env and "NOTIFY_SOCKET" not in env
    # Not pinned: a worker's --config file may set the upstream URLs.
    assert "STORAGE_SERVICE_URL" not in env


def test_pinned_settings_beat_the_environment() -> None:
    """--demo's backend URLs reach the workers whatever the environment says."""
    env = worker_environment({"STORAGE_SERVICE_URL": "http://elsewhere:1"}, {},
                             {"storage_url": "http://127.0.0.1:4321"}, "tcp:8000", 0)
    assert env["STORAGE_SERVICE_URL"] == "http://127.0.0.1:4321"


# ---------------------------------------------------------------------------
# The supervisor against a fake reactor


class _FakePort:
    def __init__(self) -> None:
        self.socket = socket.socket()
        self.reading = True
        self.closed = False

    def stopReading(self) -> None:
        self.reading = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 8000)

    def stopListening(self) -> None:
        self.closed = True
        self.socket.close()


class _FakeProcess:
    def __init__(self, pid: int, proto: Any) -> None:
        self.pid = pid
        self.proto = proto
        self.signals: list[str | int] = []
        self.args: list[str] = []
        self.env: dict[str, str] = {}
        self.alive = True

    def signalProcess(self, name: str | int) -> None:
        if not self.alive:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code: int | None = 0, sig: int | None = None) -> None:
        self.alive = False
        reason = error.ProcessDone(0) if code == 0 else error.ProcessTerminated(code, sig)
        self.proto.processEnded(Failure(reason))


class _FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: list[_FakeProcess] = []
        self.ports: list[_FakePort] = []
        self.running = True

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _FakePort:
        self.ports.append(_FakePort())
        return self.ports[-1]

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None, **kwargs: Any) -> _FakeProcess:
        process = _FakeProcess(1000 + len(self.processes), proto)
        process.args = args
        process.env = env
        assert childFDs[3] == self.ports[-1].fileno()
        self.processes.append(process)
        return process


def _supervisor(reactor: _FakeReactor, **env: str) -> WorkerSupervisor:
    settings = load_settings({"PORT": "tcp:8000", "WORKERS": "2", "SHUTDOWN_GRACE": "10", **env})
    supervisor = WorkerSupervisor(settings, reactor, {}, {}, command=["worker"],
                                  min_backoff=0.5, max_backoff=4.0, stable_after=10.0)
    supervisor.privilegedStartService()
    supervisor.startService()
    return supervisor


def test_the_parent_binds_once_and_never_accepts() -> None:
    """One bound socket, not read by the parent, handed to every worker."""
    reactor = _FakeReactor()
    supervisor = _supervisor(reactor)
    assert len(reactor.ports) == 1 and not reactor.ports[0].reading
    assert len(reactor.processes) == 2
    for p in reactor.processes:
        p.end()
    supervisor.stopService()
    assert reactor.ports[0].closed


def test_restart_backoff_doubles_while_workers_die_young_and_resets() -> None:
    """0.5, 1, 2, 4, 4 s for a crash loop; a worker that ran 10 s resets it to 0.5 s."""
    reactor = _FakeReactor()
    _supervisor(reactor)
    delays = []
    for _ in range(5):
        before = len(reactor.processes)
        reactor.processes[0 if before == 2 else -1].end(1)
        waited = 0.0
        while len(reactor.processes) == before:
            reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    reactor.advance(10.0)
    before = len(reactor.processes)
    reactor.processes[-1].end(None, signal.SIGKILL)
    reactor.advance(0.25)
    assert len(reactor.processes) == before
    reactor.advance(0.25)
    assert len(reactor.processes) == before + 1


def test_workers_read_the_config_file_and_reload_it_on_sighup(tmp_path: Path) -> None:
    """Each worker gets --config with the file's absolute path; a reload HUPs each running worker."""
    before = signal.getsignal(signal.SIGHUP)
    reactor = _FakeReactor()
    settings = load_settings({"PORT": "tcp:8000", "WORKERS": "2"})
    config = tmp_path / "gw.toml"
    supervisor = WorkerSupervisor(settings, reactor, {}, {"config": str(config)},
                                  command=["worker"])
    supervisor.privilegedStartService()
    supervisor.startService()
    try:
        first, second = reactor.processes
        assert first.args == second.args == ["worker", f"--config={config}"]
        second.end(1)  # not running: nothing to signal
        supervisor.reload_workers()
        assert first.signals == ["HUP"] and second.signals == []
    finally:
        supervisor.stopService()
        for process in reactor.processes:
            if process.alive:
                process.end()
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_purge_signals_every_running_worker() -> None:
    """SIGUSR2 to the parent is handed on to each running worker, and given back at stop."""
    before = signal.getsignal(PURGE_SIGNAL)
    reactor = _FakeReactor()
    supervisor = _supervisor(reactor)
    try:
        first, second = reactor.processes
        assert first.env["DELTAGW_SUPERVISOR_PID"] == str(os.getpid())
        second.end(1)  # not running: nothing to signal
        supervisor.purge_workers()
        assert first.signals == [PURGE_SIGNAL] and second.signals == []
        assert signal.getsignal(PURGE_SIGNAL) is not before
    finally:
        supervisor.stopService()
        for process in reactor.processes:
            if process.alive:
                process.end()
    assert signal.getsignal(PURGE_SIGNAL) is before


def test_stop_terminates_workers_and_waits_for_them() -> None:
    """stopService cancels restarts, SIGTERMs the workers and fires once all exited."""
    reactor = _FakeReactor()
    supervisor = _supervisor(reactor)
    first, second = reactor.processes
    first.end(1)  # a restart is now pending
    stopped = supervisor.stopService()
    assert second.signals == ["TERM"] and not stopped.called
    reactor.advance(5.0)
    assert len(reactor.processes) == 2  # the pending restart was cancelled
    second.end(0)
    assert stopped.called


def test_stop_kills_a_worker_that_outlives_the_grace() -> None:
    """A worker still running SHUTDOWN_GRACE + margin after SIGTERM gets SIGKILL."""
    reactor = _FakeReactor()
    supervisor = _supervisor(reactor, SHUTDOWN_GRACE="2")
    first, second = reactor.processes
    stopped = supervisor.stopService()
    first.end(0)
    reactor.advance(6.9)
    assert second.signals == ["TERM"]
    reactor.advance(0.2)
    assert second.signals == ["TERM", "KILL"] and not stopped.called
    second.end(None, signal.SIGKILL)
    assert stopped.called


class _CacheableUpstream(BaseHTTPRequestHandler):
    """Answers every GET with a body any shared cache may keep for ten minutes."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'["NIFTY"]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def cacheable_upstream() -> Iterator[str]:
    with serving_upstream(_CacheableUpstream) as url:
        yield url


def cache_results(daemon: Twistd, path: str) -> dict[int, list[str]]:
    """Each worker's access-log ``cache`` results for ``path``, in order."""
    results: dict[int, list[str]] = {}
    for e in daemon.events():
        if e.get("event") == "outgoing_response" and e.get("path") == path:
            results.setdefault(e["pid"], []).append(e["cache"])
    return results


def stored_in_every_worker(daemon: Twistd, port: int, pids: set[int], path: str) -> None:
    """Ask on fresh connections until every worker has answered ``path`` from its cache."""
    deadline = time.monotonic() + START_DEADLINE
    while not all("hit" in cache_results(daemon, path).get(pid, []) for pid in pids):
        assert time.monotonic() < deadline, f"{cache_results(daemon, path)}\n{daemon.output()}"
        assert answered_by(daemon, port, path)[0] == 200


def purges_by_signal(daemon: Twistd) -> dict[int, int]:
    """How many answers each worker forgot on SIGUSR2, by pid (the last purge of each)."""
    return {e["pid"]: e["purged"] for e in daemon.events()
            if e.get("event") == "cache_purged" and e.get("signal") == "SIGUSR2"}


@pytest.mark.parametrize("how", ["http", "signal"])
def test_a_purge_reaches_every_worker(supervised: Callable[..., Twistd], cacheable_upstream: str,
                                      how: str) -> None:
    """Each worker has its own cache. DELETE /admin/cache, taken by one worker, or SIGUSR2 to the
    parent: every worker forgets what it held, and answers the next request from upstream."""
    # No rate limit: connections reach the workers unevenly, and each has its own budget.
    daemon = supervised(twistd_argv("--workers", "2"), child_environ(
        PORT=LOOPBACK_ANY_PORT, STORAGE_SERVICE_URL=cacheable_upstream, RATE_LIMIT_REQUESTS="0"))
    port, pids = serving(daemon, 2)
    path = "/api/data/products"
    stored_in_every_worker(daemon, port, pids, path)
    if how == "http":
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("DELETE", "/admin/cache")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"purged": 1})
        conn.close()
    else:
        daemon.process.send_signal(signal.SIGUSR2)
    purged = daemon.wait_for(lambda events: (lambda p: set(p) == pids and p)(
        purges_by_signal(daemon)))
    # Over HTTP the worker that took the request had already forgotten its answer.
    assert sorted(purged.values()) == ([0, 1] if how == "http" else [1, 1])
    before = {pid: len(results) for pid, results in cache_results(daemon, path).items()}
    serving_pids(daemon, port, lambda seen: seen == pids, path=path)
    after = cache_results(daemon, path)
    assert {pid: after[pid][before[pid]] for pid in pids} == {pid: "miss" for pid in pids}
    assert daemon.process.poll() is None and listening_pids(daemon.events()) == pids
