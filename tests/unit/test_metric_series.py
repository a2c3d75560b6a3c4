"""`CountedSeries` and `TimedSeries` expose what prometheus_client's Counter and
Histogram expose after the same updates, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from deltagw import metric_series
from deltagw.metric_series import CountedSeries, TimedSeries
from deltagw.metrics import UPSTREAM_BUCKETS

_LABELS = st.tuples(st.sampled_from(["/api/a", "/api/b/{x}", "unmatched"]),
                    st.sampled_from(["GET", "other"]))
_AMOUNTS = st.one_of(
    st.sampled_from([0.0, *UPSTREAM_BUCKETS, 1e9]),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)
_UPDATES = st.lists(st.tuples(_LABELS, _AMOUNTS), max_size=40)


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kinds stamp ``_created`` with ``time.time()``: one instant for both."""
    monkeypatch.setattr(metric_series.time, "time", lambda: 1_700_000_000.25)


@settings(max_examples=300, derandomize=True)
@given(_UPDATES)
def test_counted_series_exposes_what_a_counter_exposes(updates):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_requests", "Help text.", ("route", "method"), registry=theirs)
    series = CountedSeries("x_requests", "Help text.", ("route", "method"))
    ours.register(series)
    for labels, _ in updates:
        counter.labels(*labels).inc()
        series.series(*labels)[0] += 1
    assert generate_latest(ours) == generate_latest(theirs)


@settings(max_examples=300, derandomize=True)
@given(_UPDATES)
def test_timed_series_exposes_what_a_histogram_exposes(updates):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("x_seconds", "Help text.", ("route", "method"),
                          buckets=UPSTREAM_BUCKETS, registry=theirs)
    series = TimedSeries("x_seconds", "Help text.", ("route", "method"), UPSTREAM_BUCKETS)
    ours.register(series)
    for labels, amount in updates:
        histogram.labels(*labels).observe(amount)
        series.series(*labels).observe(amount)
    assert generate_latest(ours) == generate_latest(theirs)
