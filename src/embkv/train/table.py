"""``TrainingTable``: an embedding table to train, larger than memory, on the files embkv serves from.

Rows live in embkv tables of the store (stored.py: the last checkpoint's rows and a spill of
what came since, weights and optimizer state side by side); a hot-row cache of ``cache_bytes``
holds the rows in use and writes dirty ones back when it evicts them. ``pull`` returns rows
(misses loaded in one batched call, or by a background thread from ``next_ids``), ``push`` runs
the optimizer, ``checkpoint`` makes everything durable (checkpoint.py), ``publish`` writes the
weights as a serving table. It is also an :class:`embkv.EmbeddingTable` over its weights.

Thread safety: every public method takes the table's lock; the prefetch thread takes it too,
and drops it while it reads rows. Processes: one sole trainer, or several opened with
``shared=True`` (locks.py); see :class:`TrainingTable` for what shared trainers may expect.
Do not use a table in a process forked from its trainer: open it again there.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Literal

import numpy as np

from ..errors import SchemaError, StalenessError, TableClosedError
from ..file.publish import check_name, is_memory_path
from ..file.store import Store
from ..file.table import Table
from ..interface import Capabilities
from .admission import AdmissionCounters
from .cache import HotCache, slot_bytes
from .checkpoint import TrainRecord, load_counters, record_path, remove_counters_except, save_counters
from .init import initial_vectors
from .inputs import as_ids, as_rows, check_settings, last_of_duplicates
from .locks import TrainerLocks
from .optimizers import Optimizer, optimizer_from_config, sum_duplicates
from .prefetch import Prefetcher
from .stored import CHUNK, StoredRows
from .view import WeightsView

__all__ = ["TrainingTable"]

EVICT_FRACTION = 16  # evict at least 1/16 of the cache at a time
STALENESS_WAIT = 60.0  # seconds a blocking pull waits for outstanding pushes


class TrainingTable(WeightsView):
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

    ``shared=True``: several trainer processes of this host train the table together (a sole
    trainer and shared ones refuse each other: :class:`WriterLockedError`). Each push reads the
    current rows, updates them and writes them back in one put, under a lock taken in turn: no
    update lost or half applied, a step each. A pull sees the last push of any trainer (a
    gradient may meet a row changed since its pull: asynchronous SGD); the staleness bound is
    per process; any trainer's checkpoint covers every trainer's pushes. The page cache, shared
    by all, caches the rows (``cache_bytes`` bounds each one's pulled rows); ``admit_after``
    needs a sole trainer; a merge cut short by a kill is finished by the next checkpoint or open.

    As an :class:`embkv.EmbeddingTable`: int64 keys, float32 weights (not the state); a row
    exists once put or pushed (a sole trainer's also once pulled and admitted); ``put`` is
    ``push_rows`` (NaN and inf refused); ``delete`` acts on the cache now and on the files at the
    next checkpoint, when writes become durable; ``len`` and ``keys`` scan the stored keys.
    """

    dtype = np.dtype(np.float32)
    key_type: Literal["int64", "str"] = "int64"
    capabilities = Capabilities(writable=True, durable=False, tagged=False, shared_across_processes=False)

    def __init__(self, store: Store, name: str, dim: int, optimizer: Optimizer, *, cache_bytes: int = 256 << 20,
                 init_std: float = 0.01, seed: int = 0, staleness: int = 0, admit_after: int = 0,
                 evict_after_steps: int = 0, shared: bool = False) -> None:
        check_name(name)
        check_settings(dim, optimizer, cache_bytes=cache_bytes, init_std=init_std, seed=seed, staleness=staleness,
                       admit_after=admit_after, evict_after_steps=evict_after_steps, shared=shared)
        self.store = store
        self.name = name
        self.dim = int(dim)
        self.optimizer = optimizer
        self.state_dim = optimizer.state_dim(self.dim)
        self.width = self.dim + self.state_dim
        self.staleness = int(staleness)
        self.shared = bool(shared)
        self._durable = not is_memory_path(store.path)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._pid = os.getpid()
        self._stats = {"pulls": 0, "pushes": 0, "hits": 0, "misses": 0, "loaded": 0, "initialized": 0,
                       "not_admitted": 0, "evictions": 0, "written_back": 0, "prefetched": 0,
                       "skipped_rows": 0, "seconds_stalled": 0.0, "checkpoints": 0}
        self._generation = 0  # bumped by whatever changes rows behind the cache: a prefetch spanning it is dropped
        self._locks = TrainerLocks(store.path, name, self.shared)
        try:
            self._open(init_std, int(seed), int(admit_after), int(evict_after_steps))
            self.cache = HotCache(int(cache_bytes), self.width)
            self._prefetcher = Prefetcher(self._prefetch, name=f"embkv-prefetch-{name}")
        except BaseException:
            self._locks.close()
            raise

    def _open(self, init_std: float, seed: int, admit_after: int, evict_after_steps: int) -> None:
        folder = self.store.path
        self._record_path = record_path(folder, self.name)
        record = TrainRecord.load(self._record_path)
        wanted = TrainRecord(self.dim, self.optimizer.config(), float(init_std), seed, admit_after,
                             evict_after_steps)
        if record is not None and (record.dim, record.optimizer.get("name")) != (self.dim, self.optimizer.name):
            # another kind of optimizer keeps other state; its settings (a new lr) may change
            raise SchemaError(
                f"training table {self.name!r} was created with dim={record.dim} and optimizer "
                f"{optimizer_from_config(record.optimizer)!r}; reopened with dim={self.dim} and {self.optimizer!r}")
        self.stored = StoredRows(self.store, self.name, self.width, create=record is None, shared=self.shared)
        if record is None:
            record = wanted
            record.save(self._record_path, self._durable)
        self.record = record.with_settings(wanted)  # the settings are the caller's, the progress the record's
        ids, counts = load_counters(folder, self.name, record.epoch)
        self._seen = AdmissionCounters(self.name, admit_after)
        if len(ids):
            self._seen.set(ids, counts)
        self.step = record.step
        if self._locks.first:  # no other trainer has it open: recover what a crash left
            self.stored.remove_stale_publish_files()
            if record.merging:
                self._merge()  # the last checkpoint committed but did not finish: finish it now
            else:
                self.stored.empty_spill()  # rows written after the last checkpoint: not part of it
            if self.shared:
                self._locks.write_step(self.step)
        elif self.shared:
            self.step = self._locks.read_step()
        self._locks.joined()

    # ---------------------------------------------------------------- inputs

    def _require_open(self) -> None:
        if self._closed:
            raise TableClosedError(f"training table {self.name!r} is closed")
        if os.getpid() != self._pid:  # its cache and locks are the parent's
            raise TableClosedError(f"training table {self.name!r} was opened by process {self._pid}: a forked "
                                   "child opens the table again")

    # ---------------------------------------------------------------- rows into the cache

    def _initial_rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.empty((len(ids), self.width), dtype=np.float32)
        rows[:, : self.dim] = initial_vectors(ids, self.dim, self.record.init_std, self.record.seed)
        rows[:, self.dim :] = self.optimizer.initial_state(len(ids), self.dim)
        return rows

    def _rows_now(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (weights | state) of distinct ids as they are now, and which exist: the cached copy,
        else the stored row. A shared trainer reads every row from the files (other trainers
        write there); a row that does not exist reads as its initial value."""
        if self.shared:
            rows, found = self.stored.read(uniq)
        else:
            slots = self.cache.locate(uniq)
            found = slots >= 0
            rows = np.empty((len(uniq), self.width), dtype=np.float32)
            rows[found] = self.cache.data[slots[found]]
            miss = np.flatnonzero(~found)
            if len(miss):
                rows[miss], found[miss] = self.stored.read(uniq[miss])
        if not found.all():
            rows[~found] = self._initial_rows(uniq[~found])
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
        self._write_back(dirty)
        cache.remove(victims)
        self._stats["evictions"] += len(victims)
        self._stats["written_back"] += len(dirty)
        self._generation += 1
        return True

    def _write_back(self, slots: np.ndarray) -> None:
        """Spill the rows of these cache slots, a chunk at a time (a copy of the chunk, not of all)."""
        cache = self.cache
        for start in range(0, len(slots), CHUNK):
            part = slots[start : start + CHUNK]
            self.stored.write(cache.ids[part], cache.data[part], cache.last[part])

    def _load(self, ids: np.ndarray, protect: np.ndarray, *, count_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Bring distinct uncached ``ids`` into the cache. Returns (slots, admitted): ids not admitted
        yet get slot -1 (their initial vector is read, nothing is stored).

        Room is made first, because making room may wait with the lock released: everything read
        after it is current, and ids another thread cached meanwhile keep that thread's slot."""
        self._make_room(len(ids), protect)
        slots = self.cache.locate(ids)
        todo = np.flatnonzero(slots < 0)
        admitted = slots >= 0
        rows, found = self.stored.read(ids[todo])
        ok = found.copy()
        fresh = np.flatnonzero(~found)
        if len(fresh):
            ok[fresh] = self._seen.admit(ids[todo[fresh]], count_seen) if self.record.admit_after > 1 else True
            new = fresh[ok[fresh]]
            rows[new] = self._initial_rows(ids[todo[new]])
            self._stats["initialized"] += len(new)
            if count_seen:  # a pull's sighting (a push of a row not admitted is just dropped)
                self._stats["not_admitted"] += int((~ok[fresh]).sum())
        self._stats["loaded"] += int(found.sum())
        take = np.flatnonzero(ok)
        # a shared trainer writes every change through: its cached rows are never dirty
        slots[todo[take]] = self.cache.insert(ids[todo[take]], rows[take], self.step,
                                              dirty=False if self.shared else ~found[take])
        admitted[todo] = ok
        return slots, admitted

    def _locate_or_load(self, uniq: np.ndarray, *, count_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``uniq`` (loading the misses) and which are admitted; every returned slot has
        one more pin, taken before the misses load: making room may wait (the lock released),
        and the rows found first must not be evicted meanwhile. The caller keeps or drops it."""
        cache = self.cache
        while True:
            slots = cache.locate(uniq)
            hit = slots >= 0
            cache.pins[slots[hit]] += 1
            admitted = hit.copy()
            if hit.all():
                break
            miss = np.flatnonzero(~hit)
            t0 = time.perf_counter()
            try:
                got, ok = self._load(uniq[miss], slots, count_seen=count_seen)
            except BaseException:
                cache.pins[slots[hit]] -= 1  # the call fails whole: its pins go too
                raise
            self._stats["seconds_stalled"] += time.perf_counter() - t0
            kept = cache.locate(uniq[hit]) == slots[hit]
            if not kept.all():  # a delete freed hit rows while the load waited: their slots may be
                cache.pins[slots[hit][kept]] -= 1  # another id's now, so look them all up again
                continue
            cache.pins[got[ok]] += 1
            slots[miss] = got
            admitted[miss] = ok
            self._stats["misses"] += len(miss)
            break
        self._stats["hits"] += int(hit.sum())
        return slots, admitted

    # ---------------------------------------------------------------- pull and push

    def pull(self, ids: Any, next_ids: Any = None, *, block: bool = True) -> np.ndarray:
        """The rows of ``ids`` (float32 [B, dim]; duplicates allowed), pinned until their push.

        ``next_ids``: the next batch's ids, loaded into the cache by a background thread while
        the model computes. A row already pulled ``staleness + 1`` times without a push makes
        the pull wait for those pushes (``block=False``: raise :class:`StalenessError`).
        """
        ids = as_ids(ids, self.name)
        nxt = None if next_ids is None else as_ids(next_ids, self.name)
        with self._lock:
            self._require_open()
            uniq, inverse = np.unique(ids, return_inverse=True)
            self._wait_for_staleness(uniq, block)
            slots, admitted = self._locate_or_load(uniq, count_seen=True)  # pinned until their push
            cached = slots[admitted]
            if self.shared and len(cached):  # other trainers may have pushed since these were cached
                self.cache.data[cached] = self._rows_now(uniq[admitted])[0]
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
        ids = as_ids(ids, self.name)
        self._require_open()
        if len(ids):
            self._prefetcher.submit(ids)

    def release(self, ids: Any) -> None:
        """End the pulls of ``ids`` without an update (rows pulled for evaluation, or a batch
        dropped), so the staleness bound does not wait for pushes that never come."""
        ids = as_ids(ids, self.name)
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
        ids = as_ids(ids, self.name)
        grads = as_rows(grads, len(ids), self.dim, "grads", self.name)
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
            with self._locks.mutex():
                if self.shared:  # the update applies to the row as the last push of any trainer left it
                    self.cache.data[s] = self._rows_now(uniq[admitted])[0]
                    self.step = self._locks.read_step()
                self.step += 1
                weights = self.cache.data[s, : self.dim]
                state = self.cache.data[s, self.dim :]
                self.optimizer.update(weights, state, summed[admitted], self.step)
                self.cache.data[s, : self.dim] = weights
                self.cache.data[s, self.dim :] = state
                self.cache.last[s] = self.step
                if self.shared:  # the step first: a trainer killed after it leaves a gap, not a step used twice
                    self._locks.write_step(self.step)
                    # (no generation bump: a shared pull rereads its rows from the files anyway)
                    self.stored.write(uniq[admitted], self.cache.data[s], self.cache.last[s], atomic=True)
                else:
                    self.cache.dirty[s] = True
            self.cache.pins[s] = np.maximum(self.cache.pins[s] - 1, 0)
            self._stats["pushes"] += 1
            self._cond.notify_all()

    def push_rows(self, ids: Any, rows: Any, state: Any = None) -> None:
        """Set the weights (and optimizer state, else its initial value) of ``ids``: a bulk load, or
        training with your own optimizer. Admission does not apply; the last of duplicates wins."""
        ids = as_ids(ids, self.name)
        rows = as_rows(rows, len(ids), self.dim, "rows", self.name)
        st = (self.optimizer.initial_state(len(ids), self.dim) if state is None
              else as_rows(state, len(ids), self.state_dim, "state", self.name))
        if not (np.isfinite(rows).all() and np.isfinite(st).all()):
            raise SchemaError(f"training table {self.name!r}: rows or state hold NaN or inf; nothing was written")
        with self._lock:
            self._require_open()
            if not len(ids):
                return
            uniq, last = last_of_duplicates(ids)
            full = np.concatenate([rows[last], st[last]], axis=1)
            self._seen.forget(uniq)
            bulk = int((self.cache.locate(uniq) < 0).sum()) > self.cache.capacity // 4
            if self.shared or bulk:  # straight to the files; cached copies follow
                self._generation += 1  # a prefetch reading these rows meanwhile must not cache the old ones
                with self._locks.mutex():
                    step = self._locks.read_step() if self.shared else self.step
                    self.stored.write(uniq, full, np.full(len(uniq), step), atomic=self.shared)
                slots = self.cache.locate(uniq)
                self.cache.data[slots[slots >= 0]] = full[slots >= 0]
                self.cache.dirty[slots[slots >= 0]] = False  # the spill has them now
                return
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
                slots[missing] = cache.insert(uniq[missing], full[missing], self.step, dirty=True)
            cache.data[slots] = full
            cache.dirty[slots] = True
            cache.last[slots] = self.step

    def read(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [B, dim + state_dim], exists [B])``: weights and optimizer state as they are now,
        the initial values where no row exists. Pins nothing and counts no sighting."""
        ids = as_ids(ids, self.name)
        with self._lock:
            self._require_open()
            uniq, inverse = np.unique(ids, return_inverse=True)
            rows, found = self._rows_now(uniq)
        return rows[inverse], found[inverse]

    def pull_state(self, ids: Any) -> np.ndarray:
        """The optimizer state of ``ids`` (float32 [B, state_dim]), as :meth:`read` finds it."""
        return np.ascontiguousarray(self.read(ids)[0][:, self.dim :])

    def weights(self, ids: Any) -> np.ndarray:
        """The model's view of ``ids`` (float32 [B, dim]) for evaluation: the weights, and the
        initial vector of ids without a row. Pins nothing and counts no sighting."""
        return np.ascontiguousarray(self.read(ids)[0][:, : self.dim])

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
        rows, found = self.stored.read(missing)  # the slow part, without the lock
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
        """Make every push so far durable; reopening gives exactly these rows, state and counters.

        Shared trainers: one checkpoint makes every trainer's pushes so far durable."""
        with self._lock:
            self._require_open()
            cache = self.cache
            dirty = np.flatnonzero(cache.dirty & cache.used)
            with self._locks.mutex():
                self._write_back(dirty)
                cache.dirty[dirty] = False
                if self.shared:  # another trainer's checkpoint may have come since this one opened
                    on_disk = TrainRecord.load(self._record_path)
                    if on_disk is None:
                        raise SchemaError(f"training table {self.name!r}: its record {self._record_path} is gone")
                    self.record = on_disk.with_settings(self.record)
                    self.step = self._locks.read_step()
                    if self.record.merging:
                        self._merge()  # a trainer died in its merge: finish it first
                self.stored.sync_spill()
                epoch = self.record.epoch + 1
                ids, counts = self._seen.items()
                save_counters(self.store.path, self.name, epoch, ids, counts, self._durable)
                self.record.step, self.record.epoch, self.record.merging = self.step, epoch, True
                self.record.save(self._record_path, self._durable)  # the commit point
                self._generation += 1
                self._merge()
            self._stats["checkpoints"] += 1

    def _merge(self) -> None:
        """Fold the spill table into the checkpointed rows, evict stale rows, and empty the spill."""
        n = self.record.evict_after_steps
        evicted = self.stored.merge(self.record.step - n if n and self.record.step > n else 0)
        if len(evicted) and hasattr(self, "cache"):  # cached copies go too, unless pinned or changed
            slots = self.cache.locate(evicted)
            gone = slots[slots >= 0]
            self.cache.remove(gone[(self.cache.pins[gone] == 0) & ~self.cache.dirty[gone]])
        self.record.merging = False
        self.record.save(self._record_path, self._durable)
        remove_counters_except(self.store.path, self.name, self.record.epoch)

    # ---------------------------------------------------------------- the table interface

    def put(self, keys: Any, vectors: Any, tags: Any = None) -> None:
        """:meth:`push_rows` with the initial optimizer state (training rows keep no tags of yours)."""
        if tags is not None:
            raise SchemaError(f"training table {self.name!r} keeps no row tags of yours (its tags are steps)")
        self.push_rows(keys, vectors)

    def delete(self, keys: Any) -> int:
        """Remove rows (and their state) now; the files lose them at the next checkpoint. Returns
        how many existed. Pulls of them still outstanding end: a push of such a pull, like any
        push of an id without a row, starts the row anew from its initial vector."""
        ids = as_ids(keys, self.name)
        with self._lock:
            self._require_open()
            if not len(ids):
                return 0
            uniq = np.unique(ids)
            with self._locks.mutex():
                stored = self.stored.read(uniq)[1]
                slots = self.cache.locate(uniq)
                found = stored if self.shared else stored | (slots >= 0)  # as _rows_now counts a row
                self.cache.remove(slots[slots >= 0])
                self.stored.delete(uniq[stored])
                self._seen.forget(uniq)
                self._generation += 1
            self._cond.notify_all()
            return int(found.sum())

    def keys(self) -> np.ndarray:
        """The ids that have a row now (sorted int64): a scan of the stored keys."""
        with self._lock, self._locks.mutex():
            self._require_open()
            stored = self.stored.keys()
            if self.shared:
                return stored
            result: np.ndarray = np.union1d(stored, self.cache.ids[self.cache.used])
            return result

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """Every ``(ids, weights)`` that exists now (sorted by id), in one snapshot: no other
        thread, nor another shared trainer, changes rows between the scan and the reads."""
        with self._lock, self._locks.mutex():
            keys = self.keys()
            rows, found = self.read(keys)
        return keys[found], np.ascontiguousarray(rows[found, : self.dim])

    def info(self) -> dict[str, Any]:
        """Schema and counts: name, dim, dtype, key_type, rows, and the training settings."""
        with self._lock:
            self._require_open()
            r = self.record
            return dict(name=self.name, dim=self.dim, dtype="float32", key_type="int64", rows=len(self), kind="train",
                        optimizer=self.optimizer.config(), state_dim=self.state_dim, step=self.step, epoch=r.epoch,
                        shared=self.shared, cache_rows=self.cache.capacity, staleness=self.staleness,
                        admit_after=r.admit_after, evict_after_steps=r.evict_after_steps)

    # ---------------------------------------------------------------- publish, stats, close

    def publish(self, serving_store: Store, name: str) -> Table:
        """Checkpoint, then write the weights (no optimizer state) as table ``name`` of ``serving_store``,
        published atomically: readers of that table switch to it as after ``load_table``.

        The weights stream through a temporary ``.npy`` file beside the training table, so a table
        larger than memory publishes in this process's memory of its keys (8 bytes a row)."""
        with self._lock, self._locks.mutex():  # no other trainer's checkpoint while the rows stream
            self.checkpoint()
            return self.stored.publish_weights(serving_store, name, self.dim)

    def stats(self) -> dict[str, Any]:
        """Counters since open: hits, misses, evictions, bytes cached, seconds stalled, and more."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats, rows_cached=len(self.cache), cache_rows=self.cache.capacity,
                                       bytes_cached=len(self.cache) * slot_bytes(self.width), step=self.step,
                                       rows_checkpointed=len(self.stored.rows), waiting_admission=len(self._seen))
        out["seconds_stalled"] = round(float(out["seconds_stalled"]), 6)
        return out

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint (unless ``checkpoint=False``: lose what came after the last one) and release the table.

        A shared trainer's pushes are in the files already: ``checkpoint=False`` leaves them to
        the next checkpoint of another trainer."""
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
            self._locks.close()

    def __enter__(self) -> TrainingTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainingTable({self.name!r}, dim={self.dim}, optimizer={self.optimizer!r}, step={self.step})"

