"""``--workers N``: one parent binds the port once, N worker processes serve it.

One Twisted process serves on one core. To use more, the parent process
(`WorkerSupervisor`) binds the listening socket described by PORT exactly once
and starts N ordinary ``twistd deltagw`` processes that inherit it as file
descriptor 3 (``DELTAGW_LISTEN_FD=3``) and adopt it with
``reactor.adoptStreamPort`` (`listen_endpoint`); the kernel hands each new
connection to whichever worker accepts it first.

Why pass the socket down rather than let every worker bind with SO_REUSEPORT:

- any PORT works the same way: ``tcp:``, ``tcp6:``, ``unix:``, ``ssl:`` and
  ``systemd:`` (a socket systemd bound and passed to the parent; workers
  could not re-read ``LISTEN_FDS``, which names the parent's pid);
- a privileged port is bound before twistd drops privileges (``--uid``),
  in ``privilegedStartService``, and workers never need the privilege;
- there is one socket, so no window where some workers listen and a
  restarted one is missing from the kernel's reuseport group, dropping the
  connections queued for it.

TLS (``ssl:`` PORT): the socket is plain TCP either way — TLS lives in the
protocol factory (``TLSMemoryBIOFactory``), not in the socket. The parent
binds plain TCP and never accepts; each worker re-reads the ``ssl:``
description (so each loads the certificate and key itself, from the same
working directory) and wraps its site in TLS around the adopted socket.

The parent stays small: it spawns the workers, restarts one that dies after
a backoff that grows while workers die young (a crash loop does not spin),
passes SIGTERM on so each worker drains (SHUTDOWN_GRACE), and exits 0 once
all have exited (SIGKILL for any still running SHUTDOWN_GRACE plus a margin
later). It sends systemd's READY=1/WATCHDOG=1/STOPPING=1 itself; workers do
not talk to systemd.

Workers write their JSON lines to the parent's stdout (inherited; batches of
whole lines under PIPE_BUF, so lines never interleave mid-line); each carries
``worker`` (the slot number, kept across restarts) and ``pid``, added by
`worker_log_observer`, which the parent puts on each worker's twistd command
line.

Per-process state stays per process: the in-process rate limiter
(RATE_LIMIT_* budgets apply per worker unless REDIS_URL shares them, which is
logged as a warning at start-up), MAX_IN_FLIGHT, circuit breakers and the
verification cache.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, error, fdesc, protocol
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from deltagw.config import SETTINGS, ConfigError, Settings
from deltagw.logs import JSONLinesObserver, add_to_every_line, get_logger, observer
from deltagw.process.cache_purge import PURGE_SIGNAL, SUPERVISOR_PID_ENV
from deltagw.process.signals import SignalHandler
from deltagw.process.systemd import SystemdNotifier
from deltagw.speedups import turn_taking

_log = get_logger(component="workers")

LISTEN_FD_ENV = "DELTAGW_LISTEN_FD"
"""Names the inherited listening socket's descriptor in a worker."""

WORKER_ENV = "DELTAGW_WORKER"
"""The worker's slot number (0..N-1), for its log lines."""

WORKER_FD = 3
"""Where a worker finds the listening socket (as systemd would put it)."""

STOP_MARGIN = 5.0
"""Seconds a worker gets beyond SHUTDOWN_GRACE to exit before SIGKILL."""

# The parent's, never a worker's: LISTEN_PID/WATCHDOG_PID name the parent, and
# systemd (NotifyAccess=main) ignores, with a warning, notifications from
# other pids.
_PARENT_ONLY_PREFIXES = ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_")


def worker_command(executable: str = sys.executable) -> list[str]:
    """The argv of a worker: this Python running ``twistd deltagw``.

    ``-P`` keeps the current directory off ``sys.path``, so the worker
    imports the same installed deltagw as the parent even when started from
    a source checkout. No deltagw options but ``--config`` (`WorkerSupervisor`
    adds it): the parent hands its options down as environment variables
    (`worker_environment`).
    """
    return [
        executable,
        "-P",
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        f"--logger={__name__}.worker_log_observer",
        "deltagw",
    ]


