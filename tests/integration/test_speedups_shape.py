"""Each speedup's Twisted internal still has the shape it relies on; SPEEDUPS=0 installs none.

A Twisted upgrade that renames or reshapes one of these internals must fail
here, with a message naming it, rather than in production. Each test names
the speedup module it guards (``deltagw/speedups/``).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import epollreactor, protocol, reactor, tcp
from twisted.internet.testing import MemoryReactorClock

from deltagw.speedups import channel_clock, clean_fields, held_writes, turn_taking
from deltagw.speedups.busy_poll import BusyPoll
from deltagw.speedups.event_dispatch import EventDispatch
from deltagw.web.site import GatewayChannel
from tests.support import RecordingUpstream


class _Port:
    """What tcp.Server reads from the port that accepted it (its number, for logs)."""

    _realPortNumber = 8000


@pytest.fixture
def server_transport() -> Iterator[tuple[tcp.Server, socket.socket]]:
    """A stock ``tcp.Server`` on one end of a socket pair, the peer on the other."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport = tcp.Server(
        ours, protocol.Protocol(), ("127.0.0.1", 1), _Port(), 1, MemoryReactorClock()
    )
    try:
        yield transport, peer
    finally:
        ours.close()
        peer.close()


# ---------------------------------------------------------------------------
# held_writes: tcp.Connection's write buffer, and a class switch


@pytest.mark.parametrize(
    "name", ["_tempDataBuffer", "_tempDataLen", "dataBuffer", "_writeDisconnected", "_aborting",
             "TLS", "connected", "disconnecting", "disconnected"],
)
def test_held_writes_finds_the_connection_state_it_reads(server_transport, name: str) -> None:
    """held_writes reads these attributes of a TCP connection."""
    transport, _ = server_transport
    assert hasattr(transport, name), (
        f"twisted.internet.tcp.Connection has no {name!r} any more: "
        "deltagw/speedups/held_writes.py relies on it"
    )


@pytest.mark.parametrize(
    "name", ["_maybePauseProducer", "doRead", "doWrite", "startWriting", "write", "writeSequence"],
)
def test_held_writes_finds_the_connection_methods_it_overrides_or_calls(name: str) -> None:
    """held_writes overrides or calls these methods of tcp.Server and tcp.Client."""
    for kind in (tcp.Server, tcp.Client):
        assert callable(getattr(kind, name, None)), (
            f"twisted.internet.tcp.{kind.__name__}.{name} is gone: "
            "deltagw/speedups/held_writes.py relies on it"
        )


def test_held_writes_buffer_is_what_dowrite_sends(server_transport) -> None:
    """Bytes appended to ``_tempDataBuffer`` (and counted in ``_tempDataLen``) leave on ``doWrite``."""
    transport, peer = server_transport
    transport._tempDataBuffer.append(b"held")
    transport._tempDataLen += 4
    transport.doWrite()
    assert peer.recv(100) == b"held", (
        "tcp.Connection.doWrite no longer sends _tempDataBuffer: "
        "deltagw/speedups/held_writes.py relies on it"
    )
    assert transport._tempDataLen == 0 and not transport._tempDataBuffer, (
        "tcp.Connection.doWrite no longer empties _tempDataBuffer/_tempDataLen"
    )


def test_held_writes_class_switch_takes(server_transport) -> None:
    """A stock tcp.Server accepts the switch to its holding subclass."""
    transport, _ = server_transport
    service = held_writes.HeldWrites()
    service.startService()
    try:
        held_writes.adopt(transport)
    finally:
        service.stopService()
    assert isinstance(transport, held_writes._HoldingWrites) and isinstance(transport, tcp.Server), (
        "a tcp.Server's __class__ can no longer be switched: "
        "deltagw/speedups/held_writes.py relies on it"
    )


# ---------------------------------------------------------------------------
# busy_poll: the epoll reactor's _poller


