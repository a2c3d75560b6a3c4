"""Tell systemd how the gateway is doing (``sd_notify``), standard library only.

Under ``Type=notify`` systemd considers the unit started only when the
process sends ``READY=1``: ordering (``After=deltagw.service``) and
``systemctl start`` then wait until the port really accepts connections,
not merely until ``exec`` succeeded. Under ``WatchdogSec=`` systemd kills
and restarts a process that stops sending ``WATCHDOG=1``; sending it from a
reactor timer proves the event loop itself still turns, which is exactly
what a wedged Twisted process fails to do.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (see ``sd_notify(3)``); it is
small enough that depending on ``libsystemd`` or a wrapper is not worth it.
Outside systemd (a terminal, a container) ``$NOTIFY_SOCKET`` is unset and
every call here is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from deltagw.logs import get_logger

_log = get_logger(component="systemd")


def _address(name: str) -> str | None:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value, or None.

    A leading ``@`` names a socket in Linux's abstract namespace, spelled
    with a leading NUL byte at the socket level (``sd_notify(3)``). Other
    forms systemd may one day use (``vsock:...``) are not ours to guess at.
    """
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None


def notify(message: bytes, environ: Mapping[str, str] = os.environ) -> bool:
    """Send one ``sd_notify`` message, e.g. ``b"READY=1"``.

    The socket is non-blocking: if systemd is so far behind that its queue
    is full, losing one message is better than freezing the reactor that
    serves every client.

    Args:
        message: Newline-separated ``KEY=VALUE`` assignments.
        environ: Where to find ``NOTIFY_SOCKET`` (tests pass their own).

    Returns:
        True if the message was sent; False if there is no (usable)
        ``NOTIFY_SOCKET``, i.e. we are not running under ``Type=notify``.

    Raises:
        OSError: The socket is named but sending to it failed.
    """
    name = environ.get("NOTIFY_SOCKET", "")
    address = _address(name)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        sock.sendto(message, address)
    return True


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog applies.

    systemd sets ``WATCHDOG_USEC`` to the ``WatchdogSec=`` timeout and
    recommends pinging at half of it (``sd_watchdog_enabled(3)``). A
    ``WATCHDOG_PID`` naming another process means the variables were
    inherited from a parent and the watchdog is not ours to feed.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        _log.msg("ignoring_bad_watchdog_usec", value=usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def _observe(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A new Deferred with ``d``'s result, leaving ``d``'s own chain untouched.

    The readiness Deferred may belong to someone else (a listening service
    that later uses it to close the port): adding callbacks that replaced
    its result would break its owner.
    """
    copy: defer.Deferred[Any] = defer.Deferred()

    def forward(result: Any) -> Any:
        if not copy.called:  # ``copy`` may have been cancelled meanwhile.
            if isinstance(result, Failure):
                copy.errback(result)
            else:
                copy.callback(result)
        return result

    d.addBoth(forward)
    return copy


class SystemdNotifier(Service):
    """Reports readiness, liveness and stopping to systemd.

    Add it to the service tree *after* the listening service: its
    ``startService`` then runs once the listener has been asked to listen,
    and ``MultiService`` stops it first, so ``STOPPING=1`` goes out before
    the port closes and requests drain.

    ``MAINPID=`` is deliberately not sent: under ``--nodaemon`` the process
    systemd started is the one that serves, so systemd already knows it.

    Args:
        reactor: Schedules the watchdog pings (an ``IReactorTime``).
        environ: Where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` are read from.
        ready: Called on start; returns a Deferred that fires once the
            gateway accepts connections. None means ready on start.
    """

    def __init__(
        self,
        reactor: Any,
        environ: Mapping[str, str] = os.environ,
        ready: Callable[[], defer.Deferred[Any]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._environ = environ
        self._ready = ready
        self._waiting: defer.Deferred[Any] | None = None
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        waiting = _observe(self._ready()) if self._ready else defer.succeed(None)
        self._waiting = waiting
        waiting.addCallbacks(self._became_ready, self._never_ready)

    def _became_ready(self, _: Any) -> None:
        self._waiting = None
        self._send(b"READY=1")
        interval = watchdog_interval(self._environ, os.getpid())
        if interval is not None:
            self._watchdog = LoopingCall(self._send, b"WATCHDOG=1")
            self._watchdog.clock = self._reactor
            # now=True: the first ping goes out with READY=1, when the
            # watchdog timer starts (systemd arms it on readiness).
            self._watchdog.start(interval, now=True)

    def _never_ready(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(defer.CancelledError):
            return  # Stopped before the port listened: nothing to report.
        # The listener reports its own failure; READY=1 is simply never
        # sent, so systemd fails the start at TimeoutStartSec instead of
        # routing traffic to a gateway that does not listen.
        _log.msg("not_ready", reason=failure.getErrorMessage())

    def _send(self, message: bytes) -> None:
        """Send, logging (never raising) a failure: a lost ping must not
        stop the watchdog loop or fail the service start or stop."""
        try:
            notify(message, self._environ)
        except OSError as e:
            _log.msg("sd_notify_failed", message=message.decode("ascii", "replace"), error=str(e))

    def stopService(self) -> None:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._watchdog is not None:
            if self._watchdog.running:
                self._watchdog.stop()
            self._watchdog = None
        self._send(b"STOPPING=1")