def worker_environment(
    environ: Mapping[str, str],
    options: Mapping[str, Any],
    pinned: Mapping[str, str],
    port_description: str,
    slot: int,
) -> dict[str, str]:
    """The environment a worker starts with.

    Options become their variables (option beats variable, so the worker
    sees exactly what the parent was given), ``pinned`` settings (by field
    name: ``--demo`` points the upstream URLs at its own backends) become
    theirs too, PORT describes the socket the worker adopts, and WORKERS=1
    keeps a worker from supervising workers of its own. A ``--config`` file
    is read by each worker itself, under the same variables, so that a
    reload can change what the file sets.
    """
    env = {k: v for k, v in environ.items() if not k.startswith(_PARENT_ONLY_PREFIXES)}
    for setting in SETTINGS:
        given = options.get(setting.option) if setting.option else None
        if given is not None:
            env[setting.env] = str(given)
        if setting.field in pinned:
            env[setting.env] = pinned[setting.field]
    env["PORT"] = port_description
    env["WORKERS"] = "1"
    env[LISTEN_FD_ENV] = str(WORKER_FD)
    env[WORKER_ENV] = str(slot)
    return env


# ---------------------------------------------------------------------------
# The worker's side: adopt the inherited socket


class _AdoptingReactor:
    """The reactor a worker's endpoint listens on: it adopts, never binds.

    The endpoint described by PORT calls one of the public listen methods
    (``IReactorTCP.listenTCP``, ``IReactorSSL.listenSSL``,
    ``IReactorUNIX.listenUNIX``); each adopts the inherited socket with
    ``reactor.adoptStreamPort`` instead. What sits on top of the socket is
    decided here, explicitly: ``listenSSL`` hands over the context factory
    and the site is wrapped in ``TLSMemoryBIOFactory``, as Twisted's own
    ``listenSSL`` does. An ``ssl:`` PORT that asks for anything else is
    refused (a worker must never serve plaintext on a port meant for TLS),
    and nothing else of the real reactor is reachable from the endpoint.

    Args:
        reactor: The real reactor (``IReactorSocket``).
        fd: The inherited listening socket.
        take_turns: Whether the adopted port accepts one connection per
            wake-up (`deltagw.speedups.turn_taking`, SPEEDUPS).
    """

    tls = False
    """Whether PORT describes a TLS endpoint (set once it is parsed)."""

    def __init__(self, reactor: Any, fd: int, take_turns: bool) -> None:
        self._reactor = reactor
        self._fd = fd
        self._take_turns = take_turns
        self._used = False

    def _adopt(self, factory: Any, tls: bool = False) -> IListeningPort:
        if self.tls and not tls:
            raise ConfigError("PORT: an ssl: endpoint asked to listen without TLS; refused")
        if self._used:
            raise error.AlreadyListened()
        self._used = True
        with socket.socket(fileno=os.dup(self._fd)) as probe:
            family = probe.family
        fdesc.setNonBlocking(self._fd)
        port = self._reactor.adoptStreamPort(self._fd, family, factory)
        if self._take_turns:
            turn_taking.take_turns(port)
        os.close(self._fd)  # the port holds its own duplicate
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._adopt(factory)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory), tls=True)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        return self._adopt(factory)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        return self._adopt(factory)


