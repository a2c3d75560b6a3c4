"""SIGUSR2: a gateway process forgets every answer its cache holds.

Each process has its own cache; with ``--workers N``, each worker has one.
An HTTP purge (``DELETE /admin/cache``) reaches the worker that takes the
connection, so that worker also asks its parent to pass SIGUSR2 on to every
worker. A signal carries no path: the workers forget everything, which is
more than was asked and never less, the one safe direction for a cache.

SIGUSR1 stays twistd's: it reopens the log file on it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service

from deltagw.logs import get_logger
from deltagw.process.signals import SignalHandler

PURGE_SIGNAL = signal.SIGUSR2

SUPERVISOR_PID_ENV = "DELTAGW_SUPERVISOR_PID"
"""Set in a worker's environment: the parent that passes purges on."""

_log = get_logger(component="cache")


def ignore_purges_until_started() -> None:
    """Until `PurgeOnSignal` starts, SIGUSR2 is ignored rather than fatal (its default).

    A worker's parent passes purges on to every worker it has spawned,
    one still starting included; that one holds nothing to forget yet.
    """
    signal.signal(PURGE_SIGNAL, signal.SIG_IGN)


class PurgeOnSignal(Service):
    """Forgets the cache's answers on SIGUSR2, for as long as the service runs.

    Args:
        reactor: Runs the purge on the reactor thread, not in the handler.
        forget: Empties the cache; returns how many answers it held.
    """

    def __init__(self, reactor: Any, forget: Callable[[], int]) -> None:
        self._forget = forget
        self._handler = SignalHandler(reactor, PURGE_SIGNAL, self.purge)

    def startService(self) -> None:
        super().startService()
        self._handler.install()

    def stopService(self) -> None:
        super().stopService()
        self._handler.restore()

    def purge(self) -> None:
        _log.msg("cache_purged", signal="SIGUSR2", purged=self._forget())


def purge_every_worker(environ: Mapping[str, str]) -> Callable[[], None] | None:
    """In a worker: a call that has the parent pass SIGUSR2 on to every worker.

    Returns:
        None outside a worker. The call does nothing once the parent is
        gone (the worker has then been re-parented, and its new parent is
        not to be signalled).
    """
    supervisor = environ.get(SUPERVISOR_PID_ENV)
    if supervisor is None:
        return None
    pid = int(supervisor)

    def ask_parent() -> None:
        if os.getppid() == pid:
            os.kill(pid, PURGE_SIGNAL)

    return ask_parent
