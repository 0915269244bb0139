"""The one place that writes prometheus-client internals: ``LatencyTally``.

A proxied call observes one latency. ``Histogram.observe`` takes a lock and, with workers,
writes a shared file; ``LatencyTally`` keeps bucket counts and a sum per label set in plain
lists and adds them to the histogram child's ``_buckets`` and ``_sum`` values (prometheus-client
internals, stable for many releases) when the registry is collected.

If an upgrade removes those internals, ``_histogram_internals_present`` says so at start and
every observation goes to ``Histogram.observe`` as before: slower, never wrong.
``tests/observe/test_metrics.py`` fails when that fallback is taken, or when the exposition of tallied
observations differs from the same observations made directly.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Histogram

__all__ = ["LATENCY_TALLIES", "LatencyTally"]

# Every LatencyTally, flushed by proxy.observe.metrics.flush_tallies with the plain tallies.
LATENCY_TALLIES: list[LatencyTally] = []


def _histogram_internals_present() -> bool:
    # Read from the code that sets them up, not from a probe histogram: with workers, any
    # histogram created would appear in the shared files and so in every scrape.
    init = getattr(Histogram, "_metric_init", None)
    names = getattr(getattr(init, "__code__", None), "co_names", ())
    return "_buckets" in names and "_sum" in names


class LatencyTally:
    """Observations of one labelled Histogram, as bucket counts and a sum until someone looks.

    Flushing adds the counts to the child's bucket and sum values, which are prometheus-client
    internals (stable for many releases); if they are ever missing, observations go straight
    to the histogram, as before.
    """

    __slots__ = ("_bounds", "_direct", "_histogram", "_pending")

    def __init__(self, histogram: Histogram, buckets: tuple[float, ...]) -> None:
        self._histogram = histogram
        self._bounds = (*buckets, float("inf"))
        self._direct = not _histogram_internals_present()
        self._pending: dict[tuple[str, ...], list[float]] = {}
        LATENCY_TALLIES.append(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        if self._direct:
            self._histogram.labels(*labels).observe(value)
            return
        entry = self._pending.get(labels)
        if entry is None:
            entry = self._pending[labels] = [0.0] * (len(self._bounds) + 1)
        entry[0] += value
        # Prometheus buckets are "value <= bound": the first bound not below the value.
        entry[1 + bisect_left(self._bounds, value)] += 1

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for labels, entry in pending.items():
            child = self._histogram.labels(*labels)
            child._sum.inc(entry[0])
            for bucket, n in zip(child._buckets, entry[1:], strict=True):
                if n:
                    bucket.inc(n)
