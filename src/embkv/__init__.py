"""embkv: an embedding store. One copy of each table per host, read zero-copy by every worker.

Quick start::

    import numpy as np
    import embkv

    store = embkv.open("/dev/shm/shop")                      # a folder of tables, created if missing
    items = store.create_table("items", dim=64)              # float32 vectors, int64 keys
    items.put(np.array([7, 42]), np.random.rand(2, 64))      # upsert a batch
    vectors, found = items.get([7, 8])                       # [2, 64] array, found == [True, False]

    # in every worker process (gunicorn/uvicorn workers, DataLoader workers):
    reader = embkv.open("/dev/shm/shop", readonly=True)["items"]

    # rebuild a whole table and publish it atomically; readers switch on their next call
    store.load_table("items", keys, vectors)

    # compute on miss: lookups answer at once, misses are queued for workers (embkv.compute)
    cache = embkv.EmbeddingCache(store, "items", oov="mean")
    vectors, status = cache.lookup([7, 8])                   # status: embkv.HIT / OOV / STALE

Every kind of table implements :class:`embkv.EmbeddingTable`; its capabilities say what else
it can do (``items.capabilities.durable``). A new kind proves it keeps the contract with the
suite shipped in :mod:`embkv.testing`.

See ARCHITECTURE.md for the parts of the package, the file format and the concurrency protocol.
"""

from __future__ import annotations

from .compute.cache import HIT, OOV, STALE, EmbeddingCache
from .compute.queue import FailureInfo, QueueUnavailableError, WorkItem, WorkQueue
from .compute.redis_queue import RedisStreamQueue
from .compute.sqlite_queue import SQLiteQueue
from .compute.worker import Worker, WorkerProcess, WorkerThread, run_in_process, run_in_thread
from .errors import (
    CorruptTableError,
    EmbkvError,
    EmbkvWarning,
    FormatVersionError,
    KernelFallbackWarning,
    KeyTypeError,
    NotATableError,
    ReadOnlyError,
    ReadRetryError,
    SchemaError,
    StalenessError,
    StorageError,
    StoreNotFoundError,
    TableClosedError,
    TableExistsError,
    TableNotFoundError,
    TruncatedTableError,
    WriterLockedError,
)
from .file.format import FORMAT_VERSION, make_tag
from .file.kernels import KERNEL_BACKEND
from .file.store import Store, open_store
from .file.table import Table
from .interface import Capabilities, EmbeddingTable
from .metrics import CacheMetrics, FillMetrics, SharedMetrics, WorkerMetrics

open = open_store  # `embkv.open(path)` is the documented entry point

__version__ = "0.2.0"

__all__ = [
    "FORMAT_VERSION",
    "HIT",
    "KERNEL_BACKEND",
    "OOV",
    "STALE",
    "CacheMetrics",
    "Capabilities",
    "CorruptTableError",
    "EmbeddingCache",
    "EmbeddingTable",
    "EmbkvError",
    "EmbkvWarning",
    "FailureInfo",
    "FillMetrics",
    "FormatVersionError",
    "KernelFallbackWarning",
    "KeyTypeError",
    "NotATableError",
    "QueueUnavailableError",
    "ReadOnlyError",
    "ReadRetryError",
    "RedisStreamQueue",
    "SQLiteQueue",
    "SchemaError",
    "SharedMetrics",
    "StalenessError",
    "StorageError",
    "Store",
    "StoreNotFoundError",
    "Table",
    "TableClosedError",
    "TableExistsError",
    "TableNotFoundError",
    "TruncatedTableError",
    "WorkItem",
    "WorkQueue",
    "Worker",
    "WorkerMetrics",
    "WorkerProcess",
    "WorkerThread",
    "WriterLockedError",
    "__version__",
    "make_tag",
    "open",
    "open_store",
    "run_in_process",
    "run_in_thread",
]
