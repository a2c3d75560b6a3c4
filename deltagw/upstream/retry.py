"""When and how an upstream call is tried again.

A retry is only safe when the upstream cannot have acted on the request and
the client has seen nothing yet, so the policy is deliberately narrow:

- only GET and HEAD (RFC 9110 §9.2.2: safe and idempotent; a POST that was
  sent may have taken effect even if no answer came back);
- only when the connection failed before any response byte arrived: refused,
  or closed/reset while sending or before the status line (typically a
  pooled keep-alive connection the upstream had just closed);
- never after a timeout or a cancellation: the upstream may still be working
  on it, and the time budget is spent;
- never once the response has started (see `call_with_retries`);
- with a jittered backoff that must end before the route's deadline.

The connection pool's own ``retryAutomatically`` must be off: this module
owns retries.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from deltagw.upstream.failures import is_connection_failure

T = TypeVar("T")

RETRYABLE_METHODS: frozenset[bytes] = frozenset({b"GET", b"HEAD"})


class RetryPolicy:
    """How many times, on which failures, and after what pause to retry."""

    def __init__(
        self,
        retries: int = 1,
        backoff_min: float = 0.05,
        backoff_max: float = 0.15,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """Configure the policy.

        Args:
            retries: Extra attempts after the first (0 disables retrying).
            backoff_min: Shortest pause before a retry, in seconds.
            backoff_max: Longest pause before a retry, in seconds.
            random: Source of uniform floats in [0, 1), a parameter so tests
                get a fixed jitter.

        Raises:
            ValueError: Negative ``retries`` or a backoff range that is
                negative or inverted.
        """
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries!r}")
        if not 0 <= backoff_min <= backoff_max:
            raise ValueError(
                f"need 0 <= backoff_min <= backoff_max, got {backoff_min!r}, {backoff_max!r}"
            )
        self.retries = retries
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._random = random

    def should_retry(self, method: bytes, failure: Failure, attempt: int) -> bool:
        """Tell whether a failed attempt may be tried again.

        Args:
            method: The request method, as Twisted spells it (``b"GET"``).
            failure: Why the attempt failed.
            attempt: The number of the attempt that failed, starting at 1.

        Returns:
            True for GET and HEAD, within the retry budget, on a connection
            failure before any response byte (`is_connection_failure`).
        """
        return (
            method in RETRYABLE_METHODS
            and attempt <= self.retries
            and is_connection_failure(failure)
        )

    def backoff(self) -> float:
        """Pick the pause before a retry.

        Returns:
            Seconds, uniform in [backoff_min, backoff_max]; the jitter keeps
            requests that failed together (an upstream restart) from all
            retrying at the same instant.
        """
        return self.backoff_min + (self.backoff_max - self.backoff_min) * self._random()


def call_with_retries(
    reactor: IReactorTime,
    policy: RetryPolicy,
    method: bytes,
    attempt_fn: Callable[[], Deferred[T]],
    deadline: float,
) -> Deferred[T]:
    """Run an upstream call, retrying it as ``policy`` allows.

    ``attempt_fn``'s Deferred must fire as soon as the response headers
    arrive, before anything is written to the client; relay the body outside
    it. A retry after the client has seen part of a response would send it a
    second, spliced one.

    Args:
        reactor: The clock for the backoff and the deadline.
        policy: Which failures to retry and how long to wait.
        method: The request method (``b"GET"``).
        attempt_fn: Starts one attempt; called again for each retry.
        deadline: ``reactor.seconds()`` value by which the route must be done;
            a retry whose backoff would end at or after it is not made.

    Returns:
        The first attempt's result that is not retried: a success, or the
        failure of the last attempt. Cancelling it cancels the attempt in
        flight or the pending backoff, and no further attempt starts.
    """

    # Plain Deferred chaining rather than a coroutine: a coroutine and its
    # Deferred cost every request, and nearly every call succeeds at once.
    # A Deferred waiting on a chained one passes ``cancel()`` down to it, so
    # cancelling reaches the attempt in flight or the backoff's timer, and
    # the CancelledError that ends either is never retried. (A module-level
    # errback rather than a closure that names itself: that closure was a
    # reference cycle per request, left for the garbage collector.)
    return maybeDeferred(attempt_fn).addErrback(
        _retry, reactor, policy, method, attempt_fn, deadline, 1
    )


def _retry(
    failure: Failure,
    reactor: IReactorTime,
    policy: RetryPolicy,
    method: bytes,
    attempt_fn: Callable[[], Deferred[T]],
    deadline: float,
    attempt: int,
) -> Failure | Deferred[T]:
    if not policy.should_retry(method, failure, attempt):
        return failure
    pause = policy.backoff()
    if reactor.seconds() + pause >= deadline:
        return failure
    later: Deferred[T] = task.deferLater(reactor, pause, attempt_fn)  # type: ignore[arg-type]
    return later.addErrback(_retry, reactor, policy, method, attempt_fn, deadline, attempt + 1)