def test_busy_poll_finds_the_epoll_reactors_poller() -> None:
    """The epoll reactor keeps its ``select.epoll`` as ``_poller``, with ``fileno()``."""
    assert isinstance(reactor, epollreactor.EPollReactor), (
        f"the test run's reactor is {type(reactor).__name__}, not the epoll reactor"
    )
    poller = getattr(reactor, "_poller", None)
    assert isinstance(poller, select.epoll), (
        "twisted.internet.epollreactor.EPollReactor._poller is not a select.epoll any more: "
        "deltagw/speedups/busy_poll.py relies on it"
    )
    assert poller.fileno() >= 0
    assert BusyPoll(reactor, 50)._ready is not None


# ---------------------------------------------------------------------------
# turn_taking: tcp.Port's numberAccepts


@pytest.fixture
def adopted_port() -> Iterator[tuple[Any, list[Any], Callable[[], None]]]:
    """A stock port adopted from a listening socket; its accepted protocols; a connector.

    On the real reactor (what ``adoptStreamPort`` gives is the point); every
    descriptor is taken off it before the fixture ends.
    """
    built: list[Any] = []
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    factory.buildProtocol = lambda addr: built.append(protocol.Protocol()) or built[-1]  # type: ignore[method-assign]
    clients: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = reactor.adoptStreamPort(listener.fileno(), socket.AF_INET, factory)
        port.stopReading()  # the test calls doRead itself
        address = listener.getsockname()

        def connect() -> None:
            clients.append(socket.create_connection(address))

        try:
            yield port, built, connect
        finally:
            for accepted in built:
                accepted.transport.abortConnection()
            for client in clients:
                client.close()
            port.stopListening()


def test_turn_taking_port_is_a_stock_tcp_port(adopted_port) -> None:
    """``adoptStreamPort`` of a TCP socket gives exactly ``tcp.Port``, the class turn_taking switches."""
    port, _, _ = adopted_port
    assert type(port) is tcp.Port, (
        f"reactor.adoptStreamPort gave {type(port).__qualname__}, not twisted.internet.tcp.Port: "
        "deltagw/speedups/turn_taking.py would leave it alone"
    )


def test_turn_taking_relies_on_number_accepts_bounding_each_read(adopted_port) -> None:
    """``tcp.Port.doRead`` accepts at most ``numberAccepts`` connections per call."""
    port, built, connect = adopted_port
    assert hasattr(port, "numberAccepts"), "tcp.Port.numberAccepts is gone"
    port.numberAccepts = 1
    for _ in range(3):
        connect()
    port.doRead()
    assert len(built) == 1, (
        f"tcp.Port.doRead accepted {len(built)} connections with numberAccepts=1: "
        "deltagw/speedups/turn_taking.py relies on numberAccepts bounding each read"
    )


def test_turn_taking_port_stays_at_one_accept(adopted_port) -> None:
    """Switched, the port reads one and ignores Twisted's attempts to grow it."""
    port, built, connect = adopted_port
    turn_taking.take_turns(port)
    port.numberAccepts = 100
    for _ in range(2):
        connect()
    port.doRead()
    assert port.numberAccepts == 1 and len(built) == 1


# ---------------------------------------------------------------------------
# channel_clock: how HTTPChannel drives TimeoutMixin


def test_channel_clock_hooks_are_the_ones_http_channel_calls() -> None:
    """channel_clock replaces TimeoutMixin's setTimeout/resetTimeout and ends an
    idle connection with timeoutConnection: HTTPChannel must still use those."""
    import inspect

    from twisted.protocols.policies import TimeoutMixin
    from twisted.web.http import HTTPChannel

    source = inspect.getsource(HTTPChannel)
    for name in ("setTimeout", "resetTimeout"):
        assert f"self.{name}(" in source, (
            f"twisted.web.http.HTTPChannel no longer calls {name}: "
            "deltagw/speedups/channel_clock.py relies on it"
        )
    assert issubclass(HTTPChannel, TimeoutMixin), (
        "HTTPChannel is no longer a TimeoutMixin: deltagw/speedups/channel_clock.py relies on it"
    )
    assert callable(getattr(HTTPChannel, "timeoutConnection", None)), (
        "HTTPChannel.timeoutConnection is gone: deltagw/speedups/channel_clock.py calls it"
    )


