"""Tests for deltagw.policy.buckets: the in-process token bucket and its headers."""

from __future__ import annotations

import hashlib
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from deltagw.policy.buckets import (
    BUCKET_SCRIPT,
    BUCKET_SCRIPT_SHA,
    GRACE,
    Decision,
    RedisError,
    TokenBucketLimiter,
    _command,
    _decision,
    _Incomplete,
    _parse_reply,
)


def drain(limiter: TokenBucketLimiter, key: str, count: int) -> list[Decision]:
    return [limiter.consume(key) for _ in range(count)]


class TokenBucketTests(SynchronousTestCase):
    """Burst, refill and refusal of one bucket on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        # An awkward start time, so refill arithmetic meets real float dust.
        self.clock.advance(1_700_000_000.3)
        self.limiter = TokenBucketLimiter(self.clock, capacity=100, window=60)

    def test_burst_to_capacity(self) -> None:
        """A fresh bucket allows exactly capacity requests at once, then refuses."""
        decisions = drain(self.limiter, "alice", 101)
        self.assertTrue(all(d.allowed for d in decisions[:100]))
        self.assertEqual([d.remaining for d in decisions[:3]], [99, 98, 97])
        self.assertEqual(decisions[99].remaining, 0)
        self.assertFalse(decisions[100].allowed)

    def test_exact_refill_of_one_token(self) -> None:
        """After a refusal, window/capacity seconds give back exactly one token."""
        drain(self.limiter, "alice", 101)
        self.clock.advance(0.59)
        self.assertFalse(self.limiter.consume("alice").allowed)
        self.clock.advance(0.01)
        self.assertTrue(self.limiter.consume("alice").allowed)
        self.assertFalse(self.limiter.consume("alice").allowed)

    def test_fractional_tokens_accumulate(self) -> None:
        """Partial tokens add up across calls instead of being lost to rounding."""
        drain(self.limiter, "alice", 100)
        for _ in range(3):
            self.clock.advance(0.3)  # half a token each time
            decision = self.limiter.consume("alice")
        # 0.3 s: 0.5 token (refused), 0.6 s: 1 token (allowed), 0.9 s: 0.5.
        self.assertFalse(decision.allowed)
        self.clock.advance(0.3)
        self.assertTrue(self.limiter.consume("alice").allowed)

    def test_refill_caps_at_capacity(self) -> None:
        """A bucket idle for ages holds capacity tokens, not more."""
        drain(self.limiter, "alice", 10)
        self.clock.advance(10_000)
        self.assertEqual(self.limiter.consume("alice").remaining, 99)

    def test_refusal_does_not_spend(self) -> None:
        """Refused requests leave the bucket as it was."""
        drain(self.limiter, "alice", 100)
        drain(self.limiter, "alice", 50)
        self.clock.advance(0.6)
        self.assertTrue(self.limiter.consume("alice").allowed)

    def test_keys_are_independent(self) -> None:
        """One client's empty bucket does not limit another."""
        drain(self.limiter, "alice", 101)
        self.assertTrue(self.limiter.consume("bob").allowed)

    def test_retry_after_rounds_up(self) -> None:
        """Retry-After is the wait for one token rounded up, and at least 1."""
        slow = TokenBucketLimiter(self.clock, capacity=2, window=5)  # 2.5 s/token
        drain(slow, "alice", 2)
        refused = slow.consume("alice")
        self.assertEqual(refused.retry_after, 3)
        self.clock.advance(2.4)
        self.assertEqual(slow.consume("alice").retry_after, 1)  # 0.1 s left
        self.assertEqual(drain(self.limiter, "bob", 101)[-1].retry_after, 1)  # 0.6 s

    def test_allowed_has_no_retry_after(self) -> None:
        """An allowed decision says retry_after 0 and sends no Retry-After."""
        decision = self.limiter.consume("alice")
        self.assertEqual(decision.retry_after, 0)
        self.assertNotIn(b"Retry-After", dict(decision.headers()))

    def test_reset_after_is_time_until_full(self) -> None:
        """reset_after is the time the spent tokens take to come back."""
        decisions = drain(self.limiter, "alice", 10)
        self.assertAlmostEqual(decisions[-1].reset_after, 6.0)
        self.clock.advance(1.5)
        self.assertAlmostEqual(self.limiter.consume("alice").reset_after, 5.1)

    def test_invalid_settings_rejected(self) -> None:
        """Settings that cannot limit anything, or break headers, are refused."""
        for kwargs in (
            {"capacity": 0, "window": 60},
            {"capacity": 10, "window": 0},
            {"capacity": 10, "window": 60, "max_keys": 0},
            {"capacity": 10, "window": 60, "sweep_interval": 0},
            {"capacity": 10, "window": 60, "policy": 'a"b'},
            {"capacity": 10, "window": 60, "policy": "a:b"},
        ):
            with self.assertRaises(ValueError, msg=repr(kwargs)):
                TokenBucketLimiter(self.clock, **kwargs)  # type: ignore[arg-type]


