"""Send what a read produced before the reactor polls again (Twisted #5303).

A Twisted TCP transport buffers every write and registers its socket for
writability; the bytes leave on a later reactor iteration, after one
``epoll_ctl`` to start watching the socket and another to stop. A proxied
request makes two such trips (the request to the upstream, the response to
the client), so it costs four reactor iterations instead of two; at one
connection at a time that was a third of the gateway's CPU per request and
most of its added latency.

Sending every write at once would be worse: twisted.web writes a response's
head and its body separately, and two sends are two packets for the peer to
handle. So the writes made while reads are being dispatched are held, and
sent together by one ``callLater(0)`` once the reactor has handled the
events of this poll: one ``send`` per connection per reactor turn, and no
writability registration when the socket takes it all. (Sending at the end
of each read instead answered one connection slightly sooner but cost more
CPU under many connections: the peers, answered at once, came back one by
one instead of in batches.) A write made anywhere else (a timer, a producer
being resumed) takes Twisted's usual path, as do writes on a connection
that is closing.

Only plain TCP connections (``tcp.Server``, ``tcp.Client``) take part, each
opted in by its protocol with `adopt` while a `HeldWrites` service runs
(SPEEDUPS); TLS and UNIX connections stay as Twisted made them. The buffers
used are Twisted's own, so a write that the socket cannot take at once is
finished by Twisted's ``doWrite`` as usual.

Relies on (checked by ``tests/integration/test_speedups_shape.py``): ``tcp.Connection``'s
write buffer ``_tempDataBuffer``/``_tempDataLen``, its ``_maybePauseProducer``,
``_writeDisconnected``, ``_aborting``, ``doRead``/``doWrite``/``startWriting``,
and a transport whose class may be switched to a subclass.

Without the service (SPEEDUPS=0) `adopt` changes nothing and `after_sending`
still defers its work, by ``reactor.callLater(0)``, until the reactor has
dispatched this turn's events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger

from deltagw.speedups.switch import Switch

_log = Logger()

_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
"""``work, args, kwargs`` queued by `after_sending`."""

_held: list[Any] = []
"""Connections written to during the current read dispatch."""

_depth = 0
"""How many read dispatches are on the stack (the reactor runs one; a
protocol may read another connection's socket synchronously)."""

_sending: set[Any] = set()
"""The reactors with a call pending that sends the held writes, once this
poll's events are done (one in production; a test's clocks are reactors too)."""

_after: deque[_Call] = deque()
"""Work to do once the held writes are sent (`after_sending`), in order."""

_before_sleeping: Callable[[], None] | None = None
"""Called last in a turn that sent held writes (`poll_before_sleeping`)."""

_next_turns: dict[Any, deque[_Call]] = {}
"""Without held writes: work for each reactor's next turn, in order (one
``callLater(0)`` per reactor and turn; a test's clock is a reactor too)."""


class _HoldingWrites:
    """Holds writes made during a read dispatch and sends them when it ends."""

    _write_held = False

    def write(self, data: bytes) -> None:
        if not self._holding():
            super().write(data)  # type: ignore[misc]
        elif data:
            self._hold()
            self._tempDataBuffer.append(data)  # type: ignore[attr-defined]
            self._tempDataLen += len(data)  # type: ignore[attr-defined]
            self._maybePauseProducer()  # type: ignore[attr-defined]

    def writeSequence(self, iovec: list[bytes]) -> None:
        if not self._holding():
            super().writeSequence(iovec)  # type: ignore[misc]
        elif iovec:
            self._hold()
            self._tempDataBuffer.extend(iovec)  # type: ignore[attr-defined]
            self._tempDataLen += sum(map(len, iovec))  # type: ignore[attr-defined]
            self._maybePauseProducer()  # type: ignore[attr-defined]

    def _holding(self) -> bool:
        return bool(
            _depth
            and self.connected  # type: ignore[attr-defined]
            and not self.disconnecting  # type: ignore[attr-defined]
            and not self._writeDisconnected  # type: ignore[attr-defined]
            and not self.TLS  # type: ignore[attr-defined]
        )

    def _hold(self) -> None:
        if not self._write_held:
            self._write_held = True
            _held.append(self)
            _send_at_end_of_turn(self.reactor)  # type: ignore[attr-defined]

    def doRead(self) -> Any:
        global _depth
        _depth += 1
        try:
            return super().doRead()  # type: ignore[misc]
        finally:
            _depth -= 1

    def _send_now(self) -> None:
        """Send the held bytes; what the socket does not take waits for writability."""
        self._write_held = False
        if self.disconnecting or self.disconnected or self._aborting:  # type: ignore[attr-defined]
            # Closing: loseConnection has already asked for writability and
            # Twisted finishes the job; an aborted connection sends nothing.
            return
        failed = self.doWrite()  # type: ignore[attr-defined]
        if failed is not None or self._tempDataLen or self.dataBuffer:  # type: ignore[attr-defined]
            # Not all sent, or the send failed: the reactor's doWrite carries
            # on (or reports the lost connection) as for any transport.
            self.startWriting()  # type: ignore[attr-defined]


def after_sending(reactor: Any, work: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``work(*args, **kwargs)`` once the writes held in this turn are sent.

    Bookkeeping that need not delay an answer (the access log, metrics) is
    done while the peers read it: at one connection that is time the client
    would otherwise wait. The calls keep their order. While writes are held
    (`HeldWrites` runs), ``work`` outside a read dispatch with nothing queued
    is called at once; otherwise it waits for the reactor's next turn.
    """
    if not HeldWrites.running_count:
        _next_turn(reactor, (work, args, kwargs))
    elif not _depth and not _after:
        work(*args, **kwargs)
    else:
        _after.append((work, args, kwargs))
        _send_at_end_of_turn(reactor)


def _next_turn(reactor: Any, call: _Call) -> None:
    queue = _next_turns.get(reactor)
    if queue is None:
        queue = _next_turns[reactor] = deque()
        reactor.callLater(0, _run_next_turn, reactor)
    queue.append(call)


def _run_next_turn(reactor: Any) -> None:
    _run(_next_turns.pop(reactor))


def _run(queue: deque[_Call]) -> None:
    """Call each queued ``work``, in order; one that raises does not stop the rest."""
    while queue:
        work, args, kwargs = queue.popleft()
        try:
            work(*args, **kwargs)
        except Exception:
            _log.failure("work after sending failed")


def poll_before_sleeping(poll: Callable[[], None] | None) -> None:
    """Have ``poll`` called at the end of every turn that sent held writes.

    The answer to what was sent is due soon; `deltagw.speedups.busy_poll` waits for
    it awake rather than asleep. None stops the calls.
    """
    global _before_sleeping
    _before_sleeping = poll


def _send_at_end_of_turn(reactor: Any) -> None:
    if reactor not in _sending:
        _sending.add(reactor)
        reactor.callLater(0, _send_held, reactor)


def _send_held(reactor: Any) -> None:
    _sending.discard(reactor)
    sent = bool(_held)
    while _held:
        transport = _held.pop()
        try:
            transport._send_now()
        except Exception:
            # One connection's failure must not strand the others' bytes:
            # leave this one to the reactor's own doWrite.
            _log.failure("sending held writes failed")
            transport.startWriting()
    _run(_after)
    if sent and _before_sleeping is not None:
        _before_sleeping()


class _HoldingServer(_HoldingWrites, tcp.Server):
    """An accepted TCP connection whose writes go out at the end of a turn."""


class _HoldingClient(_HoldingWrites, tcp.Client):
    """An outgoing TCP connection whose writes go out at the end of a turn."""


_KINDS: dict[type, type] = {tcp.Server: _HoldingServer, tcp.Client: _HoldingClient}


class HeldWrites(Switch):
    """While running, `adopt` makes plain TCP transports hold their writes."""


def installed() -> bool:
    """Whether `adopt` currently makes transports hold their writes."""
    return HeldWrites.running_count > 0


def adopt(transport: Any) -> None:
    """Make a plain TCP transport hold its writes (call from ``connectionMade``).

    Only while a `HeldWrites` service runs; any other transport (TLS
    wrappers, UNIX sockets, test doubles) is left alone.
    """
    if not HeldWrites.running_count:
        return
    kind = _KINDS.get(type(transport))
    if kind is not None:
        transport.__class__ = kind
