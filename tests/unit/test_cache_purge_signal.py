"""SIGUSR2 empties a process's cache; a worker asks its parent to reach every worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from deltagw.process.cache_purge import (
    PURGE_SIGNAL,
    SUPERVISOR_PID_ENV,
    PurgeOnSignal,
    ignore_purges_until_started,
    purge_every_worker,
)


class _ThreadCalls:
    """A reactor that runs what a signal handler hands it only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.calls.append(f)


class PurgeOnSignalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.before = signal.getsignal(PURGE_SIGNAL)
        self.addCleanup(signal.signal, PURGE_SIGNAL, self.before)

    def test_a_signal_purges_on_the_reactor_while_the_service_runs(self) -> None:
        """The handler only hands the purge to the reactor; stopping gives the signal back."""
        reactor = _ThreadCalls()
        forgotten: list[int] = []
        service = PurgeOnSignal(reactor, lambda: forgotten.append(1) or 3)
        service.startService()
        os.kill(os.getpid(), PURGE_SIGNAL)
        self.assertEqual((len(reactor.calls), forgotten), (1, []))
        reactor.calls[0]()
        self.assertEqual(forgotten, [1])
        service.stopService()
        self.assertEqual(signal.getsignal(PURGE_SIGNAL), self.before)

    def test_until_started_the_signal_is_ignored_not_fatal(self) -> None:
        """A purge that reaches a worker still starting is dropped: it holds nothing yet."""
        ignore_purges_until_started()
        self.assertEqual(signal.getsignal(PURGE_SIGNAL), signal.SIG_IGN)
        os.kill(os.getpid(), PURGE_SIGNAL)


class PurgeEveryWorkerTests(SynchronousTestCase):
    def test_outside_a_worker_there_is_no_one_to_ask(self) -> None:
        self.assertIsNone(purge_every_worker({}))

    def test_a_worker_whose_parent_is_gone_signals_no_one(self) -> None:
        """The recorded supervisor is not our parent (we were re-parented): nothing is sent."""
        sent: list[int] = []
        self.patch(os, "kill", lambda pid, signum: sent.append(pid))
        ask = purge_every_worker({SUPERVISOR_PID_ENV: str(os.getppid() + 1)})
        assert ask is not None
        ask()
        self.assertEqual(sent, [])

    def test_a_worker_asks_its_parent(self) -> None:
        sent: list[tuple[int, int]] = []
        self.patch(os, "kill", lambda pid, signum: sent.append((pid, signum)))
        ask = purge_every_worker({SUPERVISOR_PID_ENV: str(os.getppid())})
        assert ask is not None
        ask()
        self.assertEqual(sent, [(os.getppid(), PURGE_SIGNAL)])
