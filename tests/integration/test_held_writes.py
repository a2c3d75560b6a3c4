"""Writes made while a read is dispatched leave together once the poll's events are done.

These tests run the speedup explicitly (a `HeldWrites` service), whatever
SPEEDUPS says; the last ones check what is left of it without the service.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from deltagw.speedups import held_writes


@pytest.fixture(autouse=True)
def holding() -> Iterator[held_writes.HeldWrites]:
    """Hold writes while each test runs (a test of SPEEDUPS=0 stops it first)."""
    service = held_writes.HeldWrites()
    service.startService()
    yield service
    if service.running:
        service.stopService()


class CountingSocket:
    """A socket that records each send and can take only ``limit`` bytes at a time."""

    def __init__(self, sock: socket.socket, limit: int | None = None) -> None:
        self._sock = sock
        self.limit = limit
        self.sends: list[bytes] = []

    def send(self, data: Any) -> int:
        data = bytes(data)[: self.limit]
        self.sends.append(data)
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Port:
    """What tcp.Server reads from the port that accepted it (its number, for logs)."""

    _realPortNumber = 8000


class Answering(Protocol):
    """Answers each read with two writes (as twisted.web writes a head, then a body)."""

    close_after = False

    def connectionMade(self) -> None:
        held_writes.adopt(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"head:")
        self.transport.writeSequence([b"bo", b"dy"])
        if self.close_after:
            self.transport.loseConnection()


@pytest.fixture
def connection() -> Iterator[tuple[Any, socket.socket, MemoryReactorClock, Answering]]:
    yield from _connection()


def _connection() -> Iterator[tuple[Any, socket.socket, MemoryReactorClock, Answering]]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    reactor = MemoryReactorClock()
    protocol = Answering()
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), _Port(), 1, reactor)
    protocol.makeConnection(transport)
    transport.socket = CountingSocket(ours)
    try:
        yield transport, peer, reactor, protocol
    finally:
        ours.close()
        peer.close()


def _received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


def test_writes_during_a_read_leave_in_one_send_after_the_poll(connection) -> None:
    """Both writes are held during the read, then sent in one send, without asking for writability."""
    transport, peer, reactor, _ = connection
    peer.send(b"request")
    transport.doRead()
    assert _received(peer) == b"" and transport.socket.sends == []
    reactor.advance(0)
    assert transport.socket.sends == [b"head:body"]
    assert _received(peer) == b"head:body"
    assert transport not in reactor.getWriters()


def test_write_outside_a_read_takes_twisteds_path(connection) -> None:
    """A write from a timer or a producer is buffered and waits for writability, as in Twisted."""
    transport, peer, reactor, _ = connection
    transport.write(b"late")
    reactor.advance(0)
    assert transport.socket.sends == [] and transport in reactor.getWriters()
    transport.doWrite()
    assert _received(peer) == b"late"


def test_what_the_socket_does_not_take_waits_for_writability(connection) -> None:
    """A partial send leaves the rest in Twisted's buffer and registers for writability."""
    transport, peer, reactor, _ = connection
    transport.socket.limit = 3
    peer.send(b"request")
    transport.doRead()
    reactor.advance(0)
    assert transport.socket.sends == [b"hea"] and transport in reactor.getWriters()
    transport.socket.limit = None
    transport.doWrite()
    assert _received(peer) == b"head:body"
    assert transport not in reactor.getWriters()


def test_closing_connection_is_left_to_twisted(connection) -> None:
    """Writes followed by loseConnection in the same read are not held: Twisted sends, then closes."""
    transport, peer, reactor, protocol = connection
    protocol.close_after = True
    peer.send(b"request")
    transport.doRead()
    reactor.advance(0)
    assert transport.socket.sends == [] and transport in reactor.getWriters()
    transport.doWrite()
    assert _received(peer) == b"head:body"


def test_only_plain_tcp_transports_take_part() -> None:
    """adopt changes a plain TCP transport's class and leaves any other transport alone."""
    other = StringTransport()
    held_writes.adopt(other)
    assert type(other) is StringTransport
    ours, peer = socket.socketpair()
    try:
        transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), _Port(), 1,
                               MemoryReactorClock())
        held_writes.adopt(transport)
        assert isinstance(transport, tcp.Server) and type(transport) is not tcp.Server
    finally:
        ours.close()
        peer.close()


def test_a_failed_send_leaves_the_bytes_to_twisted(connection) -> None:
    """If sending one connection's held bytes raises, they wait for writability instead of being lost."""
    transport, peer, reactor, _ = connection

    def broken() -> None:
        raise RuntimeError("boom")

    transport.doWrite = broken
    peer.send(b"request")
    transport.doRead()
    reactor.advance(0)
    assert transport in reactor.getWriters()
    del transport.doWrite
    transport.doWrite()
    assert _received(peer) == b"head:body"


