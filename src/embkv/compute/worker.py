"""Workers of compute on miss: claim queued keys in batches, compute, validate, write back, ack.

A :class:`Worker` loops: ``claim`` a batch from the :class:`~embkv.queue.WorkQueue` (leased for
``lease_seconds``), call the compute function with the list of keys, check what it returned
(an array of shape ``[B, dim]``, real numbers castable to the table's dtype, finite after the
cast), write the good rows to the table, each tagged with ``model_version`` and the fill time
(see :mod:`embkv.cache`), in one batch, then ``ack`` them. Fill times (first miss to vector
written) and compute times go to the queue's shared counters as histograms, so a cache's
``metrics().shared`` sees every worker. Bad rows are failed with a clear error and
retried with backoff. A compute function that raises for a batch is called again key by key,
so one bad key fails alone. A worker killed mid-batch acks nothing: its lease runs out and
another worker takes the keys (at-least-once).

Run one with ``embkv worker STORE TABLE --compute module:function``, in a thread with
:func:`run_in_thread` or in a process with :func:`run_in_process`.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.process
import multiprocessing.synchronize
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from ..errors import EmbkvError, SchemaError
from ..file.codec import decode_rows, encode_rows
from ..file.store import Store, open_store
from ..metrics import WorkerMetrics, histogram_deltas
from .cache import fill_tag, require_tagged
from .queue import Key, QueueUnavailableError, WorkItem, WorkQueue
from .redis_queue import RedisStreamQueue
from .sqlite_queue import SQLiteQueue

__all__ = ["Worker", "WorkerMetrics", "WorkerProcess", "WorkerThread", "load_compute", "open_queue",
           "run_in_process", "run_in_thread"]

ComputeFn = Callable[[list[Key]], Any]


def load_compute(spec: str | ComputeFn) -> ComputeFn:
    """A compute function from ``"module:function"`` (the current folder is importable), or as given."""
    if callable(spec):
        return spec
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise SchemaError(f"compute must be 'module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise SchemaError(f"cannot load compute {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise SchemaError(f"{spec!r} is not callable")
    return cast(ComputeFn, fn)


def open_queue(spec: str | None, store: Store, table: str, **kwargs: Any) -> WorkQueue:
    """``None``/``"sqlite"``: the SQLite queue beside the store; ``"redis://..."``: a Redis stream named TABLE."""
    if spec is None or spec == "sqlite":
        return SQLiteQueue.beside(store, table, **kwargs)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStreamQueue(spec, table, store[table].key_type, **kwargs)
    raise SchemaError(f"queue must be 'sqlite' or a redis:// URL, got {spec!r}")


class Worker:
    """Computes queued keys of table ``name`` with ``compute(keys) -> [B, dim] array``."""

    def __init__(self, store: Store, name: str, compute: str | ComputeFn, queue: WorkQueue | None = None, *,
                 model_version: int = 1, batch: int = 64, lease_seconds: float = 30.0,
                 idle_sleep: float = 0.05) -> None:
        if batch < 1:
            raise SchemaError(f"batch must be >= 1, got {batch}")
        self.store = store
        self.table = require_tagged(store[name])
        self.compute = load_compute(compute)
        self.queue = queue if queue is not None else SQLiteQueue.beside(store, name)
        fill_tag(int(model_version))  # validates the version range
        self.model_version = int(model_version)
        self.batch = int(batch)
        self.lease_seconds = float(lease_seconds)
        self.idle_sleep = float(idle_sleep)
        self._stop = threading.Event()
        self._counts: dict[str, Any] = dict(batches=0, computed=0, failed=0, retried=0, gave_up=0,
                                       compute_seconds_total=0.0, compute_seconds_max=0.0,
                                       fill_seconds_total=0.0, fill_seconds_max=0.0, last_error=None)

    def metrics(self) -> WorkerMetrics:
        return WorkerMetrics(**self._counts)

    def stop(self) -> None:
        """Ask the loop to end after the current batch."""
        self._stop.set()

    # ---------------------------------------------------------------- one batch

    def _check(self, out: Any, n: int) -> tuple[np.ndarray | None, np.ndarray, str]:
        """(rows cast to the table dtype or None, per-row ok mask, error for the bad rows)."""
        dim = self.table.dim
        try:
            arr = np.asarray(out)
        except (ValueError, TypeError) as exc:
            return None, np.zeros(n, bool), f"compute returned something that is not an array: {exc}"
        if arr.dtype.kind not in "fiu":
            return None, np.zeros(n, bool), f"compute returned dtype {arr.dtype}, expected real numbers"
        if arr.shape != (n, dim):
            return None, np.zeros(n, bool), (f"compute returned shape {arr.shape} for {n} key(s), "
                                             f"expected ({n}, {dim})")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr.astype(self.table.dtype)
            # what the table will hold: bfloat16 rounds float32 values above 3.39e38 to inf
            stored = decode_rows(encode_rows(cast, self.table.stored_dtype), self.table.stored_dtype, dim) \
                if self.table.stored_dtype == "bfloat16" else cast
        ok = np.isfinite(stored).all(axis=1)
        return cast, ok, (f"compute returned non-finite values (NaN or inf, as stored in "
                          f"{self.table.stored_dtype})")

    def _compute(self, items: list[WorkItem]) -> tuple[list[WorkItem], list[np.ndarray], list[tuple[WorkItem, str]]]:
        keys = [it.key for it in items]
        try:
            out = self.compute(keys)
        except Exception as exc:
            if len(items) == 1:
                return [], [], [(items[0], f"compute raised {type(exc).__name__}: {exc}")]
            good: list[WorkItem] = []
            rows: list[np.ndarray] = []
            bad: list[tuple[WorkItem, str]] = []
            for it in items:  # isolate the key(s) that raise
                g, r, b = self._compute([it])
                good += g
                rows += r
                bad += b
            return good, rows, bad
        cast, ok, error = self._check(out, len(items))
        if cast is None:
            return [], [], [(it, error) for it in items]
        return ([it for it, k in zip(items, ok, strict=True) if k], list(cast[ok]),
                [(it, error) for it, k in zip(items, ok, strict=True) if not k])

    def run_once(self) -> int:
        """Claim, compute and write one batch; returns how many keys were claimed (0: nothing ready)."""
        items = self.queue.claim(self.batch, self.lease_seconds)
        if not items:
            return 0
        t0 = time.perf_counter()
        good, rows, bad = self._compute(items)
        elapsed = time.perf_counter() - t0
        if good:
            keys = [it.key for it in good]
            k: Any = np.array(keys, dtype=np.int64) if self.table.key_type == "int64" else keys
            now = time.time()
            self.table.put(k, np.stack(rows), tags=fill_tag(self.model_version, now))
            self.queue.ack(good)
            fills = [max(0.0, now - it.enqueued_at) for it in good]
            self._counts["computed"] += len(good)
            self._counts["fill_seconds_total"] += sum(fills)
            self._counts["fill_seconds_max"] = max(self._counts["fill_seconds_max"], *fills)
        else:
            fills = []
        for it, error in bad:
            if self.queue.fail(it, error):
                self._counts["retried"] += 1
            else:
                self._counts["gave_up"] += 1
            self._counts["failed"] += 1
            self._counts["last_error"] = error
        self._counts["batches"] += 1
        self._counts["compute_seconds_total"] += elapsed
        self._counts["compute_seconds_max"] = max(self._counts["compute_seconds_max"], elapsed)
        self._report(fills, elapsed, len(good), len(bad))
        return len(items)

    def _report(self, fills: list[float], compute_seconds: float, computed: int, failed: int) -> None:
        """Add this batch to the queue's shared counters; metrics are best effort, the work is done."""
        deltas = {**histogram_deltas("fill", fills), **histogram_deltas("compute", [compute_seconds]),
                  "computed": float(computed), "failed": float(failed)}
        try:
            self.queue.add_counters({k: v for k, v in deltas.items() if v})
        except QueueUnavailableError as exc:
            self._counts["last_error"] = f"{type(exc).__name__}: {exc}"

    def run(self, *, until_idle: bool = False) -> None:
        """Process batches until :meth:`stop` (or, with ``until_idle``, until nothing is ready).

        An error of the queue or the store is recorded in ``last_error`` and retried after a
        pause; the keys of a batch that could not be written are not acked and come back.
        """
        while not self._stop.is_set():
            try:
                claimed = self.run_once()
            except (EmbkvError, OSError) as exc:
                self._counts["last_error"] = f"{type(exc).__name__}: {exc}"
                self._stop.wait(max(self.idle_sleep, 0.5))
                continue
            if not claimed:
                if until_idle:
                    return
                self._stop.wait(self.idle_sleep)