@implementer(IStreamServerEndpoint)
class InheritedPortEndpoint:
    """Listens by adopting a socket the supervising parent bound.

    Args:
        reactor: An ``IReactorSocket``.
        fd: The inherited listening socket (its family is read from it).
        description: The PORT endpoint description; it decides the
            protocol on top (``ssl:`` means TLS), not the socket.
        take_turns: Accept one connection per wake-up (SPEEDUPS).
    """

    def __init__(
        self, reactor: Any, fd: int, description: str, take_turns: bool = False
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._description = description
        self._take_turns = take_turns

    def listen(self, protocolFactory: Any) -> defer.Deferred[IListeningPort]:
        try:
            adopting = _AdoptingReactor(self._reactor, self._fd, self._take_turns)
            endpoint = serverFromString(adopting, self._description)
            adopting.tls = _is_tls(endpoint)
        except Exception:
            return defer.fail()
        return endpoint.listen(protocolFactory)


def _is_tls(endpoint: IStreamServerEndpoint) -> bool:
    """Whether an endpoint parsed from PORT serves TLS (``ssl:``)."""
    return isinstance(endpoint, SSL4ServerEndpoint)


def listen_endpoint(
    reactor: Any, settings: Settings, environ: Mapping[str, str] = os.environ
) -> IStreamServerEndpoint:
    """Where the gateway listens: PORT, or in a worker the parent's socket.

    Args:
        reactor: The reactor to listen on.
        settings: The validated settings (``settings.port``).
        environ: Where ``DELTAGW_LISTEN_FD`` is looked for.

    Raises:
        ConfigError: DELTAGW_LISTEN_FD is set but is not a descriptor number.
    """
    inherited = environ.get(LISTEN_FD_ENV)
    if not inherited:
        return serverFromString(reactor, settings.port)
    try:
        fd = int(inherited)
    except ValueError:
        raise ConfigError(f"{LISTEN_FD_ENV}={inherited!r}: expected a file descriptor number") from None
    return InheritedPortEndpoint(reactor, fd, settings.port, take_turns=settings.speedups)


def worker_log_observer() -> JSONLinesObserver:
    """The log observer of a worker (``twistd --logger=...``).

    The gateway's JSON lines, each with ``worker`` (slot number) and ``pid``
    added, so lines from N processes on one stdout can be told apart.
    """
    # Added as each line is rendered: re-parsing every line to tag it cost
    # a worker two JSON round trips per request.
    add_to_every_line({"worker": int(os.environ.get(WORKER_ENV, "0")), "pid": os.getpid()})
    return observer()


# ---------------------------------------------------------------------------
# The parent's side: bind once, supervise


class _Unserved(protocol.Factory):
    """The parent's factory for the shared socket; the parent never accepts."""

    def logPrefix(self) -> str:
        return "WorkerSupervisor"


class _BindingReactor:
    """A reactor for ``serverFromString`` that binds plain sockets only.

    Records what the endpoint asked for: ``listenSSL`` binds plain TCP
    (workers add TLS themselves), and an endpoint that listens some other
    way cannot be shared with workers.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.listened = False
        self.tls = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        self.listened = True
        return self._reactor.listenTCP(port, factory, backlog, interface)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        self.tls = True
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        self.listened = True
        return self._reactor.listenUNIX(address, factory, backlog, mode, wantPID)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        self.listened = True
        return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _describe(port: Any) -> str:
    """An endpoint description of a bound socket, for a worker's PORT."""
    host = port.getHost()
    family = port.socket.family
    if family == socket.AF_UNIX:
        return f"unix:{_escape(host.name.decode() if isinstance(host.name, bytes) else host.name)}"
    kind = "tcp6" if family == socket.AF_INET6 else "tcp"
    return f"{kind}:{host.port}:interface={_escape(host.host)}"


@dataclass
class _Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    short_lives: int = 0
    restart: Any = None


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, slot: _Slot) -> None:
        self._supervisor = supervisor
        self._slot = slot

    def processEnded(self, reason: Failure) -> None:
        self._supervisor._exited(self._slot, reason)


