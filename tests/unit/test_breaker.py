"""Tests for deltagw.upstream.breaker: the per-service circuit breaker."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from deltagw.upstream.breaker import (
    PROBE_RETRY_AFTER,
    CircuitBreaker,
    CircuitOpen,
    is_failure_status,
)


class CircuitBreakerTests(SynchronousTestCase):
    """The breaker's state machine, driven by a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.transitions: list[tuple[str, str, str]] = []
        self.breaker = CircuitBreaker(
            "storage",
            self.clock,
            failures=3,
            reset=30.0,
            on_transition=lambda *t: self.transitions.append(t),
        )

    def fail_times(self, n: int) -> None:
        for _ in range(n):
            self.breaker.acquire()
            self.breaker.record_failure()

    def open_and_wait(self) -> None:
        """Open the circuit and let its reset period pass."""
        self.fail_times(3)
        self.clock.advance(30.0)

    def test_starts_closed(self) -> None:
        """A new breaker is closed and lets calls through."""
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.breaker.retry_after, 0.0)
        self.breaker.acquire()

    def test_opens_after_consecutive_failures(self) -> None:
        """The circuit opens on the Nth consecutive failure, not before."""
        self.fail_times(2)
        self.assertEqual(self.breaker.state, "closed")
        self.fail_times(1)
        self.assertEqual(self.breaker.state, "open")

    def test_success_resets_consecutive_count(self) -> None:
        """A success in between restarts the count of consecutive failures."""
        self.fail_times(2)
        self.breaker.acquire()
        self.breaker.record_success()
        self.fail_times(2)
        self.assertEqual(self.breaker.state, "closed")
        self.fail_times(1)
        self.assertEqual(self.breaker.state, "open")

    def test_open_rejects_with_time_left(self) -> None:
        """An open circuit raises CircuitOpen whose retry_after is the time left."""
        self.fail_times(3)
        self.clock.advance(12.5)
        error = self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.assertAlmostEqual(error.retry_after, 17.5)
        self.assertAlmostEqual(self.breaker.retry_after, 17.5)
        self.assertEqual(self.breaker.state, "open")

    def test_open_rejects_until_reset_elapsed(self) -> None:
        """Just before the reset period ends, calls are still rejected."""
        self.fail_times(3)
        self.clock.advance(29.999)
        error = self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.assertGreater(error.retry_after, 0)

    def test_half_open_lets_one_probe_through(self) -> None:
        """After the reset period exactly one caller passes; the others are rejected."""
        self.open_and_wait()
        self.breaker.acquire()
        self.assertEqual(self.breaker.state, "half_open")
        error = self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.assertEqual(error.retry_after, PROBE_RETRY_AFTER)
        self.assertEqual(self.breaker.retry_after, PROBE_RETRY_AFTER)
        self.assertRaises(CircuitOpen, self.breaker.acquire)

    def test_probe_success_closes(self) -> None:
        """A successful probe closes the circuit with a clean failure count."""
        self.open_and_wait()
        self.breaker.acquire()
        self.breaker.record_success()
        self.assertEqual(self.breaker.state, "closed")
        self.breaker.acquire()
        self.fail_times(2)
        self.assertEqual(self.breaker.state, "closed")

    def test_probe_failure_reopens_with_fresh_timer(self) -> None:
        """A failed probe reopens the circuit for a full reset period from now."""
        self.open_and_wait()
        self.clock.advance(4.0)
        self.breaker.acquire()
        self.breaker.record_failure()
        self.assertEqual(self.breaker.state, "open")
        error = self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.assertAlmostEqual(error.retry_after, 30.0)
        self.clock.advance(29.0)
        self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.clock.advance(1.0)
        self.breaker.acquire()
        self.assertEqual(self.breaker.state, "half_open")

    def test_release_frees_probe(self) -> None:
        """Releasing the probe lets the next caller probe without deciding anything."""
        self.open_and_wait()
        self.breaker.acquire()
        self.breaker.release()
        self.assertEqual(self.breaker.state, "half_open")
        self.assertEqual(self.breaker.retry_after, 0.0)
        self.breaker.acquire()
        self.assertRaises(CircuitOpen, self.breaker.acquire)

    def test_release_while_closed_changes_nothing(self) -> None:
        """Releasing a call on a closed circuit neither counts nor resets failures."""
        self.fail_times(2)
        self.breaker.acquire()
        self.breaker.release()
        self.fail_times(1)
        self.assertEqual(self.breaker.state, "open")

    def test_stragglers_while_open_do_not_extend_reset(self) -> None:
        """Outcomes of calls admitted before the circuit opened leave it and its timer alone."""
        self.breaker.acquire()
        self.fail_times(3)
        self.clock.advance(10.0)
        self.breaker.record_failure()
        self.breaker.record_success()
        self.breaker.release()
        self.assertEqual(self.breaker.state, "open")
        self.assertAlmostEqual(self.breaker.retry_after, 20.0)

    def test_transitions_reported_once_each(self) -> None:
        """Each state change is reported exactly once, with the service name."""
        self.fail_times(3)
        self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.breaker.record_failure()
        self.clock.advance(30.0)
        self.breaker.acquire()
        self.assertRaises(CircuitOpen, self.breaker.acquire)
        self.breaker.record_failure()
        self.clock.advance(30.0)
        self.breaker.acquire()
        self.breaker.record_success()
        self.breaker.acquire()
        self.breaker.record_success()
        self.assertEqual(
            self.transitions,
            [
                ("storage", "closed", "open"),
                ("storage", "open", "half_open"),
                ("storage", "half_open", "open"),
                ("storage", "open", "half_open"),
                ("storage", "half_open", "closed"),
            ],
        )

    def test_works_without_transition_callback(self) -> None:
        """The transition callback is optional."""
        breaker = CircuitBreaker("auth", self.clock, failures=1, reset=1.0)
        breaker.acquire()
        breaker.record_failure()
        self.assertEqual(breaker.state, "open")

    def test_rejects_bad_settings(self) -> None:
        """A breaker that could never open or never close is refused at construction."""
        self.assertRaises(ValueError, CircuitBreaker, "auth", self.clock, failures=0)
        self.assertRaises(ValueError, CircuitBreaker, "auth", self.clock, reset=0.0)


class FailureStatusTests(SynchronousTestCase):
    """Which upstream statuses count against the breaker."""

    def test_gateway_errors_are_failures(self) -> None:
        """502, 503 and 504 count as failures."""
        for code in (502, 503, 504):
            self.assertTrue(is_failure_status(code), code)

    def test_other_statuses_are_not_failures(self) -> None:
        """Successes, client errors and other server errors do not count."""
        for code in (200, 204, 301, 400, 404, 429, 500, 501, 505):
            self.assertFalse(is_failure_status(code), code)
