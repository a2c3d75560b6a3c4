"""Dispatch the epoll reactor's events with their log context pushed directly.

For each ready descriptor, Twisted's epoll reactor calls ``log.callWithLogger``:
it asks the selectable for its ``logPrefix()``, copies the current log
context with that prefix as ``system``, and runs the read (or write) inside
it through ``twisted.python.context``'s thread-local tracker, some ten
Python calls around each event; a proxied request has two (the client's
request and the upstream's answer). The context a poll starts in is the
same for all of its events, so here it is read once per poll; each event's
copy is pushed onto the tracker's stack and popped again, exactly what
``context.call`` does, and a failure is logged as ``callWithLogger`` logs
it. A legacy log event emitted during a read still carries the
selectable's prefix as its ``system``.

Relies on (checked by ``tests/integration/test_speedups_shape.py``): the
epoll reactor's ``_poller``, ``_selectables`` and ``_doReadOrWrite``, its
``doIteration`` being ``doPoll`` and looked up on the reactor at each turn
(``ReactorBase.mainLoop``), and the context tracker's stack of dicts
(``currentContext().contexts``). With any other reactor it does nothing;
without the service (SPEEDUPS=0) the reactor polls as Twisted wrote it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.epollreactor import EPollReactor
from twisted.python import context, log

_installed: dict[Any, int] = {}
"""How many `EventDispatch` services run on each reactor (tests may run several gateways)."""


class EventDispatch(Service):
    """While running, the epoll reactor dispatches its events with `poll_events`.

    Args:
        reactor: The reactor; any but the epoll reactor is left alone.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        if isinstance(reactor, EPollReactor):
            _installed[reactor] = _installed.get(reactor, 0) + 1
            if _installed[reactor] == 1:
                # An attribute of the instance: mainLoop looks it up each turn.
                reactor.doIteration = poll_events(reactor)

    def stopService(self) -> None:
        super().stopService()
        reactor = self._reactor
        if _installed.get(reactor):
            _installed[reactor] -= 1
            if not _installed[reactor]:
                del _installed[reactor]
                del reactor.doIteration  # Twisted's own doPoll again


def poll_events(reactor: EPollReactor) -> Callable[[float | None], None]:
    """``reactor.doPoll``, with each event's log context pushed directly."""
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    tracker = context.theContextTracker

    def do_poll(timeout: float | None) -> None:
        try:
            events = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        if not events:
            return
        outer = context.get(log.ILogContext)
        stack = tracker.currentContext().contexts
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                _dispatch(stack, outer, dispatch, selectable, fd, event)

    return do_poll


def _dispatch(
    stack: list[dict[Any, Any]], outer: dict[str, Any],
    dispatch: Callable[[Any, int, int], None], selectable: Any, fd: int, event: int,
) -> None:
    """One event, as ``log.callWithLogger(selectable, dispatch, selectable, fd, event)``."""
    try:
        prefix = selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        prefix = "(buggy logPrefix method)"
        log.err(system=prefix)
    logged = outer.copy()
    logged["system"] = prefix
    try:
        stack.append({log.ILogContext: logged})
        try:
            dispatch(selectable, fd, event)
        finally:
            stack.pop()
    except KeyboardInterrupt:
        raise
    except BaseException:
        log.err(system=prefix)