def reference_consume(
    buckets: dict[str, float], now: float, key: str, capacity: int, window: float, policy: str
) -> Decision:
    """The bucket arithmetic of `TokenBucketLimiter.consume` spelled out, with no
    shortcut for a full bucket: what the limiter's answers must equal."""
    interval = window / capacity
    full_at = max(buckets.get(key, now), now)
    tokens = capacity - (full_at - now) / interval
    allowed = tokens >= 1 - GRACE / interval
    if allowed:
        tokens -= 1
        full_at += interval
    buckets[key] = full_at
    return _decision(allowed, tokens, capacity, window, policy)


class FullBucketTests(SynchronousTestCase):
    """A full bucket's answer is given without the arithmetic, and is the same answer."""

    def test_answers_equal_the_arithmetic(self) -> None:
        """Bursts, pauses and refills over several budgets, compared answer by answer."""
        rng = random.Random(15)
        for capacity, window in [(100, 60), (1, 1), (7, 0.3), (100_000_000, 1), (3, 3600)]:
            clock = Clock()
            clock.advance(1_700_000_000.3)
            limiter = TokenBucketLimiter(clock, capacity=capacity, window=window, policy="p")
            buckets: dict[str, float] = {}
            for _ in range(2000):
                clock.advance(rng.choice([0, 0, 0, window / capacity, window * rng.random()]))
                key = rng.choice(["alice", "bob"])
                now = clock.seconds() - limiter._epoch
                expected = reference_consume(buckets, now, key, capacity, window, "p")
                decision = limiter.consume(key)
                self.assertEqual(decision, expected)
                self.assertEqual(decision.headers(), expected.headers())

    def test_first_request_of_a_client(self) -> None:
        limiter = TokenBucketLimiter(Clock(), capacity=100, window=60)
        self.assertEqual(limiter.consume("alice"), Decision(True, 100, 99, 0.6, 0, 60))


class HeaderTests(SynchronousTestCase):
    """The response fields rendered from a decision."""

    def test_allowed_headers(self) -> None:
        """An allowed request gets the IETF draft fields and X-RateLimit-*."""
        clock = Clock()
        limiter = TokenBucketLimiter(clock, capacity=100, window=60)
        drain(limiter, "alice", 49)
        headers = limiter.consume("alice").headers()
        self.assertEqual(
            list(headers),
            [
                (b"RateLimit-Policy", b'"default";q=100;w=60'),
                (b"RateLimit", b'"default";r=50;t=30'),
                (b"X-RateLimit-Limit", b"100"),
                (b"X-RateLimit-Remaining", b"50"),
                (b"X-RateLimit-Reset", b"30"),
            ],
        )

    def test_refused_headers(self) -> None:
        """A refusal adds Retry-After, and RateLimit's t never exceeds it."""
        clock = Clock()
        limiter = TokenBucketLimiter(clock, capacity=10, window=25, policy="auth")
        headers = dict(drain(limiter, "alice", 11)[-1].headers())
        self.assertEqual(headers[b"RateLimit-Policy"], b'"auth";q=10;w=25')
        self.assertEqual(headers[b"RateLimit"], b'"auth";r=0;t=3')
        self.assertEqual(headers[b"Retry-After"], b"3")
        self.assertEqual(headers[b"X-RateLimit-Reset"], b"25")
        self.assertEqual(headers[b"X-RateLimit-Remaining"], b"0")

    def test_window_rounded_to_whole_seconds(self) -> None:
        """w is a non-zero integer even for sub-second or fractional windows."""
        decision = Decision(True, 5, 4, 0.1, 0, 0.5)
        self.assertIn((b"RateLimit-Policy", b'"default";q=5;w=1'), decision.headers())
        decision = Decision(True, 5, 4, 0.1, 0, 90.5)
        self.assertIn((b"RateLimit-Policy", b'"default";q=5;w=91'), decision.headers())

    def test_reset_rounds_up_without_float_dust(self) -> None:
        """Reset values round up, but not because of float rounding error."""
        self.assertIn((b"X-RateLimit-Reset", b"2"), Decision(True, 5, 4, 1.2, 0, 60).headers())
        self.assertIn(
            (b"X-RateLimit-Reset", b"60"),
            Decision(True, 5, 4, 60.00000000001, 0, 60).headers(),
        )


