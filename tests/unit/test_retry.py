"""Tests for deltagw.upstream.retry: which upstream failures are retried, and how."""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ConnectionAborted as ClientConnectionAborted
from twisted.web.client import (
    HTTP11ClientProtocol,
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from deltagw.upstream.failures import is_connection_failure
from deltagw.upstream.retry import RetryPolicy, call_with_retries

RETRYABLE = [
    Failure(error.ConnectionRefusedError()),
    Failure(error.ConnectionLost()),
    Failure(error.ConnectionDone()),
    Failure(RequestNotSent()),
    Failure(RequestTransmissionFailed([Failure(error.ConnectionLost())])),
    Failure(ResponseNeverReceived([Failure(error.ConnectionDone())])),
    Failure(ResponseNeverReceived([Failure(error.ConnectionLost())])),
]

NOT_RETRYABLE = [
    Failure(defer.TimeoutError()),
    Failure(error.TimeoutError()),
    Failure(TimeoutError()),
    Failure(error.TCPTimedOutError()),
    Failure(error.ConnectingCancelledError(None)),
    Failure(CancelledError()),
    Failure(error.ConnectionAborted()),
    Failure(error.DNSLookupError()),
    Failure(ResponseNeverReceived([Failure(CancelledError())])),
    Failure(ResponseNeverReceived([Failure(error.ConnectionAborted())])),
    Failure(ResponseNeverReceived([Failure(ClientConnectionAborted())])),
    Failure(ResponseNeverReceived([])),
    Failure(RequestTransmissionFailed([Failure(CancelledError())])),
    Failure(RequestGenerationFailed([Failure(CancelledError())])),
    Failure(ResponseFailed([Failure(error.ConnectionLost())])),
    Failure(ValueError("bug")),
]


def refused() -> Deferred[str]:
    return defer.fail(error.ConnectionRefusedError())


class IsConnectionFailureTests(SynchronousTestCase):
    """The classification of attempt failures."""

    def test_connection_failures_before_response_are_retryable(self) -> None:
        """Refused, not sent, and closed or reset before any response byte qualify."""
        for failure in RETRYABLE:
            self.assertTrue(is_connection_failure(failure), failure)

    def test_timeouts_cancellations_and_partial_responses_are_not(self) -> None:
        """Timeouts, cancellations, local aborts, partial responses and bugs do not qualify."""
        for failure in NOT_RETRYABLE:
            self.assertFalse(is_connection_failure(failure), failure)

    def _send_get(self) -> tuple[HTTP11ClientProtocol, Deferred[object]]:
        protocol = HTTP11ClientProtocol()
        protocol.makeConnection(StringTransport())
        request = Request(b"GET", b"/products", Headers({b"host": [b"storage"]}), None)
        return protocol, protocol.request(request)

    def test_real_close_before_response_is_retryable(self) -> None:
        """Twisted's client reports an upstream closing before answering as retryable."""
        protocol, d = self._send_get()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(is_connection_failure(failure))

    def test_real_close_after_some_response_is_not(self) -> None:
        """Twisted's client reports a close after the first response byte as not retryable."""
        protocol, d = self._send_get()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        protocol.connectionLost(Failure(error.ConnectionLost()))
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertFalse(is_connection_failure(failure))

    def test_real_cancellation_is_not_retryable(self) -> None:
        """Twisted's client reports a cancelled request (a timeout) as not retryable."""
        protocol, d = self._send_get()
        d.cancel()
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertFalse(is_connection_failure(failure))


class RetryPolicyTests(SynchronousTestCase):
    """RetryPolicy.should_retry and RetryPolicy.backoff."""

    def test_get_and_head_retried_on_refused(self) -> None:
        """GET and HEAD are retried when the connection was refused."""
        policy = RetryPolicy()
        failure = Failure(error.ConnectionRefusedError())
        self.assertTrue(policy.should_retry(b"GET", failure, 1))
        self.assertTrue(policy.should_retry(b"HEAD", failure, 1))

    def test_non_idempotent_methods_not_retried(self) -> None:
        """POST and other methods are never retried, even on a refused connection."""
        policy = RetryPolicy(retries=3)
        failure = Failure(error.ConnectionRefusedError())
        for method in (b"POST", b"PUT", b"PATCH", b"DELETE", b"get"):
            self.assertFalse(policy.should_retry(method, failure, 1), method)

    def test_not_retried_after_timeout(self) -> None:
        """A timed-out or cancelled attempt is not retried."""
        policy = RetryPolicy()
        for failure in (Failure(defer.TimeoutError()), Failure(CancelledError())):
            self.assertFalse(policy.should_retry(b"GET", failure, 1), failure)

    def test_retry_budget(self) -> None:
        """Only `retries` extra attempts are allowed; 0 disables retrying."""
        failure = Failure(error.ConnectionRefusedError())
        self.assertFalse(RetryPolicy().should_retry(b"GET", failure, 2))
        self.assertTrue(RetryPolicy(retries=2).should_retry(b"GET", failure, 2))
        self.assertFalse(RetryPolicy(retries=0).should_retry(b"GET", failure, 1))

    def test_backoff_within_range(self) -> None:
        """The backoff maps the random draw uniformly onto 50-150 ms."""
        for draw, expected in ((0.0, 0.05), (0.5, 0.10), (0.999, 0.1499)):
            policy = RetryPolicy(random=lambda draw=draw: draw)
            self.assertAlmostEqual(policy.backoff(), expected, places=4)

    def test_rejects_bad_settings(self) -> None:
        """Negative retries and an inverted backoff range are refused."""
        self.assertRaises(ValueError, RetryPolicy, retries=-1)
        self.assertRaises(ValueError, RetryPolicy, backoff_min=0.2, backoff_max=0.1)
        self.assertRaises(ValueError, RetryPolicy, backoff_min=-0.1)


class CallWithRetriesTests(SynchronousTestCase):
    """call_with_retries on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = RetryPolicy(random=lambda: 0.5)  # backoff 100 ms
        self.attempts: list[Deferred[str]] = []

    def attempt_then(self, *outcomes: Deferred[str]) -> None:
        """Make attempt_fn hand out these Deferreds, one per attempt."""
        self.outcomes = list(outcomes)

    def attempt_fn(self) -> Deferred[str]:
        d = self.outcomes.pop(0)
        self.attempts.append(d)
        return d

    def call(self, method: bytes = b"GET", deadline: float = 10.0) -> Deferred[str]:
        return call_with_retries(self.clock, self.policy, method, self.attempt_fn, deadline)

    def test_get_retried_after_backoff(self) -> None:
        """A refused GET is tried again once the backoff has passed."""
        self.attempt_then(refused(), defer.succeed("ok"))
        d = self.call()
        self.assertNoResult(d)
        self.assertEqual(len(self.attempts), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(self.attempts), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(len(self.attempts), 2)

    def test_success_not_retried(self) -> None:
        """A successful first attempt is returned at once."""
        self.attempt_then(defer.succeed("ok"))
        self.assertEqual(self.successResultOf(self.call()), "ok")

    def test_post_not_retried(self) -> None:
        """A refused POST fails at once with the refusal."""
        self.attempt_then(refused())
        self.failureResultOf(self.call(b"POST"), error.ConnectionRefusedError)
        self.assertEqual(len(self.attempts), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_not_retried(self) -> None:
        """An attempt that timed out fails the call at once."""
        self.attempt_then(defer.fail(defer.TimeoutError()))
        self.failureResultOf(self.call(), defer.TimeoutError)
        self.assertEqual(len(self.attempts), 1)

    def test_last_failure_returned_when_retries_exhausted(self) -> None:
        """When every attempt fails, the last attempt's failure is the result."""
        last = defer.fail(error.ConnectionLost())
        self.attempt_then(refused(), last)
        d = self.call()
        self.clock.advance(0.1)
        self.failureResultOf(d, error.ConnectionLost)
        self.assertEqual(len(self.attempts), 2)

    def test_no_retry_past_deadline(self) -> None:
        """A retry whose backoff would end at or after the deadline is not made."""
        self.attempt_then(refused())
        self.clock.advance(5.0)
        d = self.call(deadline=5.1)
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_just_within_deadline(self) -> None:
        """A retry whose backoff ends before the deadline is made."""
        self.attempt_then(refused(), defer.succeed("ok"))
        d = self.call(deadline=0.101)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "ok")

    def test_cancel_during_backoff(self) -> None:
        """Cancelling during the backoff stops the timer and starts no new attempt."""
        self.attempt_then(refused(), defer.succeed("never"))
        d = self.call()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1.0)
        self.assertEqual(len(self.attempts), 1)

    def test_cancel_during_attempt(self) -> None:
        """Cancelling during an attempt cancels that attempt and does not retry."""
        cancelled: list[Deferred[str]] = []
        self.attempt_then(Deferred(cancelled.append))
        d = self.call()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, self.attempts)
        self.assertEqual(self.clock.getDelayedCalls(), [])
