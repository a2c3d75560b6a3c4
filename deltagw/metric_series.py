"""Counters and histograms counted in plain numbers, exposed as prometheus_client's.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock
and make three or four calls for every update, so that any thread may
update them. Every request updates three or four series, from the
reactor's one thread: those updates were a sixteenth of a cache hit's CPU
(``make bench``). The series here are a number in a list (a counter) or a
row of bucket counts and a sum (a histogram), and a collector turns them
into prometheus_client's metric families when scraped, with the samples
prometheus_client's own would write: ``_total`` and ``_created`` for a
counter; cumulative ``_bucket`` lines, ``_count``, ``_sum`` and
``_created`` for a histogram, series in the order they were first used.
``tests/unit/test_metric_series.py`` compares the exposition of both.

They are updated from the reactor's thread only; a scrape (also on the
reactor's thread) reads them.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class CountedSeries:
    """A labelled counter: ``series(*labels)`` gives the ``[count]`` to add to.

    Args:
        name: The family's name, without ``_total``.
        documentation: Its HELP text.
        labels: Its label names.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self._counts: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def series(self, *labels: str) -> list[float]:
        """The one-item list holding the count of ``labels``' series, made at 0 when new."""
        count = self._counts.get(labels)
        if count is None:
            count = self._counts[labels] = [0.0]
            self._created[labels] = time.time()
        return count

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, (count,) in self._counts.items():
            family.add_metric(labels, count, created=self._created[labels])
        return [family]


class Timings:
    """One histogram series: bucket counts (not cumulative) and the sum observed."""

    __slots__ = ("_bounds", "counts", "total", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is at least it."""
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.total += amount


class TimedSeries:
    """A labelled histogram: ``series(*labels)`` gives the `Timings` to observe into.

    Args:
        name: The family's name.
        documentation: Its HELP text.
        labels: Its label names.
        buckets: The finite upper bounds, ascending; +Inf is added.
    """

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self._bounds = (*(float(bound) for bound in buckets), math.inf)
        self._bound_labels = [floatToGoString(bound) for bound in self._bounds]
        self._series: dict[tuple[str, ...], Timings] = {}

    def series(self, *labels: str) -> Timings:
        """The `Timings` of ``labels``' series, made empty when new."""
        timings = self._series.get(labels)
        if timings is None:
            timings = self._series[labels] = Timings(self._bounds)
        return timings

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, timings in self._series.items():
            cumulative = 0.0
            buckets = []
            for bound, count in zip(self._bound_labels, timings.counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(labels, buckets, timings.total)
            family.add_sample(self.name + "_created", dict(zip(self.labels, labels)),
                              timings.created)
        return [family]