class MemoryTests(SynchronousTestCase):
    """Eviction keeps the number of buckets bounded."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_sweep_evicts_full_buckets(self) -> None:
        """The periodic sweep forgets buckets that are full again, and only those."""
        limiter = TokenBucketLimiter(self.clock, capacity=10, window=10, sweep_interval=5)
        limiter.start()
        drain(limiter, "idle", 1)  # full again after 1 s
        self.clock.advance(4)
        drain(limiter, "busy", 10)  # full again after 10 s
        self.assertEqual(len(limiter), 2)
        self.clock.advance(1)  # first sweep at t=5
        self.assertEqual(len(limiter), 1)
        self.assertEqual(limiter.consume("busy").remaining, 0)  # not forgotten
        self.clock.advance(15)
        self.assertEqual(len(limiter), 0)
        limiter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forgotten_bucket_is_full(self) -> None:
        """A swept key behaves exactly as if it had been kept."""
        limiter = TokenBucketLimiter(self.clock, capacity=3, window=3)
        drain(limiter, "alice", 3)
        self.clock.advance(3)
        limiter.sweep()
        self.assertEqual(len(limiter), 0)
        self.assertEqual(limiter.consume("alice").remaining, 2)

    def test_key_cap_drops_least_recently_touched(self) -> None:
        """At the cap, a new key pushes out the key touched longest ago."""
        limiter = TokenBucketLimiter(self.clock, capacity=2, window=60, max_keys=2)
        drain(limiter, "a", 2)
        drain(limiter, "b", 2)
        limiter.consume("a")  # refused, but touches "a"
        limiter.consume("c")  # drops "b"
        self.assertEqual(len(limiter), 2)
        self.assertFalse(limiter.consume("a").allowed)  # "a" was kept
        self.assertEqual(limiter.consume("b").remaining, 1)  # "b" starts full

    def test_memory_bounded_under_key_flood(self) -> None:
        """A flood of distinct keys never grows the table past its cap."""
        limiter = TokenBucketLimiter(self.clock, capacity=100, window=60, max_keys=10_000)
        for i in range(200_000):
            limiter.consume(f"k{i}")
        self.assertEqual(len(limiter), 10_000)
        self.assertEqual(limiter.consume("k199999").remaining, 98)


class RespTests(SynchronousTestCase):
    """The minimal RESP2 encoder and parser behind RedisLimiter."""

    def test_command_encoding(self) -> None:
        """Commands are arrays of bulk strings."""
        self.assertEqual(_command([b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")

    def test_parse_reply_types(self) -> None:
        """Each RESP2 type parses, nested arrays included."""
        buffer = b"+OK\r\n-NOSCRIPT no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n$3\r\n0.5\r\n"
        pos, replies = 0, []
        while pos < len(buffer):
            reply, pos = _parse_reply(buffer, pos)
            replies.append(reply)
        self.assertEqual(replies[0], b"OK")
        self.assertIsInstance(replies[1], RedisError)
        self.assertEqual(str(replies[1]), "NOSCRIPT no")
        self.assertEqual(replies[2:], [42, b"abc", None, [1, b"0.5"]])

    def test_parse_incomplete(self) -> None:
        """A reply cut anywhere asks for more bytes instead of misparsing."""
        whole = b"*2\r\n:1\r\n$3\r\n0.5\r\n"
        for cut in range(len(whole)):
            with self.assertRaises(_Incomplete):
                _parse_reply(whole[:cut], 0)

    def test_script_sha_matches(self) -> None:
        """The precomputed SHA is the one Redis will compute for the script."""
        self.assertEqual(BUCKET_SCRIPT_SHA, hashlib.sha1(BUCKET_SCRIPT).hexdigest().encode())