def test_channel_clock_leaves_no_timeout_mixin_call() -> None:
    """With the speedup, TimeoutMixin's own reactor call is never made: stock
    HTTPChannel touches it only through setTimeout/resetTimeout."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from deltagw.config import load_settings
    from deltagw.web.site import GatewaySite

    clock = Clock()
    site = GatewaySite(None, load_settings({"SPEEDUPS": "1", "CLIENT_TIMEOUT": "10"}), clock)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    assert len(clock.getDelayedCalls()) == 1, (
        "HTTPChannel made a reactor call of its own: deltagw/speedups/channel_clock.py "
        "expects its one call per connection to be the only one"
    )
    assert getattr(channel, "_TimeoutMixin__timeoutCall", None) is None


# ---------------------------------------------------------------------------
# clean_fields: Headers' dict of values and Twisted's name encoder


def test_clean_fields_finds_the_dict_set_raw_headers_fills() -> None:
    """clean_fields stores a value where setRawHeaders would: ``_rawHeaders``,
    keyed by what ``http_headers._nameEncoder.encode`` makes of the name,
    holding a list of the values as given."""
    from twisted.web import http_headers

    headers = http_headers.Headers()
    headers.setRawHeaders(b"x-ratelimit-limit", [b"100"])
    raw = getattr(headers, "_rawHeaders", None)
    encoder = getattr(http_headers, "_nameEncoder", None)
    assert type(raw) is dict and callable(getattr(encoder, "encode", None)), (
        "twisted.web.http_headers has no Headers._rawHeaders dict or _nameEncoder.encode "
        "any more: deltagw/speedups/clean_fields.py relies on them"
    )
    assert raw == {encoder.encode(b"x-ratelimit-limit"): [b"100"]} == {
        b"X-Ratelimit-Limit": [b"100"]
    }, (
        "Headers._rawHeaders no longer maps the encoded name to the list of values: "
        "deltagw/speedups/clean_fields.py relies on it"
    )
    assert list(headers.getAllRawHeaders()) == list(raw.items()), (
        "Headers.getAllRawHeaders no longer reads _rawHeaders: "
        "deltagw/speedups/clean_fields.py relies on it"
    )


# ---------------------------------------------------------------------------
# event_dispatch: the epoll reactor's poll and the log context stack


@pytest.mark.parametrize("name", ["_poller", "_selectables", "_doReadOrWrite"])
def test_event_dispatch_finds_the_epoll_reactors_internals(name: str) -> None:
    """event_dispatch polls ``_poller``, finds ``_selectables`` and dispatches with
    ``_doReadOrWrite``, as the epoll reactor's doPoll does."""
    assert isinstance(reactor, epollreactor.EPollReactor)
    assert hasattr(reactor, name), (
        f"twisted.internet.epollreactor.EPollReactor has no {name!r} any more: "
        "deltagw/speedups/event_dispatch.py relies on it"
    )
    assert isinstance(reactor._selectables, dict)


def test_event_dispatch_replaces_what_the_main_loop_calls() -> None:
    """The reactor's turn calls ``self.doIteration``, which is the epoll reactor's
    ``doPoll``, and doPoll wraps each event in ``log.callWithLogger`` as event_dispatch does."""
    import inspect

    from twisted.internet.base import ReactorBase

    assert "self.doIteration(" in inspect.getsource(ReactorBase.mainLoop), (
        "ReactorBase.mainLoop no longer calls self.doIteration: "
        "deltagw/speedups/event_dispatch.py replaces it on the reactor"
    )
    assert epollreactor.EPollReactor.doIteration is epollreactor.EPollReactor.doPoll
    source = inspect.getsource(epollreactor.EPollReactor.doPoll)
    assert "log.callWithLogger(selectable, _drdw, selectable, fd, event)" in source, (
        "EPollReactor.doPoll dispatches differently: deltagw/speedups/event_dispatch.py "
        "copies how it dispatches"
    )


