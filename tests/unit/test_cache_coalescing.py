"""Tests for deltagw.cache.coalescing: concurrent callers of one key share one call."""

from __future__ import annotations

import gc

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from deltagw.cache.coalescing import Coalescer


class UpstreamDown(Exception):
    """The shared call failed."""


class CoalescerTests(SynchronousTestCase):
    """Sharing, failing, cancelling and freeing, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.coalescer: Coalescer[str] = Coalescer()
        self.started: list[Deferred[str]] = []
        self.slow_starts = 0
        self.cancelled_calls = 0

    def start(self) -> Deferred[str]:
        """An upstream call that the test answers by hand; counts cancellations."""

        def cancel(_: Deferred[str]) -> None:
            self.cancelled_calls += 1

        call: Deferred[str] = Deferred(cancel)
        self.started.append(call)
        return call

    def slow_start(self) -> Deferred[str]:
        """An upstream call that answers after 2 s of the test's clock."""
        self.slow_starts += 1
        return task.deferLater(self.clock, 2.0, lambda: "answer")

    def assert_no_unhandled_errors(self) -> None:
        """No Deferred was left holding a failure nobody handled."""
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_single_caller(self) -> None:
        """A caller alone starts the call and gets its result; the key is then free."""
        answer = self.coalescer.fetch(b"k", self.start)
        self.assertEqual(self.coalescer.in_flight, 1)
        self.started[0].callback("fresh")
        self.assertEqual(self.successResultOf(answer), "fresh")
        self.assertEqual((self.coalescer.in_flight, self.coalescer.coalesced), (0, 0))

    def test_concurrent_callers_share_one_call(self) -> None:
        """Three callers of one key: one call, three Deferreds of their own, one result."""
        answers = [self.coalescer.fetch(b"k", self.start) for _ in range(3)]
        self.assertEqual(len(self.started), 1)
        self.assertEqual(len({id(answer) for answer in answers}), 3)
        self.assertEqual(self.coalescer.coalesced, 2)
        for answer in answers:
            self.assertNoResult(answer)
        self.started[0].callback("fresh")
        self.assertEqual([self.successResultOf(answer) for answer in answers], ["fresh"] * 3)

    def test_callers_do_not_see_each_others_callbacks(self) -> None:
        """What one caller's callbacks return does not reach another caller."""
        first = self.coalescer.fetch(b"k", self.start)
        second = self.coalescer.fetch(b"k", self.start)
        first.addCallback(lambda text: text.upper())
        self.started[0].callback("fresh")
        self.assertEqual(self.successResultOf(first), "FRESH")
        self.assertEqual(self.successResultOf(second), "fresh")

    def test_keys_do_not_share(self) -> None:
        """Callers of different keys each start their own call."""
        one = self.coalescer.fetch(b"a", self.start)
        two = self.coalescer.fetch(b"b", self.start)
        self.assertEqual((len(self.started), self.coalescer.in_flight), (2, 2))
        self.started[1].callback("b")
        self.started[0].callback("a")
        self.assertEqual((self.successResultOf(one), self.successResultOf(two)), ("a", "b"))

    def test_later_call_starts_afresh(self) -> None:
        """Once a call ended, the next caller of its key starts a new one."""
        self.coalescer.fetch(b"k", self.start)
        self.started[0].callback("first")
        later = self.coalescer.fetch(b"k", self.start)
        self.assertEqual(len(self.started), 2)
        self.started[1].callback("second")
        self.assertEqual(self.successResultOf(later), "second")
        self.assertEqual(self.coalescer.coalesced, 0)

    def test_failure_reaches_every_caller(self) -> None:
        """A failed call fails every waiting caller with the same failure, none left unhandled."""
        answers = [self.coalescer.fetch(b"k", self.start) for _ in range(3)]
        self.started[0].errback(UpstreamDown("refused"))
        failures = [self.failureResultOf(answer, UpstreamDown) for answer in answers]
        self.assertEqual({id(failure.value) for failure in failures}, {id(failures[0].value)})
        self.assertEqual(self.coalescer.in_flight, 0)
        del answers, failures
        self.started.clear()
        self.assert_no_unhandled_errors()

    def test_failure_with_every_caller_handling_it(self) -> None:
        """Callers that handle the failure in their own errbacks leave nothing logged."""
        seen: list[Failure] = []
        for _ in range(2):
            self.coalescer.fetch(b"k", self.start).addErrback(seen.append)
        self.started[0].errback(UpstreamDown("reset"))
        self.assertEqual(len(seen), 2)
        self.assertTrue(all(failure.check(UpstreamDown) for failure in seen))
        self.started.clear()
        self.assert_no_unhandled_errors()

    def test_start_that_raises(self) -> None:
        """A start() that raises fails the caller's Deferred; the key is freed."""

        def broken() -> Deferred[str]:
            raise UpstreamDown("no connection")

        answer = self.coalescer.fetch(b"k", broken)
        self.failureResultOf(answer, UpstreamDown)
        self.assertEqual(self.coalescer.in_flight, 0)
        self.assert_no_unhandled_errors()

    def test_synchronous_result(self) -> None:
        """A call that answers at once answers its caller at once."""
        answer = self.coalescer.fetch(b"k", lambda: defer.succeed("at once"))
        self.assertEqual(self.successResultOf(answer), "at once")
        self.assertEqual(self.coalescer.in_flight, 0)

    def test_one_caller_cancelling_keeps_the_call(self) -> None:
        """A caller that cancels gets CancelledError; the call goes on for the others."""
        leaving = self.coalescer.fetch(b"k", self.start)
        staying = self.coalescer.fetch(b"k", self.start)
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.assertEqual(self.cancelled_calls, 0)
        self.assertEqual(self.coalescer.in_flight, 1)
        self.started[0].callback("fresh")
        self.assertEqual(self.successResultOf(staying), "fresh")

    def test_last_caller_cancelling_cancels_the_call(self) -> None:
        """When every caller has cancelled, nobody wants the answer: the call is cancelled
        and the key freed, so the next caller starts afresh."""
        answers = [self.coalescer.fetch(b"k", self.start) for _ in range(2)]
        for answer in answers:
            answer.cancel()
        self.assertEqual(self.cancelled_calls, 1)
        self.assertEqual(self.coalescer.in_flight, 0)
        for answer in answers:
            self.failureResultOf(answer, CancelledError)
        later = self.coalescer.fetch(b"k", self.start)
        self.assertEqual(len(self.started), 2)
        self.started[1].callback("fresh")
        self.assertEqual(self.successResultOf(later), "fresh")
        del answers, later, answer
        self.started.clear()
        self.assert_no_unhandled_errors()

    def test_cancelling_on_the_clock(self) -> None:
        """A timed call is shared until it answers; when all its callers leave, its timer goes."""
        first = self.coalescer.fetch(b"k", self.slow_start)
        second = self.coalescer.fetch(b"k", self.slow_start)
        self.clock.advance(1.0)
        first.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(second), "answer")

        third = self.coalescer.fetch(b"k", self.slow_start)
        self.assertEqual(self.slow_starts, 2)
        self.clock.advance(1.0)
        third.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(third, CancelledError)
        self.failureResultOf(first, CancelledError)
        del first, second, third
        self.assert_no_unhandled_errors()

    def test_failure_after_a_caller_left(self) -> None:
        """A call that fails after one caller cancelled fails the rest, and nothing is unhandled."""
        leaving = self.coalescer.fetch(b"k", self.start)
        staying = self.coalescer.fetch(b"k", self.start)
        leaving.cancel()
        self.started[0].errback(UpstreamDown("timeout"))
        self.failureResultOf(staying, UpstreamDown)
        self.failureResultOf(leaving, CancelledError)
        del leaving, staying
        self.started.clear()
        self.assert_no_unhandled_errors()

    def test_fetch_from_a_callback_starts_afresh(self) -> None:
        """A caller that fetches the same key from its callback does not join the ended call."""
        again: list[Deferred[str]] = []
        first = self.coalescer.fetch(b"k", self.start)
        first.addCallback(lambda text: again.append(self.coalescer.fetch(b"k", self.start)))
        self.started[0].callback("first")
        self.assertEqual(len(self.started), 2)
        self.assertNoResult(again[0])
        self.started[1].callback("second")
        self.assertEqual(self.successResultOf(again[0]), "second")

    def test_cancelling_another_caller_from_a_callback(self) -> None:
        """A caller whose callback cancels a caller not yet answered: that one is cancelled,
        no error is raised for answering it twice."""
        first = self.coalescer.fetch(b"k", self.start)
        second = self.coalescer.fetch(b"k", self.start)
        first.addCallback(lambda _: second.cancel())
        self.started[0].callback("fresh")
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.cancelled_calls, 0)
        del first, second
        self.started.clear()
        self.assert_no_unhandled_errors()
