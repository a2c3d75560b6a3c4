"""Request, trace and span ids come from the OS's randomness, pooled."""

from __future__ import annotations

import re

from deltagw.web.request_identity import random_hex, request_id, trace_context


def test_ids_are_hex_of_the_asked_size_and_never_repeat_across_refills() -> None:
    """Thousands of ids, crossing many refills of the pool, are well-formed and all distinct."""
    ids = [random_hex(16) for _ in range(3000)]
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert re.fullmatch(rb"[0-9a-f]{14}", random_hex(7))


def test_new_request_and_trace_ids_are_fresh_each_time() -> None:
    """Without an incoming id or trace, each request gets new ones, in their standard shapes."""
    assert request_id(None) != request_id(None)
    first, second = trace_context([], []), trace_context([], [])
    assert first.trace_id != second.trace_id
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-00", first.traceparent())
    assert first.traceparent() != first.traceparent()  # a new span each call