def test_event_dispatch_pushes_what_context_call_pushes() -> None:
    """``context.call`` pushes its dict on ``currentContext().contexts`` and pops it after."""
    from twisted.python import context

    stack = context.theContextTracker.currentContext().contexts
    depth = len(stack)
    seen = context.call({"deltagw": 1}, lambda: (stack[-1], len(stack)))
    assert seen == ({"deltagw": 1}, depth + 1) and len(stack) == depth, (
        "twisted.python.context no longer keeps a stack of dicts in "
        "currentContext().contexts: deltagw/speedups/event_dispatch.py pushes onto it"
    )


@pytest_twisted.ensureDeferred
async def test_event_dispatch_reads_see_the_same_log_context() -> None:
    """A read dispatched by event_dispatch sees the log context Twisted's own poll
    gives it: the one it started in, with the connection's prefix as ``system``."""
    from twisted.internet import defer
    from twisted.python import context, log

    from deltagw.speedups.event_dispatch import EventDispatch

    async def context_of_a_read() -> tuple[dict, str]:
        seen: defer.Deferred[tuple[dict, str]] = defer.Deferred()

        class Reader(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                if not seen.called:
                    seen.callback((dict(context.get(log.ILogContext)),
                                   self.transport.logPrefix()))

        factory = protocol.Factory.forProtocol(Reader)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        try:
            client.sendall(b"x")
            return await seen
        finally:
            client.close()
            await port.stopListening()

    stock, stock_prefix = await context_of_a_read()
    dispatch = EventDispatch(reactor)
    dispatch.startService()
    try:
        assert "doIteration" in vars(reactor)
        ours, our_prefix = await context_of_a_read()
    finally:
        dispatch.stopService()
    assert "doIteration" not in vars(reactor)
    assert ours == {**stock, "system": our_prefix} and stock["system"] == stock_prefix


# ---------------------------------------------------------------------------
# SPEEDUPS=0 installs none of them


@pytest.mark.parametrize("speedups", ["0", "1"])
@pytest_twisted.ensureDeferred
async def test_speedups_are_installed_only_when_asked(
    make_gateway: Callable[..., Any], upstream: RecordingUpstream, monkeypatch, speedups: str
) -> None:
    """With SPEEDUPS=0 a running gateway proxies on stock transports, with no held
    writes, no busy poll and Twisted's own poll; with SPEEDUPS=1 it has them all."""
    transports: list[Any] = []
    adopt = held_writes.adopt

    def spy(transport: Any) -> None:
        adopt(transport)
        transports.append(transport)

    monkeypatch.setattr(held_writes, "adopt", spy)
    gateway = await make_gateway(SPEEDUPS=speedups, BUSY_POLL_US="50",
                                 STORAGE_SERVICE_URL=upstream.url)
    response = await gateway.get("/api/data/products")
    assert response.code == 200
    await response.content()
    kinds = {type(t) for t in transports}
    installed = [type(s).__name__ for s in gateway.service
                 if isinstance(s, (BusyPoll, held_writes.HeldWrites, EventDispatch,
                                   clean_fields.CleanFields))]
    if speedups == "0":
        assert kinds == {tcp.Server, tcp.Client}, kinds
        assert gateway.service.site.protocol is GatewayChannel
        assert installed == [] and gateway.service.busy_poll is None
        assert not held_writes.installed() and held_writes._before_sleeping is None
        assert not clean_fields.installed()
        assert "doIteration" not in vars(reactor)
    else:
        assert kinds == {held_writes._HoldingServer, held_writes._HoldingClient}, kinds
        assert issubclass(gateway.service.site.protocol, channel_clock.OneReactorCall)
        assert sorted(installed) == ["BusyPoll", "CleanFields", "EventDispatch", "HeldWrites"]
        assert clean_fields.installed()
        assert "doIteration" in vars(reactor)
        assert held_writes.installed() and held_writes._before_sleeping is not None
