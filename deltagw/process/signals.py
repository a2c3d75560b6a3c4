"""Taking a signal over from twistd's reactor, and handing it back.

twistd's own SIGTERM handler (``ReactorBase.sigTerm``) stops the reactor and
records the signal, which twistd re-raises once the reactor has stopped: the
process then dies by signal 15 (exit status 143) however cleanly it drained.
A service that drains on SIGTERM replaces that handler with one that only
stops the reactor, and gives it back once the drain is over, so that a
second SIGTERM during the drain changes nothing.

A handler runs in signal-handler context, where only
``reactor.callFromThread`` is safe: the work itself runs on the reactor.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any


class SignalHandler:
    """Runs ``on_signal`` on the reactor thread for each ``signum`` received.

    Args:
        reactor: Where ``on_signal`` runs (``callFromThread``).
        signum: The signal, e.g. ``signal.SIGHUP``.
        on_signal: Called with no argument, on the reactor thread.
    """

    def __init__(self, reactor: Any, signum: int, on_signal: Callable[[], None]) -> None:
        self._reactor = reactor
        self._signum = signum
        self._on_signal = on_signal
        self._previous: Any = None

    def install(self) -> None:
        """Handle the signal from now on, remembering the handler it replaces."""
        self._previous = signal.signal(self._signum, self._handle)

    def install_if_the_reactor_owns_it(self) -> None:
        """Take the signal over only from the reactor's own handler (as under twistd).

        In tests, or when embedded, whoever owns the signal keeps it.
        """
        current = signal.getsignal(self._signum)
        if getattr(current, "__self__", None) is self._reactor:
            self.install()

    def restore(self) -> None:
        """Give the signal back to the handler it had before `install` (idempotent)."""
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._on_signal)
