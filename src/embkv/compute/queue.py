"""Work queues of keys to compute: the interface and its SQLite and Redis Streams implementations.

A :class:`WorkQueue` holds keys whose vectors must be (re)computed. Its contract:

- **enqueue-once**: ``enqueue(keys)`` adds only keys that are not already pending (waiting, leased
  to a worker, or waiting for a retry); it returns how many were added.
- **leases**: ``claim(n, lease_seconds)`` hands out up to ``n`` ready keys as :class:`WorkItem`
  objects, leased to the caller. ``ack(items)`` removes them once their vectors are written. A
  lease that runs out (the worker died mid-batch) makes its key ready again: delivery is
  at-least-once, never at-most-once.
- **failures**: ``fail(item, error)`` records the error and schedules a retry after an
  exponential backoff (``backoff * 2**(attempts-1)``, capped at ``max_backoff``); after
  ``max_attempts`` failures the key is given up on: it stays recorded (``failures()``) and is not
  queued again until ``retry_failed()``.
- a queue that cannot be reached raises :class:`QueueUnavailableError` from every call.

Besides the work, a queue carries **shared counters**: ``add_counters({"hits": 3.0})`` adds to
named totals that every process and host using the queue sees with ``counters()``. They hold
metrics that no single process can know alone (lookups and hits served by every cache process,
fill-time histograms written by workers); they are not part of the work contract above, and
nothing in the queue reads them.

:class:`~embkv.compute.sqlite_queue.SQLiteQueue` is the embedded default (one file beside the
store, WAL mode, safe across processes, survives a restart);
:class:`~embkv.compute.redis_queue.RedisStreamQueue` uses a Redis stream with a consumer group.
Another broker (Kafka) fits by implementing the abstract methods of :class:`WorkQueue`, and
proves it by running :class:`embkv.testing.WorkQueueTests`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import EmbkvError, KeyTypeError

__all__ = [
    "FailureInfo",
    "Key",
    "QueueUnavailableError",
    "WorkItem",
    "WorkQueue",
    "check_deltas",
    "check_key_type",
    "normalize_keys",
]

Key = int | str | bytes


class QueueUnavailableError(EmbkvError, ConnectionError):
    """The work queue cannot be reached (Redis down, queue file unwritable).

    ``added``: keys an ``enqueue`` had queued before it failed (it commits in chunks), else 0.
    """

    added: int = 0


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One leased key. ``attempts``: failures so far; ``enqueued_at``: unix time of the first miss."""

    key: Key
    attempts: int
    enqueued_at: float
    token: str  # identifies the lease (SQLite) or the stream message (Redis)


@dataclasses.dataclass(frozen=True)
class FailureInfo:
    """The last error of a key whose computation failed; ``gave_up`` once ``max_attempts`` is reached."""

    attempts: int
    error: str
    gave_up: bool


def check_key_type(key_type: str) -> str:
    if key_type not in ("int64", "str"):
        raise KeyTypeError(f"key_type must be 'int64' or 'str', got {key_type!r}")
    return key_type


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def normalize_keys(keys: Iterable[Any], key_type: str) -> list[Key]:
    """Keys as plain Python ints (int64 queues) or str/bytes (str queues); KeyTypeError otherwise."""
    if type(keys) is list:  # the common case, checked without a Python loop per key
        types = set(map(type, keys))
        if key_type == "str" and types <= {str, bytes}:
            return keys
        if key_type == "int64" and types <= {int} and (not keys or (min(keys) >= _INT64_MIN
                                                                     and max(keys) <= _INT64_MAX)):
            return keys
    out: list[Key] = []
    for k in keys:
        if key_type == "int64":
            if isinstance(k, (bool, str, bytes)) or not hasattr(k, "__index__"):
                raise KeyTypeError(f"int64 queue: keys must be integers, got {type(k).__name__}")
            if not _INT64_MIN <= int(k) <= _INT64_MAX:
                raise KeyTypeError(f"int64 queue: key {int(k)} is outside the int64 range")
            out.append(int(k))
        else:
            if not isinstance(k, (str, bytes)):
                raise KeyTypeError(f"str queue: keys must be str or bytes, got {type(k).__name__}")
            out.append(k)
    return out


def check_deltas(deltas: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(name, delta)`` pairs of a counter update; TypeError/ValueError for a bad name or a non-finite delta."""
    out: list[tuple[str, float]] = []
    for name, delta in deltas.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"counter names must be non-empty str, got {name!r}")
        if isinstance(delta, (str, bytes)):  # float() would parse "3": a caller's mistake, not a number
            raise TypeError(f"counter {name!r}: delta must be a number, got {delta!r}")
        value = float(delta)
        # a NaN or inf would poison the shared total for every process, for good
        if not math.isfinite(value):
            raise ValueError(f"counter {name!r}: delta must be finite, got {value}")
        out.append((name, value))
    return out


class WorkQueue(ABC):
    """Interface of a queue of keys to compute (see the module docstring for the contract)."""

    key_type: str
    max_attempts: int
    backoff: float
    max_backoff: float

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the retry that follows failure number ``attempts`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2.0 ** max(0, attempts - 1)))

    @abstractmethod
    def enqueue(self, keys: Iterable[Any]) -> int:
        """Queue the keys not already pending or given up on; returns how many were added."""

    @abstractmethod
    def claim(self, n: int, lease_seconds: float = 30.0) -> list[WorkItem]:
        """Lease up to ``n`` ready keys (expired leases of dead workers count as ready)."""

    @abstractmethod
    def ack(self, items: Iterable[WorkItem]) -> None:
        """The items' vectors are written: remove them from the queue."""

    @abstractmethod
    def fail(self, item: WorkItem, error: str) -> bool:
        """Record a failed computation; returns True if a retry was scheduled, False if given up."""

    @abstractmethod
    def depth(self) -> int:
        """Keys pending: waiting, leased or waiting for a retry (given-up keys not counted)."""

    @abstractmethod
    def failures(self) -> dict[Key, FailureInfo]:
        """Keys whose last computation failed (retrying or given up), with the error."""

    @abstractmethod
    def retry_failed(self) -> int:
        """Queue the given-up keys again with a fresh attempt count; returns how many."""

    @abstractmethod
    def add_counters(self, deltas: Mapping[str, float]) -> None:
        """Add each delta to its named counter shared by every user of the queue, all in one
        atomic update; a name not seen before starts at 0. An empty mapping does nothing (and
        does not reach the backend). Raises ValueError for a non-finite delta."""

    @abstractmethod
    def counters(self) -> dict[str, float]:
        """The current totals of the shared counters (a name never added to is absent)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> WorkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
