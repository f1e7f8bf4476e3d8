"""Compute on miss: a cache in front of a table that never makes a lookup wait for the model.

A lookup answers at once from the table. A key that is missing (or stale: made by an older
model version, or older than the table's TTL) gets the OOV vector (or, under the serve-stale
policy, its old vector) and is handed to a background thread that queues it once on a
:class:`~embkv.queue.WorkQueue`; workers (:mod:`embkv.worker`) compute it and write it back,
and a later lookup finds it.

Where versions live: every row of an embkv table carries a tag word (see
:mod:`embkv.format`). Workers write ``model_version << 32 | fill time`` there together with
the vector, so one kernel pass returns the vectors and, per key, fresh / missing / stale
(:meth:`~embkv.Table.get_fresh`); a lookup whose keys are all fresh costs one table read.
Rows written without a tag (``load_table``, plain ``put``) count as fresh under every model
version and TTL: they were put there on purpose.

Why misses are queued by a thread: a queue write (a SQLite transaction, a Redis round trip)
costs 50 us to milliseconds and can block behind another process's lock; the request that
saw the miss must not pay for it. A lookup only adds the keys it has not sent lately to an
in-memory outbox (set operations, no per-key Python loop). If the process dies before the
thread sends them, nothing is lost that matters: the keys are still missing, so the next
lookup that asks for them queues them again.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue as stdqueue
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import SchemaError
from ..file.format import make_tag
from ..file.inputs import lookup_keys
from ..file.kernels import STATUS_FRESH, STATUS_MISS, STATUS_STALE
from ..file.store import Store
from ..file.table import Table
from ..metrics import LOOKUP_COUNTERS, CacheMetrics, SharedMetrics
from .queue import QueueUnavailableError, WorkQueue
from .sqlite_queue import SQLiteQueue

__all__ = ["HIT", "OOV", "STALE", "EmbeddingCache"]

# the statuses Table.get_fresh writes (one definition, in the kernels: the C kernel writes the same values)
HIT = STATUS_FRESH  # the table's vector, made by the current model version and within the TTL
OOV = STATUS_MISS  # the OOV vector: the key is missing (or stale under stale_policy="miss"); it is queued
STALE = STATUS_STALE  # the key's old vector (older model version or past the TTL); it is queued for recompute

STALE_POLICIES = ("serve", "miss")
QUEUE_RETRY_SECONDS = 1.0  # after a queue error, the sender waits this long before trying again
# seconds the sender waits for the embedded queue's lock held by another process; only the
# sender thread waits (lookups never touch the queue), so a busy worker is no reason to fail
SENDER_QUEUE_TIMEOUT = 5.0
RESEND_AFTER = 10.0  # a key still missing this long after it was sent is sent again (the queue dedups)
MAX_OUTBOX = 100_000  # keys waiting to be sent; beyond this (queue down for long) new misses are dropped
SEND_BATCH = 4096  # keys per enqueue call
# pause between enqueue calls while misses keep coming: the sender needs the GIL to prepare
# each call, and a lookup that wants it meanwhile waits, so a burst of new keys must not turn
# the sender into a busy thread: a few big calls a second instead. It caps one process at
# ~40,000 new keys/s, far more than a model computes; beyond that misses wait in the outbox,
# or (outbox full) are queued by a later lookup
SEND_INTERVAL = 0.1
METRICS_PUSH_SECONDS = 1.0  # how often this process adds its counters to the queue's shared ones
MEAN_SAMPLE = 100_000  # rows sampled for oov="mean"

def _reset_in_child(ref: weakref.ReferenceType[EmbeddingCache]) -> None:
    cache = ref()
    if cache is not None:
        cache._after_fork()


class EmbeddingCache:
    """Compute on miss around a table: lookups answer at once; misses are queued for workers.

    ``oov``: the vector served for misses: ``"zeros"``, ``"mean"`` (the mean of up to
    100,000 sampled rows, refreshed every ``mean_refresh`` seconds off the request path) or a
    ``[dim]`` vector. ``model_version``: the version fresh vectors must carry (1..2**31-1);
    older ones are stale, as are vectors older than ``ttl`` seconds (None: no TTL; fill times
    are kept in whole seconds, so ``ttl`` is at least 1). ``stale_policy``: ``"serve"``
    returns a stale vector (status STALE) while it is recomputed, ``"miss"`` treats it as a
    miss (status OOV). ``queue``: defaults to the SQLite queue beside the store. A queue that
    cannot be reached never fails a lookup: it answers from the table and the OOV vector, and
    ``queue_available`` / ``metrics()`` say so.

    Threads and processes: one cache object may serve many threads. A process forked from one
    that holds a cache gets its own sender thread and counters (the parent's are not copied).

    Example::

        store = embkv.open("/dev/shm/shop")
        store.create_table("titles", dim=384, key_type="str", tags=True, exist_ok=True)
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
        if ttl is not None and not ttl >= 1:
            raise SchemaError(f"ttl must be at least 1 second (fill times are whole seconds) or None, got {ttl!r}")
        if isinstance(model_version, bool) or not isinstance(model_version, (int, np.integer)):
            raise SchemaError(f"model_version must be an int, got {model_version!r}")
        make_tag(int(model_version), 0)  # validates the version range
        self.store = store
        self.table = require_tagged(store[name])
        self.queue = queue if queue is not None else SQLiteQueue.beside(store, name,
                                                                        busy_timeout=SENDER_QUEUE_TIMEOUT)
        if self.queue.key_type != self.table.key_type:
            raise SchemaError(f"queue keys are {self.queue.key_type}, table {name!r} keys are {self.table.key_type}")
        self._model_version = int(model_version)
        self._ttl = ttl
        self._max_age = 0 if ttl is None else max(1, round(ttl))  # fill times are whole seconds
        self._stale_policy = stale_policy
        self._stale_as_miss = stale_policy == "miss"
        self.mean_refresh = float(mean_refresh)
        self._oov_kind, oov_vector = self._parse_oov(oov)
        self._set_oov(oov_vector)
        self._mean_at = time.monotonic()
        self._closed = False  # no new misses are taken
        self._queue_closed = False  # close() closed the queue: whatever is left is dropped
        self._init_process_state()
        if self._oov_kind == "mean":
            self.refresh_mean()
        self._update_read_args()
        os.register_at_fork(after_in_child=functools.partial(_reset_in_child, weakref.ref(self)))

    def _init_process_state(self) -> None:
        """Locks, counters, outbox and sender thread of this process (fresh after a fork)."""
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()
        # calls, keys, fresh, stale: added to by the kernel inside each lookup (under the GIL);
        # a memoryview because handing it to the kernel costs less than a numpy array's buffer
        self._stats = memoryview(bytearray(32)).cast("q")
        # what the Python side counts, under self._lock: keys that turned fresh while a lookup
        # waited (they were counted as missing or stale), enqueued keys, failed queue calls
        self._counts = dict.fromkeys(("waited_from_oov", "waited_from_stale", "enqueued", "queue_errors", "refused"),
                                     0)
        self._refused_error: str | None = None
        self._pushed = dict.fromkeys(LOOKUP_COUNTERS, 0)
        self._queue_ok = True
        self._queue_error: str | None = None
        # batches of keys for the sender, or None to stop it; a SimpleQueue because its put() is one C call
        # that also wakes the sender, cheaper than a Condition on the lookup's miss path
        self._outbox: stdqueue.SimpleQueue[Iterable[Any] | None] = stdqueue.SimpleQueue()
        self._pending = 0  # keys in the outbox or being sent (under self._lock)
        self._sent_recent: set[Any] = set()
        self._sent_older: set[Any] = set()
        self._rotated_at = time.monotonic()
        self._sender: threading.Thread | None = None
        self._next_push = time.monotonic() + METRICS_PUSH_SECONDS

    def _after_fork(self) -> None:
        # only the forking thread survives: locks may be held by threads that no longer exist
        self._init_process_state()
        self._update_read_args()

    def _update_read_args(self) -> None:
        """The arguments of every lookup's read, as one tuple: a lookup reads them in one step
        (never a new version with an old OOV vector) and cheaper than five attributes."""
        self._read_args = (self._model_version, self._max_age, self._oov[1], self._stats, self._stale_as_miss)

    @property
    def model_version(self) -> int:
        """The version fresh vectors must carry (change it with :meth:`bump_model_version`)."""
        return self._model_version

    @property
    def ttl(self) -> float | None:
        """Seconds after its fill time that a vector turns stale (None: never)."""
        return self._ttl

    @property
    def stale_policy(self) -> str:
        """``"serve"``: stale vectors are served (status STALE); ``"miss"``: treated as misses."""
        return self._stale_policy

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

    def _set_oov(self, vector: np.ndarray) -> None:
        # one attribute holds both forms, so a lookup never pairs a new vector with old bytes
        vec = np.ascontiguousarray(vector, dtype=self.table.dtype)
        self._oov = (vec, vec.tobytes())
        if "_read_args" in self.__dict__:
            self._update_read_args()

    def oov_vector(self) -> np.ndarray:
        """The vector currently served for misses (a copy)."""
        return self._oov[0].copy()

    def refresh_mean(self) -> None:
        """Recompute the table mean used by ``oov="mean"`` from up to 100,000 sampled rows.

        Zeros while the table is empty. The sender thread calls this every ``mean_refresh``
        seconds, so lookups never pay for it.
        """
        keys = self.table.keys()
        if len(keys) > MEAN_SAMPLE:
            pick = np.random.default_rng().choice(len(keys), MEAN_SAMPLE, replace=False)
            keys = keys[pick] if isinstance(keys, np.ndarray) else [keys[i] for i in pick.tolist()]
        vectors, found = self.table.get(keys)
        rows = vectors[found]
        rows = rows[np.isfinite(rows).all(axis=1)]  # put() stores NaN and inf as given; the OOV vector must be finite
        mean = rows.astype(np.float64).mean(axis=0) if len(rows) else np.zeros(self.table.dim)
        self._set_oov(mean)
        self._mean_at = time.monotonic()

    # ---------------------------------------------------------------- lookups

    def lookup(self, keys: Any, wait: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``keys`` and a status per key (``HIT``, ``OOV``, ``STALE``; int8 array).

        Never waits for the model or the queue: misses get the OOV vector and are queued
        (once) by a background thread. With ``wait=seconds`` the call polls the table up to
        that long for the keys not yet fresh and returns whatever is fresh by then. Keys of
        the wrong type raise ``KeyTypeError``.
        """
        if type(keys) is not list and type(keys) is not np.ndarray:
            # once: a generator would be used up by the first read
            keys = lookup_keys(keys, self.table.key_type == "int64")
        # one kernel pass: vectors (the OOV vector for misses), statuses, and this cache's counters
        a = self._read_args  # indexed, not *unpacked: a star call costs more than the whole check
        vectors, status, fresh = self.table.get_fresh(keys, a[0], a[1], a[2], a[3], a[4])
        if fresh == len(status):  # every key fresh: the common case ends here
            return vectors, status
        return self._with_misses(keys, vectors, status, wait)

    def _with_misses(self, keys: Any, vectors: np.ndarray, status: np.ndarray,
                     wait: float | None) -> tuple[np.ndarray, np.ndarray]:
        klist = lookup_keys(keys, self.table.key_type == "int64")
        if isinstance(klist, np.ndarray):
            self._submit(klist[status != HIT].tolist())
        else:  # HIT is 0: the statuses that are true pick the keys to queue
            self._submit(list(itertools.compress(klist, status.tolist())))
        if wait is not None and wait > 0:
            self._wait(klist, vectors, status, (status != HIT).nonzero()[0], time.monotonic() + wait)
        return vectors, status

    def _wait(self, klist: Any, vectors: np.ndarray, status: np.ndarray, todo: np.ndarray, deadline: float) -> None:
        delay = 0.002
        from_oov = from_stale = 0
        while len(todo):
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.05)
            sub = klist[todo] if isinstance(klist, np.ndarray) else [klist[i] for i in todo.tolist()]
            v, s, _ = self.table.get_fresh(sub, self.model_version, self._max_age)
            now_fresh = s == HIT
            got = todo[now_fresh]
            from_stale += int(np.count_nonzero(status[got] == STALE))
            from_oov += len(got)
            vectors[got] = v[now_fresh]
            status[got] = HIT
            todo = todo[~now_fresh]
        if from_oov:
            with self._lock:
                self._counts["waited_from_oov"] += from_oov - from_stale
                self._counts["waited_from_stale"] += from_stale

    # ---------------------------------------------------------------- sending misses to the queue

    def _submit(self, keys: list[Any]) -> None:
        """Hand keys not sent lately to the sender thread (never blocks on the queue)."""
        with self._lock:
            new = set(keys).difference(self._sent_recent, self._sent_older)
            if not new or self._closed:
                return
            room = MAX_OUTBOX - self._pending
            if room <= 0:
                return  # the queue has been down a while: these keys are queued on a later miss
            batch: Any = new if len(new) <= room else list(new)[:room]
            self._sent_recent.update(batch)
            self._pending += len(batch)
            if self._sender is None:
                # the thread holds the cache weakly, so dropping the cache ends the thread
                self._sender = threading.Thread(target=_sender_main, args=(weakref.ref(self),),
                                                name=f"embkv-cache-{self.table.name}", daemon=True)
                self._sender.start()
        self._outbox.put(batch)

    def _send_step(self) -> bool:
        """One round of the sender thread: wait for misses (or the next counter push), send them.

        Returns False when the thread should end (closed, and nothing left to send).
        """
        batch: list[Any] = []
        stop = False
        try:
            item = self._outbox.get(timeout=max(0.0, self._next_push - time.monotonic()))
            while True:
                if item is None:
                    stop = True
                else:
                    batch.extend(item)
                if len(batch) >= SEND_BATCH:
                    break
                item = self._outbox.get_nowait()
        except stdqueue.Empty:
            pass
        if batch:
            self._send(batch)
            if self._pending:
                time.sleep(SEND_INTERVAL)
        now = time.monotonic()
        if now - self._rotated_at >= RESEND_AFTER or len(self._sent_recent) > MAX_OUTBOX:
            with self._lock:  # forget keys sent long ago: one still missing is sent again (the queue dedups)
                self._sent_older, self._sent_recent = self._sent_recent, set()
            self._rotated_at = now
        if now >= self._next_push or stop:
            self._push_counters()
            self._next_push = now + METRICS_PUSH_SECONDS
            if self._oov_kind == "mean" and now - self._mean_at >= self.mean_refresh:
                with contextlib.suppress(Exception):  # a failed refresh keeps the previous mean
                    self.refresh_mean()
        return not stop

    def _send(self, batch: list[Any]) -> None:
        if self._queue_closed:
            with self._lock:
                self._pending -= len(batch)
            return
        try:
            added = self.queue.enqueue(batch)
        except QueueUnavailableError as exc:
            with self._lock:
                self._pending -= len(batch)
                self._counts["enqueued"] += exc.added  # chunks that went in before the failure
                self._queue_failed(exc)
                # not sent: let the next lookup of these keys submit them again
                self._sent_recent.difference_update(batch)
                self._sent_older.difference_update(batch)
            if not self._closed:
                time.sleep(QUEUE_RETRY_SECONDS)
            return
        except Exception as exc:  # the queue refused a key (one it cannot encode, say)
            if len(batch) > 1:
                # misses of many lookups share a batch: halve it until the refused key is alone
                mid = len(batch) // 2
                self._send(batch[:mid])
                self._send(batch[mid:])
                return
            with self._lock:  # the key stays in the sent set: not retried before the next rotation
                self._pending -= 1
                self._counts["refused"] += 1
                self._refused_error = f"{type(exc).__name__} for key {batch[0]!r}: {exc}"
            return
        with self._lock:
            self._pending -= len(batch)
            self._counts["enqueued"] += added
            self._queue_ok, self._queue_error = True, None

    def _queue_failed(self, exc: Exception) -> None:
        """Record a failed queue call. Lock held."""
        self._counts["queue_errors"] += 1
        self._queue_ok = False
        self._queue_error = f"{type(exc).__name__}: {exc}"

    def _totals(self) -> dict[str, int]:
        """This process's lookup counters, kernel counts and waits combined. Lock held."""
        calls, keys, fresh, stale = self._stats.tolist()  # one read: a lookup may add meanwhile
        c = self._counts
        hits = fresh + c["waited_from_oov"] + c["waited_from_stale"]
        stale_served = stale - c["waited_from_stale"]
        return {"lookups": calls, "keys": keys, "hits": hits, "stale_served": stale_served,
                "oov_served": keys - hits - stale_served, "enqueued": c["enqueued"]}

    def _push_counters(self) -> None:
        """Add what this process counted since the last push to the queue's shared counters."""
        with self._push_lock:  # close() may push while a stuck sender wakes up: never the same deltas twice
            with self._lock:
                totals = self._totals()
                deltas = {k: totals[k] - self._pushed[k] for k in LOOKUP_COUNTERS}
                deltas = {k: v for k, v in deltas.items() if v}
            if not deltas:
                return
            try:
                self.queue.add_counters({k: float(v) for k, v in deltas.items()})
            except Exception:  # pushed later, with what is counted by then
                return
            with self._lock:
                for k, v in deltas.items():
                    self._pushed[k] += v

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the misses seen so far were handed to the queue (or failed); True if so."""
        deadline = time.monotonic() + timeout
        while self._pending:
            if time.monotonic() >= deadline or self._sender is None or not self._sender.is_alive():
                return False
            time.sleep(0.002)
        return True

    @property
    def queue_available(self) -> bool:
        """False after a queue call failed, until one succeeds again."""
        return self._queue_ok

    # ---------------------------------------------------------------- invalidation, metrics

    def bump_model_version(self, version: int | None = None) -> int:
        """Make vectors of older versions stale (this cache object); returns the new version.

        Keys the queue gave up on are queued again: the new model may well compute them.
        Workers must be started with the same version to write fresh vectors.
        """
        new = self.model_version + 1 if version is None else version
        if isinstance(new, bool) or not isinstance(new, (int, np.integer)):
            raise SchemaError(f"model version must be an int, got {new!r}")
        if new < self.model_version:
            raise SchemaError(f"model versions only go up ({self.model_version} now, {new} asked): vectors of "
                              "a newer version would count as fresh; give a rolled-back model a new number")
        make_tag(int(new), 0)
        self._model_version = int(new)
        self._update_read_args()
        with self._lock:  # keys sent for the old version must be sent again when they miss
            self._sent_recent, self._sent_older = set(), set()
        try:
            self.queue.retry_failed()
        except QueueUnavailableError as exc:
            with self._lock:
                self._queue_failed(exc)
        return self.model_version

    def metrics(self) -> CacheMetrics:
        """A snapshot of this process's counters, the queue depth and the shared totals, asked now."""
        depth: int | None = None
        shared: SharedMetrics | None = None
        try:
            # a read that works says nothing about sends (a file may be readable, not writable):
            # only a successful send clears queue_available
            depth = self.queue.depth()
            shared = SharedMetrics.from_counters(self.queue.counters())
        except QueueUnavailableError as exc:
            with self._lock:
                self._queue_failed(exc)
        with self._lock:
            t = self._totals()
            return CacheMetrics(lookups=t["lookups"], keys=t["keys"], hits=t["hits"], oov_served=t["oov_served"],
                                stale_served=t["stale_served"], enqueued=t["enqueued"],
                                queue_errors=self._counts["queue_errors"], queue_available=self._queue_ok,
                                queue_depth=depth, last_queue_error=self._queue_error,
                                refused=self._counts["refused"], last_refused=self._refused_error,
                                outbox=self._pending, shared=shared)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is waiting (up to ``timeout``), push the counters, stop the sender, close the queue.

        The store and tables belong to the caller.
        """
        with self._lock:
            self._closed = True  # first: lookups still running on other threads add no more misses
            sender = self._sender
        self.flush(timeout)
        if sender is not None and sender.is_alive():
            self._outbox.put(None)  # the sender pushes the counters one last time and ends
            sender.join(timeout)
        if sender is None or sender.is_alive():
            self._push_counters()  # no sender, or one stuck on the queue: push from here
        self._queue_closed = True
        self.queue.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sender_main(ref: weakref.ReferenceType[EmbeddingCache]) -> None:
    while True:
        cache = ref()
        if cache is None:
            return
        try:
            if not cache._send_step():
                return
        except Exception:  # a bug in one round must not stop misses from being queued for good
            time.sleep(QUEUE_RETRY_SECONDS)
        del cache  # between rounds only the weak reference remains


def require_tagged(table: Table) -> Table:
    """``table`` if its rows keep a tag word (compute on miss keeps model version and fill time there)."""
    if not table.tagged:
        raise SchemaError(f"table {table.name!r} keeps no row tags, and compute on miss stores each vector's model "
                          "version and fill time in its tag: create the table with tags=True")
    return table


def fill_tag(model_version: int, filled_at: float | None = None) -> int:
    """The row tag a worker writes: ``model_version`` and the fill time (now by default)."""
    return make_tag(model_version, time.time() if filled_at is None else filled_at)