class WorkerSupervisor(MultiService):
    """Binds PORT once and keeps ``settings.workers`` worker processes serving it.

    Args:
        settings: The validated settings (port, workers, redis_url,
            shutdown_grace).
        reactor: Binds, spawns (``IReactorProcess``) and times backoffs.
        environ: The parent's environment; workers inherit it (see
            `worker_environment`).
        options: The twistd options given to the parent, by option name.
            With ``config``, each worker reads that file and re-reads it
            when the parent gets SIGHUP.
        pinned: Settings, by field name, that workers must take from the
            parent whatever their file says (``--demo``'s backend URLs).
        command: The worker argv (tests may substitute their own).
        min_backoff: Seconds before restarting a worker that died.
        max_backoff: The most a restart is ever delayed.
        stable_after: A worker that ran this long resets the backoff; each
            worker that dies younger doubles it.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        environ: Mapping[str, str] = os.environ,
        options: Mapping[str, Any] | None = None,
        *,
        pinned: Mapping[str, str] | None = None,
        command: list[str] | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        stable_after: float = 10.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self._environ = dict(environ)
        self._options = dict(options or {})
        self._pinned = dict(pinned or {})
        self._command = command or worker_command()
        config = self._options.get("config")
        self._config_file = os.path.abspath(config) if config else None
        if self._config_file:
            self._command = [*self._command, f"--config={self._config_file}"]
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.port: Any = None
        self._port_description = settings.port
        self._stopping: defer.Deferred[None] | None = None
        # As DrainService does for a single process: a supervisor whose
        # workers all drained exits 0, not 143.
        self._sigterm = SignalHandler(reactor, signal.SIGTERM, self._stop_reactor)
        self._sighup = SignalHandler(reactor, signal.SIGHUP, self.reload_workers)
        self._purge = SignalHandler(reactor, PURGE_SIGNAL, self.purge_workers)
        self._stop_requested = False
        self._none_running: list[defer.Deferred[None]] = []
        self.notifier = SystemdNotifier(reactor, environ, ready=self._bound)
        self.notifier.setServiceParent(self)

    # -- start ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind PORT now, before twistd drops privileges (``--uid``)."""
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.port is not None:
            return
        binding = _BindingReactor(self._reactor)
        endpoint = serverFromString(binding, self.settings.port)
        result: list[Any] = []
        endpoint.listen(_Unserved()).addBoth(result.append)
        if not result:
            raise ConfigError(f"PORT={self.settings.port!r}: the endpoint did not listen at once")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        port = result[0]
        if not binding.listened or not hasattr(port, "socket"):
            port.stopListening()
            raise ConfigError(
                f"PORT={self.settings.port!r}: this endpoint cannot be shared with workers"
            )
        # The parent keeps the socket open (a restarted worker inherits it)
        # but never accepts on it.
        port.stopReading()
        self.port = port
        # A worker can re-read the description only if it binds nothing
        # systemd-specific; TLS needs the original (certificate paths), and
        # an ssl: PORT keeps it whatever the endpoint called.
        tls = binding.tls or _is_tls(endpoint)
        self._port_description = self.settings.port if tls else _describe(port)

    def _bound(self) -> defer.Deferred[Any]:
        return defer.succeed(self.port)

    def startService(self) -> None:
        self._bind()
        super().startService()
        if not self.settings.redis_url:
            _log.msg(
                "rate_limits_per_worker",
                level="warning",
                workers=self.settings.workers,
                rate_limit_requests=self.settings.rate_limit_requests,
                rate_limit_window=self.settings.rate_limit_window,
                note="without REDIS_URL each worker process keeps its own "
                "RATE_LIMIT_* budgets; set REDIS_URL to share them",
            )
        # twistd starts services before reactor.run(); the reactor installs
        # its SIGTERM and SIGCHLD handlers while starting up: wait for that.
        self._reactor.callWhenRunning(self._start_workers)

    def _start_workers(self) -> None:
        if not self.running:
            return
        self._sigterm.install_if_the_reactor_owns_it()
        self._purge.install()
        if self._config_file:
            self._sighup.install()
        _log.msg("workers_starting", workers=self.settings.workers, port=self._port_description)
        for slot in self.slots:
            self._spawn(slot)

    def reload_workers(self) -> None:
        """Have every worker re-read the config file (each one's SIGHUP)."""
        running = self._running()
        _log.msg("reload_requested", config=self._config_file,
                 worker_pids=[slot.pid for slot in running])
        for slot in running:
            self._signal(slot, "HUP")

    def purge_workers(self) -> None:
        """Have every worker forget its cache (each one's SIGUSR2)."""
        running = self._running()
        _log.msg("cache_purge_requested", worker_pids=[slot.pid for slot in running])
        for slot in running:
            self._signal(slot, PURGE_SIGNAL)

    def _stop_reactor(self) -> None:
        if self._stop_requested:
            return  # a second SIGTERM while the workers drain changes nothing
        self._stop_requested = True
        _log.msg("shutdown_requested", signal="SIGTERM")
        self._reactor.stop()

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        env = worker_environment(
            self._environ, self._options, self._pinned, self._port_description, slot.index
        )
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        slot.process = self._reactor.spawnProcess(
            _WorkerProtocol(self, slot),
            self._command[0],
            self._command,
            env=env,
            childFDs={0: 0, 1: 1, 2: 2, WORKER_FD: self.port.fileno()},
        )
        slot.pid = slot.process.pid
        slot.started = self._reactor.seconds()
        _log.msg("worker_started", worker=slot.index, worker_pid=slot.pid)

    # -- a worker ends ---------------------------------------------------

    def _exited(self, slot: _Slot, reason: Failure) -> None:
        ran = self._reactor.seconds() - slot.started
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        pid, slot.process, slot.pid = slot.pid, None, None
        if self._stopping is not None or not self.running:
            _log.msg("worker_exited", worker=slot.index, worker_pid=pid, exit_code=status,
                     signal=sig, ran_s=round(ran, 3))
        else:
            slot.short_lives = slot.short_lives + 1 if ran < self._stable_after else 0
            delay = min(self._max_backoff, self._min_backoff * 2 ** max(slot.short_lives - 1, 0))
            _log.msg("worker_died", level="warning", worker=slot.index, worker_pid=pid,
                     exit_code=status, signal=sig, ran_s=round(ran, 3), restart_in_s=delay)
            slot.restart = self._reactor.callLater(delay, self._spawn, slot)
        if not self._running():
            waiting, self._none_running = self._none_running, []
            for d in waiting:
                if not d.called:  # it may have been cancelled by a timeout
                    d.callback(None)

    # -- stop ------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """SIGTERM every worker; fires once all have exited (idempotent)."""
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    def _running(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.process is not None]

    def _all_exited(self) -> defer.Deferred[None]:
        """Fires once no worker process is running."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._running():
            self._none_running.append(d)
        else:
            d.callback(None)
        return d

    async def _stop(self) -> None:
        try:
            await self._stop_workers()
        finally:
            # Only now: a SIGTERM while the workers drain must not reach the
            # reactor's handler, which would make the exit status 143.
            self._sigterm.restore()
            self._sighup.restore()
            self._purge.restore()

    async def _stop_workers(self) -> None:
        await super().stopService()  # the notifier: STOPPING=1
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        if self.port is not None:
            # Close our copy: once the workers close theirs (their drain
            # starts by closing the port) the socket stops accepting.
            await defer.maybeDeferred(self.port.stopListening)
        running = self._running()
        _log.msg("workers_stopping", worker_pids=[s.pid for s in running])
        exited = self._all_exited()
        for slot in running:
            self._signal(slot, "TERM")
        limit = self.settings.shutdown_grace + STOP_MARGIN
        try:
            await exited.addTimeout(limit, self._reactor)
        except defer.TimeoutError:
            stragglers = self._running()
            _log.msg("workers_killed", level="warning", worker_pids=[s.pid for s in stragglers],
                     after_s=limit)
            exited = self._all_exited()
            for slot in stragglers:
                self._signal(slot, "KILL")
            await exited
        _log.msg("workers_stopped")

    def _signal(self, slot: _Slot, name: str | int) -> None:
        # Twisted names only HUP, STOP, INT, KILL and TERM; others go by number.
        try:
            slot.process.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


__all__ = [
    "InheritedPortEndpoint",
    "WorkerSupervisor",
    "listen_endpoint",
    "worker_command",
    "worker_environment",
    "worker_log_observer",
]
