"""After a turn that sent, the reactor polls for its next event before it sleeps.

The speedup is run explicitly here (SPEEDUPS=1, BUSY_POLL_US set), whatever
the environment of the test run says.
"""

from __future__ import annotations

import select
import socket
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from deltagw.config import ConfigError, load_settings
from deltagw.speedups import held_writes
from deltagw.speedups.busy_poll import BusyPoll
from tests.support import RunningGateway


class CountingClock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.step
        return self.now


@pytest.fixture
def epoll_reactor():
    """Something shaped like the epoll reactor: an epoll object as ``_poller``."""
    epoll = select.epoll()
    yield SimpleNamespace(_poller=epoll)
    epoll.close()


def test_poll_ends_at_the_first_ready_event(epoll_reactor) -> None:
    """With an event ready, the poll returns at its first look, long before its budget."""
    ours, peer = socket.socketpair()
    try:
        epoll_reactor._poller.register(ours.fileno(), select.EPOLLIN)
        peer.send(b"x")
        clock = CountingClock(step=1e-6)
        BusyPoll(epoll_reactor, 1000, clock=clock).poll()
        assert clock.reads == 1  # the deadline only: never looked at the time again
        # The event is still there for the reactor.
        assert epoll_reactor._poller.poll(0) == [(ours.fileno(), select.EPOLLIN)]
    finally:
        ours.close()
        peer.close()


def test_poll_gives_up_after_its_budget(epoll_reactor) -> None:
    """With nothing ready, the poll stops once the budget has passed."""
    clock = CountingClock(step=10e-6)
    BusyPoll(epoll_reactor, 50, clock=clock).poll()
    assert clock.reads == 1 + 5


def test_zero_sleeps_at_once(epoll_reactor) -> None:
    """A budget of 0 never looks at the clock or the descriptor."""
    clock = CountingClock(step=1e-6)
    BusyPoll(epoll_reactor, 0, clock=clock).poll()
    assert clock.reads == 0


def test_only_the_epoll_reactor_is_polled() -> None:
    """A reactor without an epoll descriptor (here a test clock) is left alone."""
    busy = BusyPoll(MemoryReactorClock(), 50)
    busy.startService()
    try:
        assert held_writes._before_sleeping is None
    finally:
        busy.stopService()


class _Port:
    _realPortNumber = 8000


class Replying(Protocol):
    """Answers a read with a write, or, when ``silent``, only queues work for after the sends."""

    silent = False

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def connectionMade(self) -> None:
        held_writes.adopt(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.silent:
            held_writes.after_sending(self.transport.reactor, self.calls.append, "work")
        else:
            self.transport.write(b"answer")


def test_turns_that_sent_poll_and_others_do_not(epoll_reactor) -> None:
    """Installed while the service runs; called after a turn's held sends, not after a turn without."""
    calls: list[str] = []
    busy = BusyPoll(epoll_reactor, 50)
    busy.poll = lambda: calls.append("poll")  # type: ignore[method-assign]
    holding = held_writes.HeldWrites()
    holding.startService()
    busy.startService()
    ours, peer = socket.socketpair()
    try:
        reactor = MemoryReactorClock()
        protocol = Replying(calls)
        transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), _Port(), 1, reactor)
        protocol.makeConnection(transport)
        peer.send(b"request")
        transport.doRead()
        reactor.advance(0)
        assert peer.recv(100) == b"answer" and calls == ["poll"]
        protocol.silent = True
        peer.send(b"request")
        transport.doRead()
        reactor.advance(0)
        assert calls == ["poll", "work"]
    finally:
        busy.stopService()
        holding.stopService()
        ours.close()
        peer.close()
    assert held_writes._before_sleeping is None


@pytest.mark.parametrize("value", ["-1", "1001", "fast"])
def test_bad_busy_poll_names_the_setting(value: str) -> None:
    """A BUSY_POLL_US that is not 0..1000 is an error that names it."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"BUSY_POLL_US": value})
    assert str(raised.value).startswith("BUSY_POLL_US")


def test_busy_poll_is_off_by_default() -> None:
    """BUSY_POLL_US is opt-in: by default the process sleeps as soon as it has nothing to do."""
    assert load_settings({}).busy_poll_us == 0
    assert load_settings({"BUSY_POLL_US": "50"}).busy_poll_us == 50


@pytest_twisted.ensureDeferred
async def test_the_gateway_polls_while_it_runs_and_reloads_the_budget() -> None:
    """The running gateway installs its poll on the real (epoll) reactor, reloads
    BUSY_POLL_US, and removes the poll when it stops."""
    gateway = RunningGateway({"BUSY_POLL_US": "30", "SPEEDUPS": "1"})
    await gateway.start()
    try:
        assert held_writes._before_sleeping == gateway.service.busy_poll.poll
        assert gateway.service.busy_poll.microseconds == 30
        response = await gateway.get("/health")
        assert response.code == 200
        gateway.service.apply_settings(load_settings({"BUSY_POLL_US": "0", "SPEEDUPS": "1"}))
        assert gateway.service.busy_poll.microseconds == 0
    finally:
        await gateway.stop()
    assert held_writes._before_sleeping is None
