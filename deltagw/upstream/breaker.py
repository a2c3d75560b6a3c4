"""A circuit breaker per upstream service, on the reactor clock.

When an upstream keeps failing, waiting out a full timeout on every request
only piles up connections and makes clients wait to learn what we already
know. The breaker fails those calls fast (503 with ``Retry-After``) and, after
a cool-down, lets a single probe find out whether the upstream has recovered.

States:

- ``closed``: calls pass; consecutive failures are counted and ``failures``
  of them in a row open the circuit.
- ``open``: calls are rejected with `CircuitOpen` until ``reset`` seconds
  have passed since the circuit opened.
- ``half_open``: exactly one call (the probe) passes; its success closes the
  circuit, its failure reopens it for a fresh ``reset`` period, and
  `CircuitBreaker.release` frees the slot without deciding.

Time comes from ``reactor.seconds()`` so tests drive it with ``task.Clock``;
no timer is scheduled, the open-to-half-open step happens lazily on the next
`CircuitBreaker.acquire`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

FAILURE_STATUSES: frozenset[int] = frozenset({502, 503, 504})
"""Upstream statuses that say the upstream (or its own upstream) is unwell.

They are still relayed to the client unchanged; they only count against the
breaker. Other 5xx (500, 501, ...) are answers from a working service about
one request, so they do not open the circuit.
"""

PROBE_RETRY_AFTER = 1.0
"""``retry_after`` (seconds) while the half-open probe is in flight.

The probe's outcome is due within the route's timeout, which the breaker does
not know; a short hint brings clients back soon after it, which in the common
case (the upstream recovered) finds the circuit closed again.
"""


def is_failure_status(code: int) -> bool:
    """Tell whether an upstream response status counts as a breaker failure.

    Args:
        code: The upstream's HTTP status code.

    Returns:
        True for 502, 503 and 504: the gateway relays them, but they mean the
        upstream cannot serve right now, so they count like a refused
        connection.
    """
    return code in FAILURE_STATUSES


class CircuitOpen(Exception):
    """The circuit is open (or its single probe is busy): fail fast.

    Attributes:
        retry_after: Seconds until a call may be let through again (> 0), for
            the ``Retry-After`` header.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"circuit open, retry after {retry_after:.3f}s")
        self.retry_after = retry_after


class CircuitBreaker:
    """The circuit breaker of one upstream service.

    Every call that passes `acquire` must end with exactly one of
    `record_success`, `record_failure` or `release` (use ``finally``), or a
    half-open probe slot stays taken and the service stays unreachable.
    """

    def __init__(
        self,
        name: str,
        reactor: IReactorTime,
        failures: int = 5,
        reset: float = 30.0,
        on_transition: Callable[[str, str, str], None] | None = None,
    ) -> None:
        """Create a closed breaker.

        Args:
            name: The service name, handed to ``on_transition`` so one
                callback can serve every breaker.
            reactor: The clock (``reactor.seconds()``).
            failures: Consecutive failures that open the circuit.
            reset: Seconds the circuit stays open before a probe is allowed.
            on_transition: Called as ``(name, old_state, new_state)`` once per
                state change, for logs and metrics.

        Raises:
            ValueError: ``failures`` < 1 or ``reset`` <= 0 (a breaker that
                could never close or never open would hide a config error).
        """
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures!r}")
        if reset <= 0:
            raise ValueError(f"reset must be positive, got {reset!r}")
        self.name = name
        self._reactor = reactor
        self._failures = failures
        self._reset = reset
        self._on_transition = on_transition
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        """The current state: ``closed``, ``open`` or ``half_open``.

        An open circuit whose reset period has elapsed still reads ``open``
        until the next `acquire` turns it half-open.
        """
        return self._state

    @property
    def retry_after(self) -> float:
        """Seconds until `acquire` would let a call through; 0 if it would now."""
        if self._state == OPEN:
            return max(0.0, self._opened_at + self._reset - self._reactor.seconds())
        if self._state == HALF_OPEN and self._probe_in_flight:
            return PROBE_RETRY_AFTER
        return 0.0

    def acquire(self) -> None:
        """Ask permission to call the upstream.

        Raises:
            CircuitOpen: The circuit is open and its reset period has not
                elapsed, or it is half-open and the probe is in flight.
        """
        if self._state == OPEN:
            left = self.retry_after
            if left > 0:
                raise CircuitOpen(left)
            self._transition(HALF_OPEN)
        if self._state == HALF_OPEN:
            if self._probe_in_flight:
                raise CircuitOpen(PROBE_RETRY_AFTER)
            self._probe_in_flight = True

    def record_success(self) -> None:
        """Record a call the upstream answered: closes a half-open circuit."""
        if self._state == HALF_OPEN:
            self._probe_in_flight = False
            self._transition(CLOSED)
        # While open, a straggler admitted before the circuit opened proves
        # little; the probe decides.
        if self._state == CLOSED:
            self._consecutive = 0

    def record_failure(self) -> None:
        """Record a failed call: may open (or reopen) the circuit."""
        if self._state == HALF_OPEN:
            self._open()
        elif self._state == CLOSED:
            self._consecutive += 1
            if self._consecutive >= self._failures:
                self._open()
        # While open, stragglers do not extend the reset period.

    def release(self) -> None:
        """End a call that neither succeeded nor failed (e.g. client gone).

        A half-open probe slot is freed so the next caller can probe; nothing
        is decided.
        """
        if self._state == HALF_OPEN:
            self._probe_in_flight = False

    def _open(self) -> None:
        self._opened_at = self._reactor.seconds()
        self._probe_in_flight = False
        self._consecutive = 0
        self._transition(OPEN)

    def _transition(self, new: str) -> None:
        old, self._state = self._state, new
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)
