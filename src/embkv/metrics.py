"""Metrics of compute on miss: what caches served, what workers computed, and how long fills took.

Each process counts on its own (a cache under its lock, a worker per batch) and adds its
deltas to the queue's shared counters (``WorkQueue.add_counters``), so the totals of every
process on a host, or on many hosts with Redis, are read back from one place. Histograms are
shared counters too: one counter per bucket, so that adding is all a process ever does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "HISTOGRAM_BOUNDS",
    "LOOKUP_COUNTERS",
    "CacheMetrics",
    "FillMetrics",
    "LookupCounts",
    "SharedMetrics",
    "WorkerMetrics",
    "histogram_counter",
    "histogram_deltas",
]

# names of the counters a cache adds to the queue's shared counters (summed over processes)
LOOKUP_COUNTERS = ("lookups", "keys", "hits", "oov_served", "stale_served", "enqueued")
# fill-time and compute-time histograms written by workers: upper bounds in seconds
HISTOGRAM_BOUNDS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, float("inf"))


def histogram_counter(prefix: str, bound: float) -> str:
    """Name of the shared counter of observations <= ``bound`` (one bucket, not cumulative)."""
    return f"{prefix}_le_{bound:g}"


def histogram_deltas(prefix: str, seconds: list[float]) -> dict[str, float]:
    """Shared-counter deltas for observations: count, sum and one bucket per observation."""
    out: dict[str, float] = {f"{prefix}_count": float(len(seconds)), f"{prefix}_seconds": float(sum(seconds))}
    idx = np.searchsorted(np.array(HISTOGRAM_BOUNDS), np.asarray(seconds, dtype=np.float64), side="left")
    for i, n in zip(*np.unique(idx, return_counts=True), strict=True):
        name = histogram_counter(prefix, HISTOGRAM_BOUNDS[int(i)])
        out[name] = out.get(name, 0.0) + float(n)
    return out


@dataclasses.dataclass(frozen=True)
class FillMetrics:
    """Observations of one kind summed over every worker: count, mean and quantile bounds.

    ``p50`` / ``p99`` are upper bounds of the histogram bucket holding that quantile (buckets:
    ``HISTOGRAM_BOUNDS``), so they read "at most"; ``mean`` is exact.
    """

    count: int
    mean: float
    p50: float
    p99: float

    @classmethod
    def from_counters(cls, counters: dict[str, float], prefix: str) -> FillMetrics | None:
        count = int(counters.get(f"{prefix}_count", 0))
        if count <= 0:
            return None
        buckets = np.array([counters.get(histogram_counter(prefix, b), 0.0) for b in HISTOGRAM_BOUNDS])
        cumulative = np.cumsum(buckets)

        def quantile(q: float) -> float:
            i = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
            return HISTOGRAM_BOUNDS[min(i, len(HISTOGRAM_BOUNDS) - 1)]

        return cls(count, counters.get(f"{prefix}_seconds", 0.0) / count, quantile(0.5), quantile(0.99))


@dataclasses.dataclass(frozen=True)
class LookupCounts:
    """What lookups served: ``keys == hits + oov_served + stale_served``; misses queued (``enqueued``)."""

    lookups: int
    keys: int
    hits: int
    oov_served: int
    stale_served: int
    enqueued: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.keys if self.keys else 0.0


@dataclasses.dataclass(frozen=True)
class SharedMetrics(LookupCounts):
    """Totals over every process and worker using the same queue (pushed every second or so).

    ``fill``: time from a key's first miss to its vector written; ``compute``: seconds per
    compute call (one batch). Either is None until a worker has reported one.
    """

    computed: int
    failed: int
    fill: FillMetrics | None
    compute: FillMetrics | None

    @classmethod
    def from_counters(cls, counters: dict[str, float]) -> SharedMetrics:
        """Read the totals out of a queue's shared counters (``WorkQueue.counters()``)."""
        def get(name: str) -> int:
            return int(counters.get(name, 0))

        return cls(lookups=get("lookups"), keys=get("keys"), hits=get("hits"), oov_served=get("oov_served"),
                   stale_served=get("stale_served"), enqueued=get("enqueued"), computed=get("computed"),
                   failed=get("failed"), fill=FillMetrics.from_counters(counters, "fill"),
                   compute=FillMetrics.from_counters(counters, "compute"))


@dataclasses.dataclass(frozen=True)
class CacheMetrics(LookupCounts):
    """A snapshot of one cache object's counters (this process), plus the shared totals.

    ``queue_depth`` is None when the queue could not be asked; ``queue_available`` is False
    after a failed queue call until a send succeeds. ``refused``: keys the queue would not take
    while it took others (``last_refused`` says why; such a key is offered again after a
    while). ``outbox``: misses waiting for the sender thread. ``shared``: the totals of every
    process and worker on this queue (None when the queue could not be asked).
    """

    queue_errors: int
    queue_available: bool
    queue_depth: int | None
    last_queue_error: str | None
    refused: int
    last_refused: str | None
    outbox: int
    shared: SharedMetrics | None


@dataclasses.dataclass(frozen=True)
class WorkerMetrics:
    """Counters of one worker. ``fill_seconds_*``: from a key's first miss to its vector written."""

    batches: int
    computed: int
    failed: int
    retried: int
    gave_up: int
    compute_seconds_total: float
    compute_seconds_max: float
    fill_seconds_total: float
    fill_seconds_max: float
    last_error: str | None

    @property
    def compute_seconds_mean(self) -> float:
        """Mean compute latency per batch."""
        return self.compute_seconds_total / self.batches if self.batches else 0.0

    @property
    def fill_seconds_mean(self) -> float:
        return self.fill_seconds_total / self.computed if self.computed else 0.0
