"""The in-memory limiter under a flood of distinct clients, measured with tracemalloc.

Long runs (tens of seconds under tracemalloc): a soak, not a unit test.
"""

from __future__ import annotations

import tracemalloc

import pytest
from twisted.internet.task import Clock

from deltagw.policy.buckets import TokenBucketLimiter


def _memory_after_burst(keys: int) -> tuple[int, float, float]:
    """Bytes still allocated by the limiter after ``keys`` clients and a sweep."""
    clock = Clock()
    limiter = TokenBucketLimiter(clock, 100, 60)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(keys):
            limiter.consume(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        during = tracemalloc.get_traced_memory()[0] - baseline
        clock.advance(61)
        limiter.sweep()
        after = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    return len(limiter), during, after


def test_sweep_gives_memory_back():
    """After a burst of distinct clients and a sweep, the buckets' memory is released."""
    tracked, during, after = _memory_after_burst(100_000)
    assert tracked == 0
    assert during > 5_000_000
    assert after < 100_000


@pytest.mark.soak
def test_million_addresses_memory_bounded_and_returned():
    """A million distinct addresses: tracked keys stay at the cap, memory returns after the sweep."""
    tracked, during, after = _memory_after_burst(1_000_000)
    assert tracked == 0
    assert during < 40_000_000
    assert after < 100_000