def test_work_after_sending_waits_for_the_held_bytes(connection) -> None:
    """Work queued during a read runs after the answer is sent, in the order queued."""
    transport, peer, reactor, protocol = connection
    done: list[object] = []
    answer = protocol.dataReceived

    def answer_then_queue(data: bytes) -> None:
        answer(data)
        held_writes.after_sending(reactor, lambda: done.append(("first", transport.socket.sends[:])))
        held_writes.after_sending(reactor, done.append, "second")

    protocol.dataReceived = answer_then_queue
    peer.send(b"request")
    transport.doRead()
    assert done == []
    reactor.advance(0)
    assert done == [("first", [b"head:body"]), "second"]


def test_work_outside_a_read_runs_at_once() -> None:
    """With nothing held (a timer, a test calling in), the work is not deferred."""
    done: list[str] = []
    held_writes.after_sending(MemoryReactorClock(), done.append, "now")
    assert done == ["now"]


def test_failing_work_does_not_stop_the_rest(connection) -> None:
    """One queued call raising is logged; the calls after it still run."""
    transport, peer, reactor, protocol = connection
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    def queue(data: bytes) -> None:
        held_writes.after_sending(reactor, broken)
        held_writes.after_sending(reactor, done.append, "after")

    protocol.dataReceived = queue
    peer.send(b"request")
    transport.doRead()
    reactor.advance(0)
    assert done == ["after"]


def test_work_from_outside_a_read_waits_behind_queued_work(connection) -> None:
    """A connection lost outside the read still logs after the request's queued line."""
    transport, peer, reactor, protocol = connection
    done: list[str] = []
    protocol.dataReceived = lambda data: held_writes.after_sending(reactor, done.append, "incoming")
    peer.send(b"request")
    transport.doRead()
    held_writes.after_sending(reactor, done.append, "abandoned")
    assert done == []
    reactor.advance(0)
    assert done == ["incoming", "abandoned"]


def test_without_the_service_adopt_leaves_the_transport_stock(holding) -> None:
    """With SPEEDUPS=0 (no service) the transport keeps Twisted's class and path."""
    holding.stopService()
    assert not held_writes.installed()
    connection = _connection()
    transport, peer, reactor, _ = next(connection)
    assert type(transport) is tcp.Server
    peer.send(b"request")
    transport.doRead()
    assert transport.socket.sends == [] and transport in reactor.getWriters()
    transport.doWrite()
    assert _received(peer) == b"head:body"
    connection.close()


def test_without_the_service_work_waits_for_the_next_turn_in_order(holding) -> None:
    """With SPEEDUPS=0 work is still done after the turn that queued it, in order."""
    holding.stopService()
    reactor = MemoryReactorClock()
    done: list[str] = []
    for name in ("first", "second", "third"):
        held_writes.after_sending(reactor, done.append, name)
    assert done == []
    reactor.advance(0)
    assert done == ["first", "second", "third"]


def test_without_the_service_each_reactor_has_its_own_turn(holding) -> None:
    """Work queued on a clock that never advances does not hold up another reactor's work."""
    holding.stopService()
    stalled, running = MemoryReactorClock(), MemoryReactorClock()
    done: list[str] = []
    held_writes.after_sending(stalled, done.append, "stalled")
    held_writes.after_sending(running, done.append, "running")
    running.advance(0)
    assert done == ["running"]
    stalled.advance(0)
    assert done == ["running", "stalled"]


def test_a_send_pending_on_another_reactor_does_not_hold_up_this_one(connection) -> None:
    """Held writes go out on their own reactor's turn even while another clock has a send pending."""
    transport, peer, reactor, protocol = connection
    stalled = MemoryReactorClock()
    protocol.dataReceived = lambda data: held_writes.after_sending(stalled, lambda: None)
    peer.send(b"request")
    transport.doRead()  # queues work on the stalled clock, which is never advanced
    protocol.dataReceived = Answering.dataReceived.__get__(protocol)
    peer.send(b"request")
    transport.doRead()
    reactor.advance(0)
    assert transport.socket.sends == [b"head:body"]


def test_stopping_the_service_twice_counts_once(holding) -> None:
    """A service stopped twice (a gateway stopped twice) does not switch off another that runs."""
    other = held_writes.HeldWrites()
    other.startService()
    other.stopService()
    other.stopService()
    assert held_writes.installed()
    holding.stopService()
    assert not held_writes.installed()
