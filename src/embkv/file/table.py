"""One table: reads from the mapped current version, writes through the table's writer.

Lifetime of what a Table returns: ``get`` always returns freshly allocated arrays (a
gather copies the rows), so results stay valid after the table is closed, refreshed to a
new version, or the process forks. Nothing handed to the caller aliases the mapping.

Fork rules: a Table (read-only or not) opened before ``fork()`` keeps working in the
children, which share the mapping; the writer lock is re-opened per process so a parent
and its children never believe they both hold it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import CorruptTableError, KeyTypeError, ReadOnlyError, SchemaError, StorageError, TableClosedError
from ..interface import Capabilities
from .codec import QUANTIZED, decode_rows, encode_rows
from .format import FORMAT_VERSION, Counter, DTypeName, KeyType
from .inputs import as_int_keys, as_str_keys, as_tags, as_vectors, default_row, lookup_keys, unpack_str
from .kernels import KERNEL_BACKEND, KernelView
from .mapping import Mapping, bytes_per_row, delete_packed, export_live, heap_bytes, live_keys, put_packed
from .publish import is_memory_path
from .wal import DELETE_INT, DELETE_STR, PUT_INT, PUT_STR, SyncPolicy
from .writer import CurrentVersion, TableWriter, WriteSession

__all__ = ["Table"]


class Table:
    """A table of fixed-width vectors looked up by key.

    Obtain one from a store: ``store.create_table(...)``, ``store.load_table(...)`` or
    ``store["name"]``. Any number of processes may read; writes are serialized across
    processes by a per-table lock (a second writer waits up to the store's ``lock_timeout``).

    Example::

        items = store.create_table("items", dim=4)
        items.put([1, 2], np.ones((2, 4), dtype="float32"))
        vectors, found = items.get([1, 3])      # found == [True, False]
    """

    def __init__(self, path: str, name: str, *, readonly: bool, lock_timeout: float,
                 sync: SyncPolicy = "interval", sync_interval: float = 1.0) -> None:
        self.name = name
        self.path = path
        self.readonly = readonly
        self.durable = not is_memory_path(path)
        try:
            self._version = CurrentVersion(path, name, writable=not readonly, on_switch=self._adopt)
        except PermissionError as exc:
            raise StorageError.from_os_error(exc, f"table {name!r}: cannot open for writing (open the store with "
                                                  "readonly=True to read)") from exc
        self._writer: TableWriter | None = None
        self._reader_settings = _ReaderSettings(lock_timeout, sync, sync_interval)
        if not readonly:
            self._writer = TableWriter(self._version, lock_timeout=lock_timeout, sync=sync,
                                       sync_interval=sync_interval)
            try:
                if self._writer.needs_recovery():
                    self._writer.try_recover()
            except BaseException:
                # a table that failed to open holds no mapping and no descriptor; no checkpoint
                # either: that would take the lock and run the recovery that just failed again
                self._writer.close(checkpoint=False)
                self._version.close()
                raise

    def _adopt(self, m: Mapping) -> None:
        """Keep what the hot path reads at hand for the newly mapped version ``m``."""
        lay = m.layout
        self.dim: int = lay.dim
        self.dtype: np.dtype[Any] = lay.out_dtype  # of what reads return (float32 for int8, bfloat16)
        self.stored_dtype: DTypeName = lay.dtype
        self.key_type: KeyType = lay.key_type
        self.tagged: bool = lay.tagged
        self.capabilities = Capabilities(writable=not self.readonly, durable=self.durable, tagged=lay.tagged,
                                         shared_across_processes=True)
        self._view: KernelView = m.view
        self._int_keys = lay.key_type == "int64"
        self._vec_bytes = lay.out_bytes

    # ---------------------------------------------------------------- schema

    # the writer's settings, read by every write: setting one on the table takes effect at once
    @property
    def lock_timeout(self) -> float:
        """Seconds a write waits for another process's write before :class:`WriterLockedError`."""
        return self._settings_holder().lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        self._settings_holder().lock_timeout = float(seconds)

    @property
    def sync(self) -> SyncPolicy:
        """When the write-ahead log is fsynced (a disk store): ``always``, ``interval`` or ``never``."""
        return self._settings_holder().sync

    @property
    def sync_interval(self) -> float:
        return self._settings_holder().sync_interval

    def _settings_holder(self) -> TableWriter | _ReaderSettings:
        return self._writer if self._writer is not None else self._reader_settings

    @property
    def closed(self) -> bool:
        return self._version.mapping is None

    @property
    def capacity(self) -> int:
        """Rows the current version holds before it grows (growth is automatic)."""
        return self._current().layout.row_capacity

    @property
    def generation(self) -> int:
        """Counter bumped by every write batch on the current version."""
        return int(self._current().counters[Counter.GENERATION])

    def _current(self) -> Mapping:
        """The mapping of the newest published version (readers switch lazily)."""
        m = self._version.get()
        if m.counters[Counter.SUPERSEDED]:
            self._refresh()
            m = self._version.get()
        return m

    def __len__(self) -> int:
        return int(self._current().counters[Counter.LIVE])

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} rows"
        return f"<embkv.Table {self.name!r} dim={self.dim} {self.stored_dtype} keys={self.key_type} {state}>"

    def info(self) -> dict[str, Any]:
        """Schema, counts and file layout of the current version, as a plain dict."""
        m = self._current()
        c = m.counters
        lay = m.layout
        live = int(c[Counter.LIVE])
        return {
            "name": self.name, "path": self.path, "dim": lay.dim, "dtype": lay.dtype,
            "read_dtype": lay.out_dtype.name, "key_type": lay.key_type, "tagged": lay.tagged,
            "rows": live, "capacity": lay.row_capacity,
            "index_slots": lay.slot_count, "deleted_slots": int(c[Counter.TOMBS]),
            "load_factor": round((live + int(c[Counter.TOMBS])) / lay.slot_count, 4),
            "free_rows": int(c[Counter.FREE]), "rows_used": int(c[Counter.ROWS_USED]),
            "key_heap_bytes": f"{int(c[Counter.HEAP_USED])}/{lay.heap_capacity}",
            "file_bytes": lay.file_size, "allocated_bytes": m.allocated_bytes(), "bytes_per_row": bytes_per_row(m),
            "generation": int(c[Counter.GENERATION]), "format_version": FORMAT_VERSION,
            "memory_only": not self.durable, "kernel": KERNEL_BACKEND,
        }

    # ---------------------------------------------------------------- reads

    def _refresh(self) -> None:
        """Switch to the newest published version (the old mapping goes when unused)."""
        old = self._version.get()
        m = self._version.switch()
        if m.inode == old.inode and m.counters[Counter.SUPERSEDED]:
            # publishers rename before they flag, so the file at the path is never legitimately
            # superseded: the flag is damage, and retrying would spin forever
            if self.readonly:
                raise CorruptTableError(f"{self.path}: the current version is flagged superseded; "
                                        "open the store writable once (it clears the flag) or run `embkv check`")
            with self.write_session():
                pass  # a writer clears a stray flag on the current file

    def _pack_keys(self, keys: Any) -> Any:
        if self._int_keys:
            return as_int_keys(keys)
        return as_str_keys(keys)

    def get(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Look up a batch of keys.

        Returns ``(vectors, found)``: ``vectors`` is a new ``[B, dim]`` array of the table's dtype,
        ``found`` a bool ``[B]``. Missing rows hold ``default`` (a scalar, a ``[dim]`` vector,
        or its raw bytes as ``vector.astype(table.dtype).tobytes()``; zeros if None). A reader
        never sees a torn vector: each row is the old or the new one.
        """
        k = lookup_keys(keys, self._int_keys)
        out = np.empty((len(k), self.dim), dtype=self.dtype)
        found = np.empty(len(k), dtype=np.bool_)
        if self._gather(k, out, found, default) < 0:
            return self.get(k, default)  # re-created with another schema (k: keys already read once)
        return out, found

    def read_rows(self, keys: Any, threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`get` (misses hold zeros), with the rows read by ``pread`` on ``threads``
        threads instead of through the mapping: cold rows of a disk table come in one batch of
        parallel reads, not one page fault at a time, and are not mapped into this process (its
        memory stays what it holds). For int-keyed float tables; rows a writer is rewriting
        meanwhile, and other tables, are read with :meth:`get`.
        """
        m = self._current()
        k = lookup_keys(keys, self._int_keys)
        if not (self._int_keys and m.fd is not None and m.layout.dtype not in QUANTIZED):
            return self.get(k)
        out = np.zeros((len(k), self.dim), dtype=self.dtype)
        state = np.empty(len(k), dtype=np.uint8)
        m.view.read_rows(m.fd, k, out, state, threads)
        unsettled = np.flatnonzero(state == 2)
        if len(unsettled):
            out[unsettled], state[unsettled] = self.get(k[unsettled])
        return out, state.astype(np.bool_)

    def release_pages(self) -> None:
        """Drop this process's mapped pages of the file (they stay in the page cache, or in
        ``/dev/shm``): after a scan or a burst of writes, so the process's memory (RSS) holds
        only what it uses next. The next access maps what it needs again."""
        import mmap

        with contextlib.suppress(ValueError, OSError):
            self._current().mm.madvise(mmap.MADV_DONTNEED)

    def advise_random(self) -> None:
        """Declare that this process uses the table at random, larger than its memory: the kernel
        then reads ahead nothing for :meth:`read_rows` and maps only the pages a call touches
        (with :meth:`release_pages` after bursts, what a training table does to bound its RSS).
        Applies to this process's mapping of every later version too."""
        self._version.random_access = True
        self._current().advise_random()

    def get_tagged(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`get`, plus each row's tag (uint64 ``[B]``; 0 for misses and untagged rows).

        A tag is the word a writer stored with the vector (``put(..., tags=...)``), read in
        the same consistent snapshot as the vector.
        """
        k = lookup_keys(keys, self._int_keys)
        out = np.empty((len(k), self.dim), dtype=self.dtype)
        found = np.empty(len(k), dtype=np.bool_)
        tags = np.empty(len(k), dtype=np.uint64)
        if self._gather(k, out, found, default, tags) < 0:
            return self.get_tagged(k, default)
        return out, found, tags

    def get_fresh(self, keys: Any, min_version: int, max_age: int = 0, default: Any = None,
                  stats: Any = None, stale_as_miss: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """Vectors, a freshness status per key, and how many are fresh, in one pass.

        ``status[i]`` (int8) is 0 (fresh: present and untagged, or its tag has version
        ``>= min_version`` and was filled at most ``max_age`` whole seconds ago, see
        :func:`embkv.make_tag`; ``max_age`` 0: no limit), 1 (missing: the row holds
        ``default``) or 2 (present but older; with ``stale_as_miss`` reported as missing and
        given ``default`` too). These are the values of ``embkv.HIT``, ``embkv.OOV`` and
        ``embkv.STALE``; :class:`embkv.EmbeddingCache` is built on this call. ``stats``: an
        int64 ``[4]`` buffer (numpy array, or ``memoryview(bytearray(32)).cast("q")``, cheaper
        to pass) that calls, keys, fresh and stale rows are added to (safe across threads).
        """
        if min_version < 0:  # (the kernel checks max_age)
            raise SchemaError(f"min_version must not be negative, got {min_version}")
        k = lookup_keys(keys, self._int_keys)
        n = len(k)
        out = np.empty((n, self.dim), dtype=self.dtype)
        status = np.empty(n, dtype=np.int8)
        fresh = self._gather(k, out, status, default, None, min_version, max_age, stats, stale_as_miss)
        if fresh < 0:
            return self.get_fresh(k, min_version, max_age, default, stats, stale_as_miss)
        return out, status, fresh

    def _gather(self, k: Any, out: np.ndarray, found: np.ndarray, default: Any, tags: np.ndarray | None = None,
                min_version: int = -1, max_age: int = 0, stats: Any = None,
                stale_as_miss: bool = False) -> int:
        """Run the kernel's read on the newest version; -1 if the schema changed under the keys."""
        if default is None or (type(default) is bytes and len(default) == self._vec_bytes):
            dflt = default  # None, or already the raw row (callers on a hot path keep it ready)
        else:
            dflt = default_row(default, self.dim, self.dtype)
        if self._version.mapping is None:
            raise TableClosedError(f"table {self.name!r} is closed")
        int_keys = self._int_keys
        while True:
            view = self._view
            if int_keys:
                hits = view.get_int(k, out, found, dflt, tags, min_version, max_age, stats, stale_as_miss)
            else:
                try:
                    hits = view.get_strlist(k, out, found, dflt, tags, min_version, max_age, stats, stale_as_miss)
                except (TypeError, UnicodeEncodeError) as exc:
                    raise KeyTypeError(f"str table: {exc}") from None
            if hits >= 0:
                return hits
            self._refresh()
            if (self.dim, self.dtype, self._int_keys) != (out.shape[1], out.dtype, int_keys):
                return -1

    def contains(self, keys: Any) -> np.ndarray:
        """Bool array: which of ``keys`` are present (no vectors copied)."""
        int_keys = self._int_keys
        k = self._pack_keys(keys)
        n = k.shape[0] if int_keys else len(k[0]) // 8
        found = np.empty(n, dtype=np.bool_)
        self._version.get()
        while True:
            view = self._view
            hits = (view.get_int(k, None, found, None) if self._int_keys
                    else view.get_str(k[0], k[1], k[2], None, found, None))
            if hits >= 0:
                return found
            self._refresh()
            if self._int_keys != int_keys:
                return self.contains(keys)

    def __contains__(self, key: object) -> bool:
        try:
            return bool(self.contains([key])[0])
        except KeyTypeError:
            return False

    def keys(self) -> Any:
        """A snapshot of the keys present: an int64 array, or a list of str (bytes if not UTF-8)."""
        keys = live_keys(self._current())
        return keys if self._int_keys else unpack_str(keys)

    def __iter__(self) -> Iterator[Any]:
        """The keys present (a snapshot taken when iteration starts)."""
        keys = self.keys()
        return iter(keys.tolist() if self._int_keys else keys)

    def export(self) -> tuple[Any, np.ndarray]:
        """All live ``(keys, vectors)``: int64 array or list of str/bytes keys (as stored), copied.

        Takes the writer lock briefly so the snapshot is consistent.
        """
        keys, vectors, _tags = self.export_tagged()
        return keys, vectors

    def export_tagged(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """Like :meth:`export`, plus each row's tag (uint64; zeros in an untagged table), in one snapshot.

        Takes the writer lock briefly (a read-only table: no lock, keys then rows).
        """
        if self.readonly:  # no lock for readers: read the keys, then their rows
            self._current()
            keys = self.keys()
            vectors, found, tags = self.get_tagged(keys)
            if self._int_keys:
                return keys[found], vectors[found], tags[found]
            return [k for k, f in zip(keys, found.tolist(), strict=True) if f], vectors[found], tags[found]
        with self.write_session() as session:
            keys, vectors, tags = export_live(session.mapping)
        if not self._int_keys:
            keys = unpack_str(keys)
        if self.stored_dtype in QUANTIZED:
            vectors = decode_rows(vectors, self.stored_dtype, self.dim)
        return keys, vectors, tags

    # ---------------------------------------------------------------- writes

    def write_session(self, lock_timeout: float | None = None) -> contextlib.AbstractContextManager[WriteSession]:
        """Hold this table's writer lock; yields the :class:`~embkv.file.writer.WriteSession`.

        The internal API through which the store, check/repair and the coming parts change a
        version (publish, install a copy, drop). Writers in other processes wait meanwhile;
        readers do not. ``lock_timeout``: seconds to wait (the store's by default).
        """
        if self._writer is None:
            raise ReadOnlyError(f"table {self.name!r} was opened read-only")
        return self._writer.session(lock_timeout)

    def put(self, keys: Any, vectors: Any, tags: Any = None) -> None:
        """Insert or overwrite a batch: ``keys`` [B], ``vectors`` [B, dim].

        Duplicate keys in one batch: the last occurrence wins. NaN and inf are stored as
        given, except in an int8 table, which refuses them (:class:`SchemaError`, nothing
        written). Values are cast to the stored dtype (float64 -> float16 or bfloat16 may
        overflow to inf).
        The table grows (a new version is built and published) when it runs out of room.
        ``tags``: an unsigned 64-bit word stored with each vector (one int for the batch, or
        ``[B]``; default 0), read back by :meth:`get_tagged` and :meth:`get_fresh`.
        """
        k = self._pack_keys(keys)
        n = k.shape[0] if self._int_keys else len(k[0]) // 8
        if n == 0:
            return  # an empty batch is a no-op whatever the vectors look like
        if tags is not None and not self.tagged:
            raise SchemaError(f"table {self.name!r} keeps no row tags: create it with tags=True to store them")
        vecs = encode_rows(as_vectors(vectors, n, self.dim), self.stored_dtype)
        row_tags = as_tags(tags, n)
        # the log keeps the tags beside the keys, so a replayed batch restores them too
        if self._int_keys:
            kind, parts = PUT_INT, [k, row_tags, vecs]
        else:
            kind, parts = PUT_STR, [k[0], row_tags, k[1], k[2], vecs]

        def apply(m: Mapping) -> bool:
            return put_packed(m, k, vecs, row_tags)

        with self.write_session() as session:
            session.write(kind, n, parts, apply, extra_rows=n, extra_heap=0 if self._int_keys else heap_bytes(k))

    def delete(self, keys: Any) -> int:
        """Remove keys; returns how many were present. Missing keys are ignored."""
        k = self._pack_keys(keys)
        n = k.shape[0] if self._int_keys else len(k[0]) // 8
        if n == 0:
            return 0
        with self.write_session() as session:
            try:  # room for the freed rows first: a full disk refuses the delete before it is logged
                session.mapping.reserve(0, free_entries=n)
            except OSError as exc:
                raise StorageError.from_os_error(exc, f"table {self.name!r}: no space for the delete") from exc
            session.log(DELETE_INT, n, [k]) if self._int_keys else session.log(DELETE_STR, n, list(k))
            return delete_packed(session.mapping, k)

    def close(self) -> None:
        """Checkpoint a durable table's log, release the mapping and lock file.

        Arrays already returned stay valid.
        """
        if self._writer is not None:
            self._writer.close()
        self.__dict__.pop("_view", None)  # the kernel view pins the mapping
        self._version.close()

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReaderSettings:
    """The writer settings a read-only table still reports (it never writes)."""

    def __init__(self, lock_timeout: float, sync: SyncPolicy, sync_interval: float) -> None:
        self.lock_timeout = lock_timeout
        self.sync = sync
        self.sync_interval = sync_interval
