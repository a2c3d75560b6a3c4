"""Concurrent misses on one key share one upstream call.

When a popular response expires, every request that arrives before the
fresh one comes back would otherwise go upstream too: a stampede onto the
service the cache is there to spare. `Coalescer.fetch` lets the first
caller of a key start the call and the others wait for its result (nginx
``proxy_cache_lock``, Varnish's waiting list; RFC 9211 calls them
``collapsed``).

Each caller gets a Deferred of its own, so one caller's callbacks never see
another's, and cancelling one (its client left) takes only that caller out.
The shared call itself is cancelled only when the last caller waiting for
it cancels: the gateway cancels an upstream call whose client has left, so
that it stops holding an in-flight slot and the connection, and a call
nobody waits for any more is such a call. A caller that wants the call to
finish whatever happens (a background refresh that should land in the
store) simply does not cancel its Deferred.

The key is freed as soon as the call ends, before any caller's callbacks
run, so a caller that fetches the same key from its callback, or any later
one, starts afresh.

Who may share an answer is the key's business: requests whose answers may
differ (another user, another Vary-named field once the Vary is known) must
not share a key, or must check the shared answer before using it, as
Varnish's waiting list does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

T = TypeVar("T")


class _SharedCall(Generic[T]):
    """One call in flight and the callers waiting for it."""

    __slots__ = ("deferred", "waiters", "settled")

    def __init__(self) -> None:
        self.deferred: Deferred[T] | None = None
        # An insertion-ordered set: callers hear in the order they came.
        self.waiters: dict[Deferred[T], None] = {}
        self.settled = False


class Coalescer(Generic[T]):
    """Shares one call among the concurrent callers of each key.

    The result (or Failure) is handed to every waiting caller as the same
    object, so it should be immutable, as a stored response is.

    Attributes:
        coalesced: Callers that joined a call already in flight, since the
            coalescer was made: each is an upstream call saved, for a
            metrics counter.
    """

    def __init__(self) -> None:
        self.coalesced = 0
        self._calls: dict[Hashable, _SharedCall[T]] = {}

    @property
    def in_flight(self) -> int:
        """Keys with a call in flight."""
        return len(self._calls)

    def fetch(self, key: Hashable, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Get the result of the call for ``key``, starting it unless one is in flight.

        Args:
            key: What identifies callers that may share an answer.
            start: Starts the call; called only when no call for ``key`` is
                in flight. Its Deferred should support cancellation. If it
                raises, the caller's Deferred fails with that exception.

        Returns:
            A Deferred of this caller's own that fires with the call's
            result or fails with its Failure. Cancelling it fails it with
            CancelledError and, if no other caller waits, cancels the call.
        """
        call = self._calls.get(key)
        if call is not None:
            self.coalesced += 1
            return self._join(key, call)
        call = _SharedCall()
        self._calls[key] = call
        waiter = self._join(key, call)
        # Joined before the call starts: a result that is there at once
        # (start() raised, or answered synchronously) still reaches it.
        call.deferred = maybeDeferred(start)
        call.deferred.addBoth(self._settle, key, call)
        return waiter

    def _join(self, key: Hashable, call: _SharedCall[T]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred(functools.partial(self._leave, key, call))
        call.waiters[waiter] = None
        return waiter

    def _leave(self, key: Hashable, call: _SharedCall[T], waiter: Deferred[T]) -> None:
        """A caller cancelled: it leaves (Deferred.cancel then fails it with CancelledError)."""
        call.waiters.pop(waiter, None)
        if call.waiters or call.settled:
            return
        self._free(key, call)
        assert call.deferred is not None
        call.deferred.cancel()

    def _settle(self, result: T | Failure, key: Hashable, call: _SharedCall[T]) -> None:
        """The call ended: free the key, then hand every waiting caller the result.

        Returns None, so a failure ends here, handled, and is reported
        through each caller's own Deferred instead.
        """
        call.settled = True
        self._free(key, call)
        waiters = list(call.waiters)
        call.waiters.clear()
        for waiter in waiters:
            # A caller's callback may have cancelled a later caller already.
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _free(self, key: Hashable, call: _SharedCall[T]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
