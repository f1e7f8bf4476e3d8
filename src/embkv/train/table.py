"""``TrainingTable``: an embedding table to train, larger than memory, on the files embkv serves from.

Rows live in an embkv table of the store (``<name>.train``: weights and optimizer state side by
side); a hot-row cache of ``cache_bytes`` holds the rows in use, in process memory, and writes
dirty ones back when it evicts them. ``pull`` returns rows (loading misses in one batched
call, or having had a background thread load them from ``next_ids``), ``push`` runs the
optimizer on the summed gradient of each row, ``checkpoint`` makes everything durable
(checkpoint.py explains the protocol), ``publish`` writes the weights as a serving table.

Thread safety: every public method takes the table's lock; the prefetch thread takes it too,
and drops it while it reads rows. One process at a time may train a table (an ``flock`` on
``<name>.train.lock``); a second gets :class:`WriterLockedError`.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from typing import Any

import numpy as np

from ..errors import SchemaError, StalenessError, TableClosedError, WriterLockedError
from ..file.publish import check_name, is_memory_path
from ..file.store import Store
from ..file.table import Table
from .cache import HotCache, slot_bytes
from .checkpoint import TrainRecord, load_counters, record_path, remove_counters_except, save_counters
from .idmap import make_idmap
from .init import initial_vectors
from .inputs import as_ids, as_rows, last_of_duplicates
from .optimizers import Optimizer, optimizer_from_config, sum_duplicates
from .prefetch import Prefetcher

__all__ = ["TrainingTable"]

CHUNK = 65536  # rows per store call when a checkpoint writes or merges
EVICT_FRACTION = 16  # evict at least 1/16 of the cache at a time
STALENESS_WAIT = 60.0  # seconds a blocking pull waits for outstanding pushes
READ_THREADS = 8  # parallel preads when cold rows load (a disk keeps several in flight)
MAX_SEEN = 1 << 30  # ids the admission counters can follow before they refuse more
SEEN_START = 1 << 12  # the counters' map starts this big and doubles as it fills


class TrainingTable:
    """An embedding table trained in place: pull rows, push gradients, checkpoint, publish.

    Example::

        store = embkv.open("/data/rec")
        users = TrainingTable(store, "users", dim=64, optimizer=Adagrad(lr=0.05), cache_bytes=256 << 20)
        rows = users.pull(ids, next_ids=ids_of_next_batch)   # float32 [B, 64]
        users.push(ids, grads)                               # Adagrad, state beside each row
        users.checkpoint()
        users.publish(embkv.open("/dev/shm/serve"), "users")

    ``init_std`` / ``seed``: rows never stored start as N(0, init_std), seeded by (seed, id).
    ``staleness``: how many more pulls of a row may be outstanding (pulled, not yet pushed)
    beyond one; 0 makes concurrent pipelines equal to synchronous training, and a pull past
    the bound waits for the pushes (or raises :class:`StalenessError` with ``block=False``).
    ``admit_after=k``: an id gets a stored row only once ``pull`` has seen it in k calls;
    before that it reads its initial vector and its gradients are dropped. ``evict_after_steps=n``:
    rows no push touched in the last n steps are deleted at the next checkpoint. The
    table is created if missing and otherwise reopened as last checkpointed; reopening with
    another ``dim`` or another kind of optimizer raises :class:`SchemaError` naming both (the
    optimizer's settings, such as its learning rate, may change between runs).
    """

    def __init__(self, store: Store, name: str, dim: int, optimizer: Optimizer, *, cache_bytes: int = 256 << 20,
                 init_std: float = 0.01, seed: int = 0, staleness: int = 0, admit_after: int = 0,
                 evict_after_steps: int = 0) -> None:
        check_name(name)
        if not isinstance(optimizer, Optimizer):
            raise SchemaError(f"optimizer must be embkv.train.SGD, Adagrad or Adam, got {optimizer!r}")
        for label, value in (("dim", dim), ("staleness", staleness), ("admit_after", admit_after),
                             ("evict_after_steps", evict_after_steps), ("seed", seed)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise SchemaError(f"{label} must be an int >= 0, got {value!r}")
        if not 0 < dim <= 1 << 16:
            raise SchemaError(f"dim must be in 1..65536, got {dim}")
        if not (isinstance(init_std, (int, float)) and np.isfinite(init_std) and init_std >= 0):
            raise SchemaError(f"init_std must be finite and >= 0, got {init_std!r}")
        self.store = store
        self.name = name
        self.dim = int(dim)
        self.optimizer = optimizer
        self.state_dim = optimizer.state_dim(self.dim)
        self.width = self.dim + self.state_dim
        self.staleness = int(staleness)
        self._durable = not is_memory_path(store.path)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._lock_fd: int | None = self._take_trainer_lock()
        try:
            self._open(init_std, int(seed), int(admit_after), int(evict_after_steps))
            self.cache = HotCache(cache_bytes, self.width)
        except BaseException:
            self._release_trainer_lock()
            raise
        self._stats = {"pulls": 0, "pushes": 0, "hits": 0, "misses": 0, "loaded": 0, "initialized": 0,
                       "not_admitted": 0, "evictions": 0, "written_back": 0, "prefetched": 0,
                       "skipped_rows": 0, "seconds_stalled": 0.0, "checkpoints": 0}
        self._generation = 0  # bumped by evictions and checkpoints: a prefetch that spans one is dropped
        self._written_since_release = 0
        self._prefetcher = Prefetcher(self._prefetch, name=f"embkv-prefetch-{name}")

    # ---------------------------------------------------------------- open and the process lock

    def _take_trainer_lock(self) -> int:
        path = os.path.join(self.store.path, f"{self.name}.train.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterLockedError(f"training table {self.name!r} is open in another trainer process; one "
                                    "process at a time trains a table") from None
        return fd

    def _release_trainer_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open(self, init_std: float, seed: int, admit_after: int, evict_after_steps: int) -> None:
        folder = self.store.path
        self._record_path = record_path(folder, self.name)
        record = TrainRecord.load(self._record_path)
        wanted = TrainRecord(self.dim, self.optimizer.config(), float(init_std), seed, admit_after,
                             evict_after_steps)
        if record is None:
            record = wanted
            self.rows_table = self.store.create_table(f"{self.name}.train", self.width, tags=True, exist_ok=True)
            self.spill = self.store.create_table(f"{self.name}.train-spill", self.width, tags=True, exist_ok=True)
            record.save(self._record_path, self._durable)
        else:
            # another kind of optimizer keeps other state; its settings (a new lr) may change
            if (record.dim, record.optimizer.get("name")) != (self.dim, self.optimizer.name):
                raise SchemaError(
                    f"training table {self.name!r} was created with dim={record.dim} and optimizer "
                    f"{optimizer_from_config(record.optimizer)!r}; reopened with dim={self.dim} and {self.optimizer!r}")
            record.optimizer = self.optimizer.config()
            record.init_std, record.seed = float(init_std), seed  # the caller's choice for rows still unseen
            record.admit_after, record.evict_after_steps = admit_after, evict_after_steps
            self.rows_table = self.store[f"{self.name}.train"]
            # a crash while the spill table was emptied (dropped, not yet made again) leaves none
            self.spill = self.store.create_table(f"{self.name}.train-spill", self.width, tags=True, exist_ok=True)
        self.record = record
        ids, counts = load_counters(folder, self.name, record.epoch)
        self._seen = make_idmap(SEEN_START)
        self._seen_capacity = SEEN_START
        if len(ids):
            self._count(ids, counts)
        self.step = record.step
        if record.merging:
            self._merge()  # the last checkpoint committed but did not finish: finish it now
        else:
            self._empty_spill()  # rows evicted after the last checkpoint: not part of it

    # ---------------------------------------------------------------- inputs

    def _ids(self, ids: Any) -> np.ndarray:
        return as_ids(ids, self.name)

    def _rows(self, values: Any, n: int, width: int, what: str) -> np.ndarray:
        return as_rows(values, n, width, what, self.name)

    def _require_open(self) -> None:
        if self._closed:
            raise TableClosedError(f"training table {self.name!r} is closed")

    # ---------------------------------------------------------------- rows into the cache

    def _initial_rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.empty((len(ids), self.width), dtype=np.float32)
        rows[:, : self.dim] = initial_vectors(ids, self.dim, self.record.init_std, self.record.seed)
        rows[:, self.dim :] = self.optimizer.initial_state(len(ids), self.dim)
        return rows

    def _read_stored(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` from the spill table, else the checkpointed rows: (rows, found).

        Read with batched ``pread`` (``Table.read_rows``), not through the mappings: cold rows
        come from disk in parallel, and this process's memory holds the cache, not the pages read.
        """
        rows, found = (self.spill.read_rows(ids, READ_THREADS) if len(self.spill)
                       else (np.zeros((len(ids), self.width), dtype=np.float32), np.zeros(len(ids), dtype=np.bool_)))
        if not found.all():
            missing = np.flatnonzero(~found)
            more, found_more = self.rows_table.read_rows(ids[missing], READ_THREADS)
            rows[missing[found_more]] = more[found_more]
            found[missing[found_more]] = True
        return rows, found

    def _make_room(self, count: int, protect: np.ndarray, *, wait: bool = True, bulk: bool = True) -> bool:
        """Evict until ``count`` slots are free, writing dirty victims to the spill table.

        Rows pinned by outstanding pulls cannot go: if they block the room, wait for pushes on
        other threads to unpin them (a pipelined trainer), up to ``STALENESS_WAIT``.
        """
        cache = self.cache
        if cache.free >= count:
            return True
        deadline = time.monotonic() + STALENESS_WAIT
        while True:
            want = max(count - cache.free, cache.capacity // EVICT_FRACTION if bulk else 0)
            victims = cache.victims(want, protect)
            if cache.free + len(victims) >= count:
                break
            pinned = int((cache.pins > 0).sum())
            need = (count + pinned) * slot_bytes(self.width)
            ours = int((cache.pins[protect[protect >= 0]] > 0).sum())  # this batch's rows, pinned already
            if not wait:
                return False
            if time.monotonic() > deadline and count <= cache.capacity - ours:
                raise StalenessError(f"training table {self.name!r}: waited {STALENESS_WAIT:.0f}s for pushes to unpin "
                                     f"rows: {pinned:,} of {cache.capacity:,} cached rows are pulled and not pushed")
            if count > cache.capacity - ours:
                raise SchemaError(
                    f"training table {self.name!r}: cache_bytes holds {cache.capacity:,} rows, but this batch needs "
                    f"{count:,} new ones beside {pinned:,} pinned by outstanding pulls: give it at least {need:,} "
                    "bytes (or push before pulling more)")
            t0 = time.perf_counter()
            self._cond.wait(0.05)  # a push elsewhere unpins rows
            self._stats["seconds_stalled"] += time.perf_counter() - t0
        dirty = victims[cache.dirty[victims]]
        for start in range(0, len(dirty), CHUNK):
            part = dirty[start : start + CHUNK]
            self.spill.put(cache.ids[part], cache.data[part], tags=cache.last[part].astype(np.uint64))
        cache.remove(victims)
        self._stats["evictions"] += len(victims)
        self._stats["written_back"] += len(dirty)
        self._generation += 1
        self._written_since_release += len(dirty)
        if self._written_since_release * self.width * 4 > cache.capacity * self.width:  # a quarter of the cache
            self.spill.release_pages()  # written rows leave this process's memory (not the file)
            self._written_since_release = 0
        return True

    def _load(self, ids: np.ndarray, protect: np.ndarray, *, count_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Bring distinct uncached ``ids`` into the cache. Returns (slots, admitted): ids not admitted
        yet get slot -1 (their initial vector is read, nothing is stored).

        Room is made first, because making room may wait with the lock released: everything read
        after it is current, and ids another thread cached meanwhile keep that thread's slot."""
        self._make_room(len(ids), protect)
        slots = self.cache.locate(ids)
        todo = np.flatnonzero(slots < 0)
        admitted = slots >= 0
        rows, found = self._read_stored(ids[todo])
        ok = found.copy()
        fresh = np.flatnonzero(~found)
        if len(fresh):
            ok[fresh] = self._admit(ids[todo[fresh]], count_seen) if self.record.admit_after > 1 else True
            new = fresh[ok[fresh]]
            rows[new] = self._initial_rows(ids[todo[new]])
            self._stats["initialized"] += len(new)
            if count_seen:  # a pull's sighting (a push of a row not admitted is just dropped)
                self._stats["not_admitted"] += int((~ok[fresh]).sum())
        self._stats["loaded"] += int(found.sum())
        take = np.flatnonzero(ok)
        slots[todo[take]] = self.cache.insert(ids[todo[take]], rows[take], self.step, dirty=~found[take])
        admitted[todo] = ok
        return slots, admitted

    def _admit(self, ids: np.ndarray, count_seen: bool) -> np.ndarray:
        """Count one sighting of each never-stored id; True where it has now been seen admit_after times."""
        counts = np.empty(len(ids), dtype=np.int64)
        self._seen.lookup(ids, counts)
        counts = np.maximum(counts, 0) + (1 if count_seen else 0)
        admit = counts >= self.record.admit_after
        if count_seen:
            keep = ~admit
            if keep.any():
                self._count(ids[keep], counts[keep])
            self._seen.remove(ids[admit])
        return admit

    def _count(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Set admission counters, growing their map (it starts small: most tables never use it)."""
        while len(self._seen) + len(ids) > self._seen_capacity:
            if self._seen_capacity >= MAX_SEEN:
                raise SchemaError(f"training table {self.name!r}: more than {MAX_SEEN:,} ids wait for admission; "
                                  "lower admit_after")
            keys, values = self._seen.items()
            self._seen_capacity *= 2
            self._seen = make_idmap(self._seen_capacity)
            self._seen.insert(keys, values)
        self._seen.insert(np.ascontiguousarray(ids), np.ascontiguousarray(counts, dtype=np.int64))

    def _locate_or_load(self, uniq: np.ndarray, *, count_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``uniq`` (loading the misses) and which are admitted; every returned slot has
        one more pin, taken before the misses load: making room may wait (the lock released),
        and the rows found first must not be evicted meanwhile. The caller keeps or drops it."""
        cache = self.cache
        slots = cache.locate(uniq)
        hit = slots >= 0
        cache.pins[slots[hit]] += 1
        self._stats["hits"] += int(hit.sum())
        admitted = hit.copy()
        if not hit.all():
            miss = np.flatnonzero(~hit)
            self._stats["misses"] += len(miss)
            t0 = time.perf_counter()
            try:
                got, ok = self._load(uniq[miss], slots, count_seen=count_seen)
            except BaseException:
                cache.pins[slots[hit]] -= 1  # the call fails whole: its pins go too
                raise
            self._stats["seconds_stalled"] += time.perf_counter() - t0
            cache.pins[got[ok]] += 1
            slots[miss] = got
            admitted[miss] = ok
        return slots, admitted

    # ---------------------------------------------------------------- pull and push

    def pull(self, ids: Any, next_ids: Any = None, *, block: bool = True) -> np.ndarray:
        """The rows of ``ids`` (float32 [B, dim]; duplicates allowed), pinned until their push.

        ``next_ids``: the next batch's ids, loaded into the cache by a background thread while
        the model computes. A row already pulled ``staleness + 1`` times without a push makes
        the pull wait for those pushes (``block=False``: raise :class:`StalenessError`).
        """
        ids = self._ids(ids)
        nxt = None if next_ids is None else self._ids(next_ids)
        with self._lock:
            self._require_open()
            uniq, inverse = np.unique(ids, return_inverse=True)
            self._wait_for_staleness(uniq, block)
            slots, admitted = self._locate_or_load(uniq, count_seen=True)  # pinned until their push
            cached = slots[admitted]
            self.cache.last[cached] = self.step
            rows = np.empty((len(uniq), self.dim), dtype=np.float32)
            rows[admitted] = self.cache.data[cached, : self.dim]
            if not admitted.all():
                rows[~admitted] = initial_vectors(uniq[~admitted], self.dim, self.record.init_std, self.record.seed)
            self._stats["pulls"] += 1
        if nxt is not None and len(nxt):
            self.prefetch(nxt)
        result: np.ndarray = rows[inverse]
        return result

    def prefetch(self, ids: Any) -> None:
        """Have the background thread load the rows of ``ids`` into the cache (a hint: returns at once)."""
        ids = self._ids(ids)
        self._require_open()
        if len(ids):
            self._prefetcher.submit(ids)

    def release(self, ids: Any) -> None:
        """End the pulls of ``ids`` without an update (rows pulled for evaluation, or a batch
        dropped), so the staleness bound does not wait for pushes that never come."""
        ids = self._ids(ids)
        with self._lock:
            self._require_open()
            slots = self.cache.locate(np.unique(ids))
            s = slots[slots >= 0]
            self.cache.pins[s] = np.maximum(self.cache.pins[s] - 1, 0)
            self._cond.notify_all()

    def _wait_for_staleness(self, uniq: np.ndarray, block: bool) -> None:
        deadline = time.monotonic() + STALENESS_WAIT
        t0 = time.perf_counter()
        while True:
            slots = self.cache.locate(uniq)
            cached = slots[slots >= 0]
            if not len(cached) or int(self.cache.pins[cached].max()) <= self.staleness:
                break
            if not block:
                raise StalenessError(f"training table {self.name!r}: a row was pulled {self.staleness + 1} time(s) "
                                     "without a push (the staleness bound)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StalenessError(f"training table {self.name!r}: waited {STALENESS_WAIT:.0f}s for pushes of rows "
                                     f"pulled {self.staleness + 1} time(s); push what you pulled")
            self._cond.wait(left)
        self._stats["seconds_stalled"] += time.perf_counter() - t0

    def push(self, ids: Any, grads: Any, *, skip_nonfinite: bool = False) -> None:
        """Apply the optimizer to the rows of ``ids`` with ``grads`` [B, dim]; duplicates are summed first.

        NaN or inf gradients raise :class:`SchemaError` and nothing is applied, or with
        ``skip_nonfinite=True`` their rows of the batch are dropped (counted in ``stats()``).
        Ids not admitted yet are ignored.
        """
        ids = self._ids(ids)
        grads = self._rows(grads, len(ids), self.dim, "grads")
        finite = np.isfinite(grads).all(axis=1)
        if not finite.all():
            if not skip_nonfinite:
                raise SchemaError(f"training table {self.name!r}: {int((~finite).sum())} gradient row(s) hold NaN "
                                  "or inf; nothing was applied (skip_nonfinite=True drops those rows)")
            ids, grads = ids[finite], grads[finite]
        with self._lock:
            self._require_open()
            self._stats["skipped_rows"] += int((~finite).sum())
            if not len(ids):
                return
            uniq, summed = sum_duplicates(ids, grads)
            slots, admitted = self._locate_or_load(uniq, count_seen=False)
            s = slots[admitted]
            self.cache.pins[s] -= 1  # the pin _locate_or_load took; the pull's goes below
            self.step += 1
            weights = self.cache.data[s, : self.dim]
            state = self.cache.data[s, self.dim :]
            self.optimizer.update(weights, state, summed[admitted], self.step)
            self.cache.data[s, : self.dim] = weights
            self.cache.data[s, self.dim :] = state
            self.cache.dirty[s] = True
            self.cache.last[s] = self.step
            self.cache.pins[s] = np.maximum(self.cache.pins[s] - 1, 0)
            self._stats["pushes"] += 1
            self._cond.notify_all()

    def push_rows(self, ids: Any, rows: Any, state: Any = None) -> None:
        """Set the weights (and optimizer state, else its initial value) of ``ids``: a bulk load, or
        training with your own optimizer. Admission does not apply; the last of duplicates wins."""
        ids = self._ids(ids)
        rows = self._rows(rows, len(ids), self.dim, "rows")
        if not np.isfinite(rows).all():
            raise SchemaError(f"training table {self.name!r}: rows hold NaN or inf; nothing was written")
        st = (self.optimizer.initial_state(len(ids), self.dim) if state is None
              else self._rows(state, len(ids), self.state_dim, "state"))
        with self._lock:
            self._require_open()
            uniq, last = last_of_duplicates(ids)
            cache = self.cache
            slots = cache.locate(uniq)
            hit = slots[slots >= 0]
            cache.pins[hit] += 1  # making room may wait (the lock released): these must stay
            try:
                if (slots < 0).any():
                    self._make_room(int((slots < 0).sum()), slots)
            finally:
                cache.pins[hit] -= 1
            slots = cache.locate(uniq)  # another thread may have cached some meanwhile
            missing = np.flatnonzero(slots < 0)
            if len(missing):
                slots[missing] = cache.insert(uniq[missing], np.zeros((len(missing), self.width), np.float32),
                                              self.step, dirty=True)
                if self.record.admit_after > 1:
                    self._seen.remove(uniq[missing])
            self.cache.data[slots, : self.dim] = rows[last]
            self.cache.data[slots, self.dim :] = st[last]
            self.cache.dirty[slots] = True
            self.cache.last[slots] = self.step

    def pull_state(self, ids: Any) -> np.ndarray:
        """The optimizer state of ``ids`` (float32 [B, state_dim]); the initial state for ids not stored.
        Pins nothing and counts no sighting."""
        ids = self._ids(ids)
        with self._lock:
            self._require_open()
            uniq, inverse = np.unique(ids, return_inverse=True)
            out = self.optimizer.initial_state(len(uniq), self.dim)
            slots = self.cache.locate(uniq)
            hit = slots >= 0
            out[hit] = self.cache.data[slots[hit], self.dim :]
            if not hit.all():
                miss = np.flatnonzero(~hit)
                rows, found = self._read_stored(uniq[miss])
                out[miss[found]] = rows[found, self.dim :]
        result: np.ndarray = out[inverse]
        return result

    def get(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(weights [B, dim], found [B]) without pinning or admission: for evaluation. Rows not
        stored read as their initial vector, with found False."""
        ids = self._ids(ids)
        with self._lock:
            self._require_open()
            uniq, inverse = np.unique(ids, return_inverse=True)
            out = initial_vectors(uniq, self.dim, self.record.init_std, self.record.seed)
            slots = self.cache.locate(uniq)
            found = slots >= 0
            out[found] = self.cache.data[slots[found], : self.dim]
            if not found.all():
                miss = np.flatnonzero(~found)
                rows, ok = self._read_stored(uniq[miss])
                out[miss[ok]] = rows[ok, : self.dim]
                found[miss[ok]] = True
        return out[inverse], found[inverse]

    # ---------------------------------------------------------------- prefetch

    def _prefetch(self, ids: np.ndarray) -> None:
        uniq = np.unique(ids)
        with self._lock:
            if self._closed:
                return
            missing = uniq[self.cache.locate(uniq) < 0]
            generation = self._generation
        if not len(missing):
            return
        rows, found = self._read_stored(missing)  # the slow part, without the lock
        with self._lock:
            if self._closed or self._generation != generation:
                return  # an eviction or checkpoint ran meanwhile: what was read may be stale
            still = self.cache.locate(missing) < 0
            take = np.flatnonzero(found & still)
            if not len(take):
                return
            if self.cache.free < len(take):
                # a hint never waits for room: take what evicting unpinned rows gives, drop the rest
                victims = self.cache.victims(len(take) - self.cache.free, np.zeros(0, dtype=np.int64))
                take = take[: self.cache.free + len(victims)]
                if not len(take) or not self._make_room(len(take), np.zeros(0, dtype=np.int64), wait=False,
                                                        bulk=False):
                    return
            self.cache.insert(missing[take], rows[take], self.step, dirty=False)
            self._stats["prefetched"] += len(take)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Wait until the prefetch thread has loaded every ``next_ids`` given so far."""
        return self._prefetcher.wait(timeout)

    # ---------------------------------------------------------------- checkpoint

    def checkpoint(self) -> None:
        """Make every push so far durable; reopening gives exactly these rows, state and counters."""
        with self._lock:
            self._require_open()
            cache = self.cache
            dirty = np.flatnonzero(cache.dirty & cache.used)
            for start in range(0, len(dirty), CHUNK):
                part = dirty[start : start + CHUNK]
                self.spill.put(cache.ids[part], cache.data[part], tags=cache.last[part].astype(np.uint64))
            cache.dirty[dirty] = False
            _sync(self.spill)
            epoch = self.record.epoch + 1
            ids_b, counts_b = self._seen.items()
            save_counters(self.store.path, self.name, epoch, np.frombuffer(ids_b, dtype=np.int64),
                          np.frombuffer(counts_b, dtype=np.int64), self._durable)
            self.record.step, self.record.epoch, self.record.merging = self.step, epoch, True
            self.record.save(self._record_path, self._durable)  # the commit point
            self._generation += 1
            self._merge()
            self._stats["checkpoints"] += 1

    def _merge(self) -> None:
        """Fold the spill table into the checkpointed rows, evict stale rows, and empty the spill."""
        keys, vectors, tags = self.spill.export_tagged()
        for start in range(0, len(keys), CHUNK):
            self.rows_table.put(keys[start : start + CHUNK], vectors[start : start + CHUNK],
                                tags=tags[start : start + CHUNK])
        n = self.record.evict_after_steps
        if n and self.record.step > n:
            self._evict_untouched(self.record.step - n)
        _sync(self.rows_table)
        self.rows_table.release_pages()  # the merge (and any eviction scan) mapped them: let them go
        self._empty_spill()
        self.record.merging = False
        self.record.save(self._record_path, self._durable)
        remove_counters_except(self.store.path, self.name, self.record.epoch)

    def _evict_untouched(self, before_step: int) -> None:
        """Delete the stored rows no push touched since ``before_step`` (their tag says when).

        The stored tags alone decide, so a merge redone after a crash deletes the same rows;
        cached copies of them go too, unless pinned by an outstanding pull (pushed later, such
        a row is stored again as new)."""
        keys, _, tags = self.rows_table.export_tagged()
        old = keys[tags < np.uint64(before_step)]
        if hasattr(self, "cache"):
            slots = self.cache.locate(old)
            gone = slots[slots >= 0]
            self.cache.remove(gone[(self.cache.pins[gone] == 0) & ~self.cache.dirty[gone]])
        for start in range(0, len(old), CHUNK):
            self.rows_table.delete(old[start : start + CHUNK])

    def _empty_spill(self) -> None:
        if len(self.spill):
            self.store.drop_table(self.spill.name)
            self.spill = self.store.create_table(f"{self.name}.train-spill", self.width, tags=True)

    # ---------------------------------------------------------------- publish, stats, close

    def publish(self, serving_store: Store, name: str) -> Table:
        """Checkpoint, then write the weights (no optimizer state) as table ``name`` of ``serving_store``,
        published atomically: readers of that table switch to it as after ``load_table``."""
        with self._lock:
            self.checkpoint()
            keys, vectors, _ = self.rows_table.export_tagged()
            weights = np.ascontiguousarray(vectors[:, : self.dim])
        return serving_store.load_table(name, keys, weights)

    def stats(self) -> dict[str, Any]:
        """Counters since open: hits, misses, evictions, bytes cached, seconds stalled, and more."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["rows_cached"] = len(self.cache)
            out["cache_rows"] = self.cache.capacity
            out["bytes_cached"] = len(self.cache) * slot_bytes(self.width)
            out["step"] = self.step
            out["rows_stored"] = len(self.rows_table)
            out["waiting_admission"] = len(self._seen)
        out["seconds_stalled"] = round(float(out["seconds_stalled"]), 6)
        return out

    def __len__(self) -> int:
        """Rows stored as of the last checkpoint, plus rows made since."""
        with self._lock:
            stored = len(self.rows_table)
            if not len(self.cache):
                return stored
            cached = self.cache.ids[self.cache.used]
            _, found = self.rows_table.get(cached)
            return stored + int((~found).sum())

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint (unless ``checkpoint=False``: lose what came after the last one) and release the table."""
        if self._closed:
            return
        self._prefetcher.stop()
        try:
            if checkpoint:
                self.checkpoint()
        finally:
            with self._lock:
                self._closed = True
                self.cache.clear()
            self._release_trainer_lock()

    def __enter__(self) -> TrainingTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TrainingTable({self.name!r}, dim={self.dim}, optimizer={self.optimizer!r}, "
                f"step={self.step}, cache_rows={self.cache.capacity})")


def _sync(table: Table) -> None:
    """Flush a table file and empty its log: its rows survive a crash from here on."""
    with table.write_session() as session:
        session.checkpoint()
