"""Poll for a moment before the reactor sleeps, once it has sent (BUSY_POLL_US).

At one request at a time the gateway sends a request upstream and waits for
the answer, then sends the answer and waits for the client's next request.
A wait that ends in the kernel waking a process asleep in ``epoll_wait``
costs more than it seems on a virtual machine: doing less work (no access
log) once made the latency at one connection worse, because the logging had
kept the process awake until the next event came.

So after a reactor turn that sent held writes (`deltagw.speedups.held_writes`),
the reactor's epoll descriptor is polled, without taking its events, for up
to BUSY_POLL_US microseconds before the reactor is let sleep. The first
ready event ends the poll, and the reactor handles it without a wake-up. A
turn that sent nothing never polls, so an idle gateway spends nothing; under
load an event is nearly always ready and the poll ends at its first look.
The price is up to BUSY_POLL_US of CPU for each turn that sent and whose
answer is slower than that, which is why it is opt-in (default 0): it pays
at one connection on a virtual machine, and nowhere under load.

Relies on (checked by ``tests/integration/test_speedups_shape.py``): the epoll reactor's
private ``_poller``, a ``select.epoll`` with ``fileno()``. With any other
reactor it does nothing.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service

from deltagw.speedups import held_writes


class BusyPoll(Service):
    """Keeps the reactor polling after its sends, while the service runs.

    Args:
        reactor: The reactor; only the epoll reactor has a descriptor that
            says when any event is ready, and with any other this does nothing.
        microseconds: The longest poll (BUSY_POLL_US); 0 sleeps at once.
        clock: Seconds, for the poll's deadline (tests count its reads).
    """

    def __init__(
        self, reactor: Any, microseconds: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.microseconds = microseconds
        self._clock = clock
        self._ready = _readiness_of(reactor)

    def startService(self) -> None:
        super().startService()
        if self._ready is not None:
            held_writes.poll_before_sleeping(self.poll)

    def stopService(self) -> None:
        super().stopService()
        held_writes.poll_before_sleeping(None)

    def poll(self) -> None:
        """Return once the reactor has an event, or after ``microseconds``."""
        if self._ready is None or self.microseconds <= 0:
            return
        ready, clock = self._ready.poll, self._clock
        deadline = clock() + self.microseconds / 1e6
        while not ready(0) and clock() < deadline:
            pass


def _readiness_of(reactor: Any) -> Any:
    """A ``select.poll`` on the reactor's epoll descriptor, or None.

    An epoll descriptor is itself readable while any event it watches is
    ready; polling it leaves the events to the reactor. The descriptor is
    the epoll reactor's private ``_poller``.
    """
    epoll = getattr(reactor, "_poller", None)
    if not isinstance(epoll, select.epoll):
        return None
    ready = select.poll()
    ready.register(epoll.fileno(), select.POLLIN)
    return ready
