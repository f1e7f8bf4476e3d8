"""Compute on miss: a cache in front of a table that never makes a lookup wait for the model.

A lookup answers at once from the table. A key that is missing (or stale: made by an older
model version, or older than the table's TTL) gets the OOV vector (or, under the serve-stale
policy, its old vector) and is queued once on a :class:`~embkv.queue.WorkQueue`; workers
(:mod:`embkv.worker`) compute it and write it back, and a later lookup finds it.

Where versions live: each vector's model version and fill time are kept in a sidecar table
``<name>.__meta`` of the same store, keyed like the main table, dim 2 float64:
``[model_version, filled_at_unix]``. Workers write it right after the vectors, in the same
batch. The main table stays an ordinary embkv table, so plain readers keep working. A row
without a meta row (loaded by other means) counts as fresh. A worker killed between the two
writes leaves a new vector with an old (or no) meta row: at worst the key is recomputed once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np

from .errors import SchemaError
from .queue import QueueUnavailableError, SQLiteQueue, WorkQueue
from .store import Store
from .table import Table, as_int_keys, str_keys_as_list

__all__ = ["HIT", "OOV", "STALE", "CacheMetrics", "EmbeddingCache", "meta_table_name"]

HIT = 0    # the table's vector, made by the current model version and within the TTL
OOV = 1    # the OOV vector: the key is missing (or stale under stale_policy="miss"); it is queued
STALE = 2  # the key's old vector (older model version or past the TTL); it is queued for recompute

META_SUFFIX = ".__meta"
STALE_POLICIES = ("serve", "miss")
QUEUE_RETRY_SECONDS = 1.0  # after a queue error, lookups skip the queue this long


def meta_table_name(name: str) -> str:
    """Name of the sidecar table holding ``[model_version, filled_at]`` per key of table ``name``."""
    return name + META_SUFFIX


def open_meta_table(store: Store, table: Table) -> Table:
    return store.create_table(meta_table_name(table.name), dim=2, dtype="float64", key_type=table.key_type,
                              exist_ok=True)


LOOKUP_QUEUE_TIMEOUT = 0.05  # seconds a lookup may wait for the embedded queue's lock


@dataclasses.dataclass(frozen=True)
class CacheMetrics:
    """A snapshot of one cache object's counters (this process only).

    ``keys == hits + oov_served + stale_served``. ``queue_depth`` is None when the queue could
    not be asked; ``queue_available`` is False after a failed queue call until one succeeds.
    """

    lookups: int
    keys: int
    hits: int
    oov_served: int
    stale_served: int
    enqueued: int
    queue_errors: int
    queue_available: bool
    queue_depth: int | None
    last_queue_error: str | None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.keys if self.keys else 0.0


class EmbeddingCache:
    """Compute on miss around a table: lookups answer at once; misses are queued for workers.

    ``oov``: the vector served for misses: ``"zeros"``, ``"mean"`` (the mean of the table,
    recomputed every ``mean_refresh`` seconds) or a ``[dim]`` vector. ``model_version``: the
    version fresh vectors must carry; older ones are stale, as are vectors older than ``ttl``
    seconds (None: no TTL). ``stale_policy``: ``"serve"`` returns a stale vector (status STALE)
    while it is recomputed, ``"miss"`` treats it as a miss (status OOV). ``queue``: defaults to
    the SQLite queue beside the store. A queue that cannot be reached never fails a lookup:
    it answers from the table and the OOV vector, and ``metrics().queue_available`` says so.

    Example::

        store = embkv.open("/dev/shm/shop")
        store.create_table("titles", dim=384, key_type="str", exist_ok=True)
        cache = embkv.EmbeddingCache(store, "titles", oov="mean", model_version=3)
        vectors, status = cache.lookup(["red shoes", "blue hat"])
        # status[i] is embkv.HIT, embkv.OOV or embkv.STALE; misses are now queued for
        # `embkv worker /dev/shm/shop titles --compute mymodel:embed --model-version 3`
        vectors, status = cache.lookup(["red shoes"], wait=0.2)   # block up to 200 ms for fresh values
    """

    def __init__(self, store: Store, name: str, queue: WorkQueue | None = None, *, oov: Any = "zeros",
                 model_version: int = 1, ttl: float | None = None, stale_policy: str = "serve",
                 mean_refresh: float = 60.0) -> None:
        if stale_policy not in STALE_POLICIES:
            raise SchemaError(f"stale_policy must be one of {STALE_POLICIES}, got {stale_policy!r}")
        if ttl is not None and not ttl > 0:
            raise SchemaError(f"ttl must be positive seconds or None, got {ttl!r}")
        self.store = store
        self.table = store[name]
        self.meta = open_meta_table(store, self.table)
        # a lookup must not wait on a queue lock held by a slow or stopped worker: give up after
        # LOOKUP_QUEUE_TIMEOUT, answer with the OOV vector, and queue the key on a later lookup
        self.queue = queue if queue is not None else SQLiteQueue.beside(store, name,
                                                                        busy_timeout=LOOKUP_QUEUE_TIMEOUT)
        if self.queue.key_type != self.table.key_type:
            raise SchemaError(f"queue keys are {self.queue.key_type}, table {name!r} keys are {self.table.key_type}")
        self.model_version = int(model_version)
        self.ttl = ttl
        self.stale_policy = stale_policy
        self.mean_refresh = float(mean_refresh)
        self._oov_kind, self._oov_vector = self._parse_oov(oov)
        self._mean_at = -np.inf
        self._lock = threading.Lock()
        self._counts = dict(lookups=0, keys=0, hits=0, oov_served=0, stale_served=0, enqueued=0, queue_errors=0)
        self._queue_ok = True
        self._queue_error: str | None = None
        self._queue_retry_at = 0.0

    def __repr__(self) -> str:
        return (f"<embkv.EmbeddingCache {self.table.name!r} version={self.model_version} ttl={self.ttl} "
                f"stale={self.stale_policy} oov={self._oov_kind}>")

    # ---------------------------------------------------------------- OOV vector

    def _parse_oov(self, oov: Any) -> tuple[str, np.ndarray]:
        dim, dtype = self.table.dim, self.table.dtype
        if isinstance(oov, str):
            if oov not in ("zeros", "mean"):
                raise SchemaError(f"oov must be 'zeros', 'mean' or a vector of dim {dim}, got {oov!r}")
            return oov, np.zeros(dim, dtype=dtype)
        try:
            vec = np.asarray(oov)
            if vec.dtype.kind not in "fiu" or vec.shape != (dim,) or not np.all(np.isfinite(vec)):
                raise ValueError(f"got shape {vec.shape}, dtype {vec.dtype}")
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"oov vector must be finite numbers of shape ({dim},): {exc}") from None
        return "vector", vec.astype(dtype)

    def oov_vector(self) -> np.ndarray:
        """The vector currently served for misses (a copy)."""
        if self._oov_kind == "mean" and time.monotonic() - self._mean_at >= self.mean_refresh:
            self.refresh_mean()
        return self._oov_vector.copy()

    def refresh_mean(self) -> None:
        """Recompute the table mean used by ``oov="mean"`` (zeros while the table is empty)."""
        _keys, vectors = self.table.export()
        mean = vectors.astype(np.float64).mean(axis=0) if len(vectors) else np.zeros(self.table.dim)
        self._oov_vector = mean.astype(self.table.dtype)
        self._mean_at = time.monotonic()

    # ---------------------------------------------------------------- lookups

    def _key_list(self, keys: Any) -> Any:
        if self.table.key_type == "int64":
            return as_int_keys(keys)
        return list(str_keys_as_list(keys))

    def _classify(self, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        vectors, found = self.table.get(keys)
        meta, has_meta = self.meta.get(keys)
        status = np.where(found, HIT, OOV).astype(np.int8)
        old = has_meta & (meta[:, 0] < self.model_version)
        if self.ttl is not None:
            old |= has_meta & (meta[:, 1] + self.ttl < time.time())
        old &= found
        status[old] = STALE if self.stale_policy == "serve" else OOV
        return vectors, status

    def lookup(self, keys: Any, wait: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``keys`` and a status per key (``HIT``, ``OOV``, ``STALE``; int8 array).

        Never waits for the model: misses get the OOV vector and are queued (once). With
        ``wait=seconds`` the call polls the table up to that long for the keys not yet fresh
        and returns whatever is fresh by then. Keys of the wrong type raise ``KeyTypeError``.
        """
        klist = self._key_list(keys)
        vectors, status = self._classify(klist)
        todo = np.flatnonzero(status != HIT)
        if len(todo):
            self._enqueue([klist[i] for i in todo])
            if wait is not None and wait > 0:
                self._wait(klist, vectors, status, todo, time.monotonic() + wait)
        miss = status == OOV
        if miss.any():
            vectors[miss] = self.oov_vector()
        n = len(status)
        hits, stale = int(np.count_nonzero(status == HIT)), int(np.count_nonzero(status == STALE))
        with self._lock:
            c = self._counts
            c["lookups"] += 1
            c["keys"] += n
            c["hits"] += hits
            c["stale_served"] += stale
            c["oov_served"] += n - hits - stale
        return vectors, status

    def _wait(self, klist: Any, vectors: np.ndarray, status: np.ndarray, todo: np.ndarray, deadline: float) -> None:
        delay = 0.002
        while len(todo):
            now = time.monotonic()
            if now >= deadline:
                return
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.05)
            sub = klist[todo] if isinstance(klist, np.ndarray) else [klist[i] for i in todo]
            v, s = self._classify(sub)
            fresh = s == HIT
            vectors[todo[fresh]] = v[fresh]
            status[todo[fresh]] = HIT
            todo = todo[~fresh]

    def _enqueue(self, keys: list[Any]) -> None:
        if not self._queue_ok and time.monotonic() < self._queue_retry_at:
            return  # the queue failed a moment ago: do not make every lookup wait for a timeout
        try:
            added = self.queue.enqueue(keys)
        except QueueUnavailableError as exc:
            self._queue_down(exc)
            return
        with self._lock:
            self._counts["enqueued"] += added
            self._queue_ok, self._queue_error = True, None

    def _queue_down(self, exc: Exception) -> None:
        with self._lock:
            self._counts["queue_errors"] += 1
            self._queue_ok = False
            self._queue_error = f"{type(exc).__name__}: {exc}"
            self._queue_retry_at = time.monotonic() + QUEUE_RETRY_SECONDS

    @property
    def queue_available(self) -> bool:
        """False after a queue call failed, until one succeeds again."""
        return self._queue_ok

    # ---------------------------------------------------------------- invalidation, metrics

    def bump_model_version(self, version: int | None = None) -> int:
        """Make vectors of older versions stale (this cache object); returns the new version.

        Workers must be started with the same version to write fresh vectors.
        """
        self.model_version = self.model_version + 1 if version is None else int(version)
        return self.model_version

    def metrics(self) -> CacheMetrics:
        """A snapshot of the counters, with the queue depth asked now."""
        depth: int | None = None
        if self._queue_ok or time.monotonic() >= self._queue_retry_at:
            try:
                depth = self.queue.depth()
                self._queue_ok, self._queue_error = True, None
            except QueueUnavailableError as exc:
                self._queue_down(exc)
        with self._lock:
            c = self._counts
            return CacheMetrics(lookups=c["lookups"], keys=c["keys"], hits=c["hits"], oov_served=c["oov_served"],
                                stale_served=c["stale_served"], enqueued=c["enqueued"],
                                queue_errors=c["queue_errors"], queue_available=self._queue_ok,
                                queue_depth=depth, last_queue_error=self._queue_error)

    def close(self) -> None:
        """Close the queue connection (the store and tables belong to the caller)."""
        self.queue.close()
