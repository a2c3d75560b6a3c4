"""Workers sharing one listening socket take turns accepting (WORKERS > 1).

Workers share one listening socket and each is woken when a connection
waits. Twisted's TCP port accepts up to a hundred connections each time it
is woken, so a burst of connections (a load balancer opening its pool, a
load generator's 64) could all land on whichever worker woke first, leaving
the others idle for the connections' whole life. Accepting one at a time,
the workers take turns, and a busy worker, slower to come back to the
socket, takes fewer.

Relies on (checked by ``tests/integration/test_speedups_shape.py``): ``tcp.Port.doRead``
accepting at most ``numberAccepts`` connections per call, and an adopted
port whose class may be switched to a subclass. Without it (SPEEDUPS=0)
every worker still serves; the load is only spread less evenly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class _TurnTakingPort(tcp.Port):
    """A TCP port that accepts one connection each time it is woken."""

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted's port grows this under load; a worker's stays at one."""


def take_turns(port: Any) -> None:
    """Make an adopted TCP port accept one connection per wake-up.

    Any other port (UNIX sockets, test doubles) is left alone.
    """
    if type(port) is tcp.Port:
        port.__class__ = _TurnTakingPort