class WorkerThread(threading.Thread):
    """A worker running in a daemon thread; ``stop()`` ends it after the current batch."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name=f"embkv-worker-{worker.table.name}", daemon=True)
        self.worker = worker

    def run(self) -> None:
        self.worker.run()

    def stop(self, timeout: float | None = 10.0) -> None:
        self.worker.stop()
        self.join(timeout)


def run_in_thread(worker: Worker) -> WorkerThread:
    """Start ``worker`` in a daemon thread of this process."""
    t = WorkerThread(worker)
    t.start()
    return t


def _process_main(store_path: str, name: str, compute: str | ComputeFn, queue: str | None,
                  queue_kwargs: dict[str, Any], stop: multiprocessing.synchronize.Event,
                  kwargs: dict[str, Any]) -> None:
    store = open_store(store_path)
    try:
        worker = Worker(store, name, compute, open_queue(queue, store, name, **queue_kwargs), **kwargs)
        def stop_when_asked() -> None:
            stop.wait()
            worker.stop()

        threading.Thread(target=stop_when_asked, daemon=True).start()
        worker.run()
        worker.queue.close()
    finally:
        store.close()


class WorkerProcess:
    """Handle of a worker process started by :func:`run_in_process`."""

    def __init__(self, process: multiprocessing.process.BaseProcess, stop: multiprocessing.synchronize.Event) -> None:
        self.process = process
        self._stop = stop

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the process after its current batch (terminated if it does not within ``timeout``)."""
        self._stop.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        return self.process.exitcode


def run_in_process(store_path: str, name: str, compute: str | ComputeFn, queue: str | None = None, *,
                   queue_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> WorkerProcess:
    """Start a worker in a new (spawned) process. ``compute``: ``"module:function"`` or an importable
    function; ``queue``: ``None``/``"sqlite"`` or a ``redis://`` URL; ``kwargs`` go to :class:`Worker`."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_process_main, args=(store_path, name, compute, queue, queue_kwargs or {}, stop, kwargs),
                       name=f"embkv-worker-{name}", daemon=True)
    proc.start()
    return WorkerProcess(proc, stop)
