"""One table: a mapped file, its kernels, its writer lock, and the publish protocol.

Lifetime of what a Table returns: ``get`` always returns freshly allocated arrays (a
gather copies the rows), so results stay valid after the table is closed, refreshed to a
new version, or the process forks. Nothing handed to the caller aliases the mapping.

Fork rules: a Table (read-only or not) opened before ``fork()`` keeps working in the
children, which share the mapping; the writer lock is re-opened per process so a parent
and its children never believe they both hold it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import mmap
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import (
    CorruptTableError,
    EmbkvError,
    KeyTypeError,
    ReadOnlyError,
    SchemaError,
    TableClosedError,
    TableNotFoundError,
    WriterLockedError,
)
from .format import COUNTERS_OFFSET, HEADER_SIZE, MAGIC, Counter, Layout, check_counters
from .kernels import BACKEND, SLOT_EMPTY, SLOT_TOMB, KernelView, make_view, pack_str
from .wal import (
    DELETE_INT,
    DELETE_STR,
    PUT_INT,
    PUT_STR,
    WriteAheadLog,
    boot_id,
    checkpoint_due,
    log_from_another_boot,
    wal_path,
)

__all__ = ["Table"]

TABLE_SUFFIX = ".ekv"
LOCK_SUFFIX = ".ekv.lock"
TMP_SUFFIX = ".tmp"
PREV_SUFFIX = ".prev"  # .<name>.ekv.prev: the version being replaced, while a publish is in flight
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_INT64_MAX = np.iinfo(np.int64).max
LOAD_CHUNK = 65536
Progress = Callable[[int], None]
# what builds a version: (keys packed for the kernel, vectors, row tags or None for untagged)
Chunk = tuple[Any, np.ndarray, "np.ndarray | None"]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith((TMP_SUFFIX, ".lock")):
        raise SchemaError(
            f"invalid table name {name!r}: use 1-128 letters, digits, '_', '-', '.', not starting with '.' or '-'"
        )
    return name


def _is_memory_path(path: str) -> bool:
    real = os.path.realpath(path)
    return real.startswith(("/dev/shm/", "/run/shm/"))


class _Mapping:
    """One mapped version of a table file plus its kernel view."""

    def __init__(self, path: str, writable: bool) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TableNotFoundError(f"no table file at {path}") from None
        try:
            st = os.fstat(fd)
            head = os.pread(fd, HEADER_SIZE, 0)
            self.layout = Layout.parse(head, st.st_size, where=path)
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self.mm = mmap.mmap(fd, self.layout.file_size, access=access)
        finally:
            os.close(fd)
        self.path = path
        self.inode = (st.st_dev, st.st_ino)
        self.counters = np.frombuffer(self.mm, dtype=np.uint64, count=Counter.COUNT, offset=COUNTERS_OFFSET)
        check_counters(self.counters, self.layout, where=path)
        self.view: KernelView = make_view(self.mm, writable, self.layout)

    def close(self) -> None:
        """Drop this process's references; the memory goes when the last in-flight call ends."""
        mm = self.mm
        self.__dict__.pop("view", None)
        self.__dict__.pop("counters", None)
        # a call running on another thread still exports the buffer: the mapping then
        # closes when that call's view is garbage collected
        with contextlib.suppress(BufferError):
            mm.close()

    # the parts of the row area that writers and exporters read with numpy
    def slots(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint64, count=2 * lay.slot_count,
                             offset=lay.index_offset).reshape(-1, 2)

    def rows(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint8, count=lay.row_capacity * lay.row_stride,
                             offset=lay.rows_offset).reshape(lay.row_capacity, lay.row_stride)


def build_version(path: str, layout: Layout, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
    """Write a complete new table file at ``path`` (which must not exist) from (keys, vectors, tags) chunks."""
    fd = create_allocated(path, layout.file_size)
    try:
        os.pwrite(fd, layout.pack_header(), 0)
    finally:
        os.close(fd)
    mapping = _Mapping(path, writable=True)
    try:
        for keys, vectors, tags in chunks:
            if not _put_packed(mapping.view, layout, keys, vectors, tags):
                raise SchemaError("internal: a fresh table version was sized too small")
            if progress is not None:
                progress(len(vectors))
        if not _is_memory_path(path):
            mapping.mm.flush()
    finally:
        mapping.close()


def create_allocated(path: str, size: int) -> int:
    """Create ``path`` (it must not exist) with ``size`` bytes reserved; returns the open descriptor.

    Reserving up front makes a full disk or tmpfs fail here with ENOSPC instead of killing a
    later writer with SIGBUS on a mapped page.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # no fallocate on this file system: a sparse file
    except BaseException:
        os.close(fd)
        raise
    return fd


def _put_packed(view: KernelView, layout: Layout, keys: Any, vectors: np.ndarray, tags: np.ndarray | None) -> bool:
    if layout.key_type == "int64":
        return view.put_int(keys, vectors, tags)
    hashes, offsets, blob = keys
    return view.put_str(hashes, offsets, blob, vectors, tags)


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

    def __init__(self, path: str, name: str, *, readonly: bool, lock_timeout: float, sync: str = "interval",
                 sync_interval: float = 1.0) -> None:
        self.name = name
        self.path = path
        self.readonly = readonly
        self.lock_timeout = lock_timeout
        self.sync = sync
        self.sync_interval = sync_interval
        # every write batch is logged before it is applied, so a batch cut short by a crash is
        # completed by the next writer (see wal.py); only a disk path syncs the log and file
        self.durable = not _is_memory_path(path)
        self._wal: WriteAheadLog | None = None
        self._wal_checked: tuple[int, int] | None = None  # (pid, created_ns) whose log header was checked
        self._lock_path = path[: -len(TABLE_SUFFIX)] + LOCK_SUFFIX
        self._lock_fd: int | None = None
        self._lock_pid = 0
        # flock is per open file description, so it does not exclude threads sharing our descriptor
        self._thread_lock = threading.Lock()
        self._thread_lock_pid = os.getpid()
        self._m: _Mapping | None = None
        try:
            self._open_mapping()
        except PermissionError as exc:
            raise storage_error(exc, f"table {name!r}: cannot open for writing (open the store with "
                                     "readonly=True to read)") from exc
        if not readonly and self._needs_recovery():
            self._try_recover()

    def _needs_recovery(self) -> bool:
        """A dead writer's batch, or a log written before the last reboot, waits to be replayed."""
        m = self._mapping()
        if m.counters[Counter.DIRTY] or m.counters[Counter.SUPERSEDED]:
            return True
        return log_from_another_boot(wal_path(self.path), m.layout.created_ns)

    def _try_recover(self) -> None:
        """Complete a dead writer's batch now, unless a live writer holds the lock (it will)."""
        with contextlib.suppress(WriterLockedError), self._writing(lock_timeout=0.0):
            pass

    # ---------------------------------------------------------------- schema

    def _open_mapping(self) -> None:
        m = _Mapping(self.path, writable=not self.readonly)
        old, self._m = self._m, m
        lay = m.layout
        self.dim: int = lay.dim
        self.dtype: np.dtype[Any] = lay.np_dtype
        self.key_type: str = lay.key_type
        self._view = m.view
        self._int_keys = lay.key_type == "int64"
        self._vec_bytes = lay.vec_bytes
        if old is not None:
            old.close()

    @property
    def capacity(self) -> int:
        """Rows the current version holds before it grows (growth is automatic)."""
        return self._current().layout.row_capacity

    @property
    def generation(self) -> int:
        """Counter bumped by every write batch on the current version."""
        return int(self._current().counters[Counter.GENERATION])

    def _mapping(self) -> _Mapping:
        if self._m is None:
            raise TableClosedError(f"table {self.name!r} is closed")
        return self._m

    def _current(self) -> _Mapping:
        """The mapping of the newest published version (readers switch lazily)."""
        m = self._mapping()
        if m.counters[Counter.SUPERSEDED]:
            self._refresh()
            m = self._mapping()
        return m

    def __len__(self) -> int:
        return int(self._current().counters[Counter.LIVE])

    def __repr__(self) -> str:
        state = "closed" if self._m is None else f"{len(self)} rows"
        return f"<embkv.Table {self.name!r} dim={self.dim} {self.dtype} keys={self.key_type} {state}>"

    def info(self) -> dict[str, Any]:
        """Schema, counts and file layout of the current version, as a plain dict."""
        m = self._current()
        c = m.counters
        lay = m.layout
        return {
            "name": self.name, "path": self.path, "dim": lay.dim, "dtype": lay.dtype,
            "key_type": lay.key_type, "rows": int(c[Counter.LIVE]), "capacity": lay.row_capacity,
            "index_slots": lay.slot_count, "deleted_slots": int(c[Counter.TOMBS]),
            "free_rows": int(c[Counter.FREE]), "rows_used": int(c[Counter.ROWS_USED]),
            "key_heap_bytes": f"{int(c[Counter.HEAP_USED])}/{lay.heap_capacity}",
            "file_bytes": lay.file_size, "generation": int(c[Counter.GENERATION]),
            "memory_only": _is_memory_path(self.path), "kernel": BACKEND,
        }

    # ---------------------------------------------------------------- reads

    def _refresh(self) -> None:
        """Switch to the newest published version (the old mapping goes when unused)."""
        old = self._mapping()
        self._open_mapping()
        m = self._mapping()
        if m.inode == old.inode and m.counters[Counter.SUPERSEDED]:
            # publishers rename before they flag, so the file at the path is never legitimately
            # superseded: the flag is damage, and retrying would spin forever
            if self.readonly:
                raise CorruptTableError(f"{self.path}: the current version is flagged superseded; "
                                        "open the store writable once (it clears the flag) or run `embkv check`")
            with self._writing():
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
        k = self._lookup_keys(keys)
        out = np.empty((len(k), self.dim), dtype=self.dtype)
        found = np.empty(len(k), dtype=np.bool_)
        if self._gather(k, out, found, default) < 0:
            return self.get(keys, default)  # the table was re-created with another schema
        return out, found

    def get_tagged(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`get`, plus each row's tag (uint64 ``[B]``; 0 for misses and untagged rows).

        A tag is the word a writer stored with the vector (``put(..., tags=...)``), read in
        the same consistent snapshot as the vector.
        """
        k = self._lookup_keys(keys)
        out = np.empty((len(k), self.dim), dtype=self.dtype)
        found = np.empty(len(k), dtype=np.bool_)
        tags = np.empty(len(k), dtype=np.uint64)
        if self._gather(k, out, found, default, tags) < 0:
            return self.get_tagged(keys, default)
        return out, found, tags

    def get_fresh(self, keys: Any, min_version: int, max_age: int = 0, default: Any = None,
                  stats: Any = None, stale_as_miss: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """Vectors, a freshness status per key, and how many are fresh, in one pass.

        ``status[i]`` (int8) is 0 (fresh: present and untagged, or its tag has version
        ``>= min_version`` and was filled at most ``max_age`` whole seconds ago, see
        :func:`embkv.format.make_tag`; ``max_age`` 0: no limit), 1 (missing: the row holds
        ``default``) or 2 (present but older; with ``stale_as_miss`` reported as missing and
        given ``default`` too). These are the values of ``embkv.HIT``, ``embkv.OOV`` and
        ``embkv.STALE``; :class:`embkv.EmbeddingCache` is built on this call. ``stats``: an
        int64 ``[4]`` buffer (numpy array, or ``memoryview(bytearray(32)).cast("q")``, cheaper
        to pass) that calls, keys, fresh and stale rows are added to (safe across threads).
        """
        if min_version < 0:  # (the kernel checks max_age)
            raise SchemaError(f"min_version must not be negative, got {min_version}")
        k = self._lookup_keys(keys)
        n = len(k)
        out = np.empty((n, self.dim), dtype=self.dtype)
        status = np.empty(n, dtype=np.int8)
        fresh = self._gather(k, out, status, default, None, min_version, max_age, stats, stale_as_miss)
        if fresh < 0:
            return self.get_fresh(keys, min_version, max_age, default, stats, stale_as_miss)
        return out, status, fresh

    def _lookup_keys(self, keys: Any) -> Any:
        """Keys as the kernel reads them: a contiguous int64 array, or a list of str/bytes."""
        if self._int_keys:
            if (type(keys) is np.ndarray and keys.dtype == np.int64 and keys.ndim == 1
                    and keys.flags.c_contiguous):
                return keys
            return as_int_keys(keys)
        if type(keys) is list or type(keys) is tuple:
            return keys  # the kernel reads str/bytes straight from the list
        return str_keys_as_list(keys)

    def _gather(self, k: Any, out: np.ndarray, found: np.ndarray, default: Any, tags: np.ndarray | None = None,
                min_version: int = -1, max_age: int = 0, stats: Any = None,
                stale_as_miss: bool = False) -> int:
        """Run the kernel's read on the newest version; -1 if the schema changed under the keys."""
        if default is None or (type(default) is bytes and len(default) == self._vec_bytes):
            dflt = default  # None, or already the raw row (callers on a hot path keep it ready)
        else:
            dflt = self._default_bytes(default)
        if self._m is None:
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

    def _default_bytes(self, default: Any) -> bytes:
        try:
            given = np.asarray(default)
            if given.dtype.kind not in "fiu":
                raise TypeError(f"got dtype {given.dtype}")
            arr = np.broadcast_to(given.astype(self.dtype), (self.dim,))
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"default must be a real scalar or a vector of dim {self.dim}: {exc}") from None
        return arr.tobytes()

    def contains(self, keys: Any) -> np.ndarray:
        """Bool array: which of ``keys`` are present (no vectors copied)."""
        int_keys = self._int_keys
        k = self._pack_keys(keys)
        n = k.shape[0] if int_keys else len(k[0]) // 8
        found = np.empty(n, dtype=np.bool_)
        self._mapping()
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

    # ---------------------------------------------------------------- writes

    @contextlib.contextmanager
    def _writing(self, lock_timeout: float | None = None) -> Iterator[_Mapping]:
        """Hold the table's writer lock, on the newest version, with crash recovery done."""
        if self.readonly:
            raise ReadOnlyError(f"table {self.name!r} was opened read-only")
        self._mapping()
        if self._thread_lock_pid != os.getpid():
            self._thread_lock = threading.Lock()  # a fork may have copied it in the locked state
            self._thread_lock_pid = os.getpid()
        with self._thread_lock:
            fd = self._acquire_lock(self.lock_timeout if lock_timeout is None else lock_timeout)
            try:
                with self._locked_writing() as m:
                    yield m
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _locked_writing(self) -> Iterator[_Mapping]:
        """The part of `_writing` done with the lock held: switch to the current file, recover."""
        m = self._mapping()
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino) == m.inode
        except FileNotFoundError:
            raise TableNotFoundError(f"table {self.name!r} was dropped") from None
        if not current:
            self._refresh()
            m = self._mapping()
        finish_interrupted_publish(self.path)  # we hold the lock: no publish is in flight
        if m.counters[Counter.SUPERSEDED]:
            m.counters[Counter.SUPERSEDED] = 0  # this file is at the path and we hold the lock: it is current
        self._recover_from_log(m)
        m = self._mapping()  # recovery may have grown the table into a new version
        if m.counters[Counter.DIRTY]:
            recover_counters(m)
        m.counters[Counter.DIRTY] = os.getpid()
        try:
            yield m
        finally:
            if self._m is not None:
                self._m.counters[Counter.DIRTY] = 0

    def _log(self) -> WriteAheadLog:
        if self._wal is None or self._wal.pid != os.getpid():
            self._wal = WriteAheadLog(wal_path(self.path), self.sync if self.durable else "never",
                                      self.sync_interval, durable=self.durable)
            self._wal_checked = None
        return self._wal

    def _recover_from_log(self, m: _Mapping) -> None:
        """Replay what a dead writer logged but may not have applied. Lock held."""
        wal = self._log()
        created = m.layout.created_ns
        replay_all = False
        if self._wal_checked != (os.getpid(), created):
            header = wal.header()
            if header is None or header[0] != created:
                # no log yet, or the log of an older version: the published file holds everything
                wal.reset(created, int(m.counters[Counter.GENERATION]))
            elif header[1] != boot_id():
                replay_all = True  # rebooted: the counter page may have reached disk before the rows
            self._wal_checked = (os.getpid(), created)
        if not (replay_all or m.counters[Counter.DIRTY]):
            return
        applied = int(m.counters[Counter.GENERATION])
        last = applied
        # `dirty` stays set until the replay is complete: if this process dies in the middle,
        # the next writer replays again (records are idempotent upserts and deletes)
        m.counters[Counter.DIRTY] = os.getpid()
        recover_counters(m, keep_dirty=True)  # a sane free-row stack first: replay allocates rows
        grown = False
        for kind, count, gen, payload in list(wal.records()):
            if not (replay_all or gen > applied):
                continue
            if grown:  # the version we grew into starts an empty log: keep the rest logged there
                self._logged(m, kind, count, [payload])
            if not _apply_record(m, kind, count, payload):
                # a batch cut short can need one more spare row than is left: grow, as put would
                self._rebuild(m, extra_rows=count, extra_heap=len(payload))
                m = self._mapping()
                self._logged(m, kind, count, [payload])
                grown = True
                if not _apply_record(m, kind, count, payload):
                    raise CorruptTableError(f"{self.path}: a logged batch does not fit even after growing")
            last = max(last, gen)
        recover_counters(m, keep_dirty=True)
        m.counters[Counter.GENERATION] = last
        self._checkpoint(m)

    def _checkpoint(self, m: _Mapping) -> None:
        """Flush the table file to disk and empty the log. Lock held."""
        if self.durable:
            m.mm.flush()
        self._log().reset(m.layout.created_ns, int(m.counters[Counter.GENERATION]))

    def _logged(self, m: _Mapping, kind: int, count: int, parts: list[Any]) -> int:
        """Append a batch to the log; returns the log's size before it (see WriteAheadLog.truncate)."""
        try:
            return self._log().append(kind, count, int(m.counters[Counter.GENERATION]) + 1, parts)
        except OSError as exc:
            raise storage_error(exc, f"table {self.name!r}: could not log the write") from exc

    def _acquire_lock(self, timeout: float) -> int:
        pid = os.getpid()
        if self._lock_fd is None or self._lock_pid != pid:
            # after fork() the inherited descriptor shares its flock with the parent: open our own
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._lock_pid = pid
        fd = self._lock_fd
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WriterLockedError(
                        f"table {self.name!r}: another writer held the lock for {timeout}s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def put(self, keys: Any, vectors: Any, tags: Any = None) -> None:
        """Insert or overwrite a batch: ``keys`` [B], ``vectors`` [B, dim].

        Duplicate keys in one batch: the last occurrence wins. NaN and inf are stored as
        given. Values are cast to the table's dtype (float64 -> float16 may overflow to inf).
        The table grows (a new version is built and published) when it runs out of room.
        ``tags``: an unsigned 64-bit word stored with each vector (one int for the batch, or
        ``[B]``; default 0), read back by :meth:`get_tagged` and :meth:`get_fresh`.
        """
        k = self._pack_keys(keys)
        n = k.shape[0] if self._int_keys else len(k[0]) // 8
        if n == 0:
            return  # an empty batch is a no-op whatever the vectors look like
        vecs = self._as_vectors(vectors, n)
        row_tags = _as_tags(tags, n)
        # the log keeps the tags beside the keys, so a replayed batch restores them too
        if self._int_keys:
            kind, parts = PUT_INT, [k, row_tags, vecs]
        else:
            kind, parts = PUT_STR, [k[0], row_tags, k[1], k[2], vecs]
        with self._writing() as m:
            mark = self._logged(m, kind, n, parts)
            if not _put_packed(m.view, m.layout, k, vecs, row_tags):
                # no room, nothing written: take the record back before growing, so that a
                # batch refused below (disk full) can never come back in a later recovery
                self._log().truncate(mark)
                heap_needed = 0 if self._int_keys else len(k[2])
                self._rebuild(m, extra_rows=n, extra_heap=heap_needed)  # starts a new log
                m = self._mapping()
                self._logged(m, kind, n, parts)
                if not _put_packed(m.view, m.layout, k, vecs, row_tags):
                    raise SchemaError("internal: table did not grow enough")
            if checkpoint_due(self._log()):
                self._checkpoint(m)

    def _as_vectors(self, vectors: Any, n: int) -> np.ndarray:
        try:
            arr = np.asarray(vectors)
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"vectors must be a [{n}, {self.dim}] array: {exc}") from None
        if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
            raise SchemaError(f"vectors must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 1 and n == 1:
            arr = arr.reshape(1, -1)
        if arr.shape != (n, self.dim):
            raise SchemaError(f"vectors must have shape ({n}, {self.dim}), got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def delete(self, keys: Any) -> int:
        """Remove keys; returns how many were present. Missing keys are ignored."""
        k = self._pack_keys(keys)
        n = k.shape[0] if self._int_keys else len(k[0]) // 8
        if n == 0:
            return 0
        with self._writing() as m:
            if self._int_keys:
                self._logged(m, DELETE_INT, n, [k])
                return m.view.delete_int(k)
            self._logged(m, DELETE_STR, n, list(k))
            return m.view.delete_str(*k)

    # ---------------------------------------------------------------- versions

    def _rebuild(self, m: _Mapping, extra_rows: int, extra_heap: int) -> None:
        """Copy the live rows into a larger (or compacted) new version and publish it. Lock held."""
        lay = m.layout
        live = int(m.counters[Counter.LIVE])
        need = live + extra_rows
        capacity = lay.row_capacity if need <= lay.row_capacity else max(2 * lay.row_capacity, need + need // 8)
        keys, vectors, tags = export_live(m)
        heap = 0
        if not self._int_keys:
            heap_needed = len(keys[2]) + extra_heap
            heap = lay.heap_capacity if heap_needed <= lay.heap_capacity else max(2 * lay.heap_capacity,
                                                                                  heap_needed * 5 // 4)
        new_layout = Layout.plan(lay.dim, lay.dtype, lay.key_type, capacity, heap, time.time_ns())
        self._publish(new_layout, iter([(keys, vectors, tags)]) if live else iter(()))

    def _publish(self, layout: Layout, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
        """Build a new version beside the current file and rename it over it. Lock held."""
        tmp = temp_path(self.path)
        try:
            build_version(tmp, layout, chunks, progress)
            self._install(tmp)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise storage_error(exc, f"table {self.name!r}: could not write a new version") from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _install(self, complete_file: str) -> None:
        """Make a complete, synced table file the current version. Lock held."""
        # a hard link keeps the old version reachable until its readers are told: a publisher
        # killed between the rename and the flag leaves the link, and the next writer (or the
        # next writable open of the store) flags the old file through it
        prev = keep_previous(self.path)
        os.rename(complete_file, self.path)
        if self.durable:
            fsync_dir(os.path.dirname(self.path))
        old = self._m
        if old is not None:
            old.counters[Counter.DIRTY] = 0
            old.counters[Counter.SUPERSEDED] = 1
        os.unlink(prev)
        self._open_mapping()
        # we are still inside a write (a put that grew the table applies its batch next):
        # mark the new version so a crash from here on is recovered from its log
        self._mapping().counters[Counter.DIRTY] = os.getpid()
        m = self._mapping()  # the new version holds every logged write: start its log empty
        self._log().reset(m.layout.created_ns, int(m.counters[Counter.GENERATION]))
        self._wal_checked = (os.getpid(), m.layout.created_ns)

    def export(self) -> tuple[Any, np.ndarray]:
        """All live ``(keys, vectors)``: int64 array or list of str/bytes keys (as stored), copied.

        Takes the writer lock briefly so the snapshot is consistent.
        """
        if self.readonly:  # no lock for readers: read the keys, then their vectors
            if self._mapping().counters[Counter.SUPERSEDED]:
                self._refresh()
            keys = self.keys()
            vectors, found = self.get(keys)
            if self._int_keys:
                return keys[found], vectors[found]
            return [k for k, f in zip(keys, found.tolist(), strict=True) if f], vectors[found]
        with self._writing() as m:
            keys, vectors, _tags = export_live(m)
        if not self._int_keys:
            keys = unpack_str(keys)
        return keys, vectors

    def keys(self) -> Any:
        """A snapshot of the keys present: an int64 array, or a list of str (bytes if not UTF-8)."""
        m = self._current()
        slots = m.slots()
        live, rows, in_range = slot_rows(slots, m.layout.row_capacity)
        if self._int_keys:
            return slots[live, 0].view(np.int64).copy()
        return unpack_str(m.view.export_str(rows[in_range]))

    def close(self) -> None:
        """Checkpoint a durable table's log, release the mapping and lock file.

        Arrays already returned stay valid.
        """
        if self._wal is not None and self._wal.pid == os.getpid():
            if self._m is not None and self._wal.size() > 64:
                with contextlib.suppress(EmbkvError), self._writing() as m:
                    self._checkpoint(m)
            self._wal.close()
            self._wal = None
        self.__dict__.pop("_view", None)  # the kernel view pins the mapping
        if self._m is not None:
            self._m.close()
            self._m = None
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------- helpers


def as_int_keys(keys: Any) -> np.ndarray:
    """Keys for an int64 table as a contiguous int64 array; typed errors for anything else."""
    if isinstance(keys, (str, bytes)):
        raise KeyTypeError("int64 table: keys must be integers, got a string")
    try:
        arr = np.asarray(keys)
    except (ValueError, TypeError) as exc:
        raise KeyTypeError(f"int64 table: keys must be a flat array of integers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise KeyTypeError(f"keys must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind == "u":
        if arr.max() > _INT64_MAX:
            raise KeyTypeError("int64 table: unsigned keys above 2**63-1 do not fit")
    elif arr.dtype.kind != "i":
        raise KeyTypeError(f"int64 table: keys must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def str_keys_as_list(keys: Any) -> Sequence[Any]:
    """Keys for a str table as a sequence of str/bytes (a bare str or bytes is one key)."""
    if isinstance(keys, (str, bytes)):
        return [keys]
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise KeyTypeError(f"keys must be one-dimensional, got shape {keys.shape}")
        if keys.dtype.kind not in "USO" and keys.size:
            raise KeyTypeError(f"str table: keys must be str or bytes, got dtype {keys.dtype}")
        listed: list[Any] = keys.tolist()
        return listed
    if isinstance(keys, Sequence):
        return keys
    try:
        return list(keys)
    except TypeError:
        raise KeyTypeError(f"str table: keys must be a sequence of str or bytes, got {type(keys).__name__}") from None


def as_str_keys(keys: Any) -> tuple[bytes, bytes, bytes]:
    """Keys for a str table packed as (xxh3 hashes, offsets, UTF-8 blob)."""
    keys = str_keys_as_list(keys)
    try:
        packed: tuple[bytes, bytes, bytes] = pack_str(keys)
    except (TypeError, UnicodeEncodeError) as exc:
        raise KeyTypeError(f"str table: {exc}") from None
    return packed


def unpack_str(packed: tuple[bytes, bytes, bytes]) -> list[str | bytes]:
    """Inverse of :func:`as_str_keys` (keys that are not valid UTF-8 come back as bytes)."""
    offsets = np.frombuffer(packed[1], dtype=np.uint64).tolist()
    blob = packed[2]
    out: list[str | bytes] = []
    for i in range(len(offsets) - 1):
        raw = blob[offsets[i] : offsets[i + 1]]
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(raw)
    return out


def slot_rows(slots: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Live index slots: (slot numbers, row numbers as int64, row-in-range mask).

    The range test is done on the unsigned field: a damaged slot near 2**64 must not turn
    into a negative int64 that numpy would happily index from the end.
    """
    srow = slots[:, 1]
    live = np.flatnonzero((srow != SLOT_EMPTY) & (srow != SLOT_TOMB))
    rows_u = srow[live] - np.uint64(1)
    in_range = rows_u < np.uint64(capacity)
    return live, np.where(in_range, rows_u, np.uint64(0)).astype(np.int64), in_range


def export_live(m: _Mapping) -> tuple[Any, np.ndarray, np.ndarray]:
    """Keys (packed for str tables), vectors and tags of every live row. Writer lock held."""
    lay = m.layout
    slots = m.slots()
    live, rows, in_range = slot_rows(slots, lay.row_capacity)
    if not in_range.all():
        raise CorruptTableError(f"{m.path}: index points outside the row area; run `embkv check`")
    order = np.argsort(rows, kind="stable")  # sequential reads of the row area
    rows = rows[order]
    vectors = m.rows()[rows, lay.row_header : lay.row_header + lay.vec_bytes].copy().view(lay.np_dtype)
    tags = row_tags(m, rows)
    if lay.key_type == "int64":
        return slots[live[order], 0].view(np.int64).copy(), vectors, tags
    return m.view.export_str(rows), vectors, tags


def row_tags(m: _Mapping, rows: np.ndarray) -> np.ndarray:
    """The tag word of each of ``rows`` (the last word of the row header), copied."""
    lay = m.layout
    return np.ascontiguousarray(m.rows()[rows, lay.row_header - 8 : lay.row_header]).view(np.uint64).reshape(-1)


def _as_tags(tags: Any, n: int) -> np.ndarray:
    """Row tags as a contiguous uint64 ``[n]`` array; SchemaError for anything else."""
    if tags is None:
        return np.zeros(n, dtype=np.uint64)
    try:
        arr = np.asarray(tags)
        if arr.dtype.kind in "fO" and not isinstance(tags, np.ndarray):
            # a list holding ints above 2**63 comes out as float or object: convert it exactly
            items = list(tags) if isinstance(tags, (list, tuple)) else [tags]
            if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                arr = np.array(items, dtype=np.uint64).reshape(np.shape(tags))
        if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
            raise TypeError(f"got dtype {arr.dtype}")
        if arr.ndim == 0:
            arr = np.full(n, arr)
        if arr.shape != (n,):
            raise ValueError(f"got shape {arr.shape}")
        if arr.dtype.kind == "i" and (arr < 0).any():
            raise ValueError("tags must not be negative")
    except (ValueError, TypeError, OverflowError) as exc:
        raise SchemaError(f"tags must be unsigned 64-bit integers, one per key or one for all {n}: {exc}") from None
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _apply_record(m: _Mapping, kind: int, count: int, payload: memoryview) -> bool:
    """Re-apply one logged batch; False (nothing written) if it does not fit this version.

    A record may not fit: the writer that logged it found no room and died before growing
    the table, or the batch was cut short when it had used up the spare rows. Recovery then
    grows the table and applies it, as the writer would have.
    """
    view = m.view
    vec_bytes = m.layout.vec_bytes
    if kind in (PUT_INT, DELETE_INT):
        keys = payload[: 8 * count]
        if kind == DELETE_INT:
            view.delete_int(keys)
            return True
        tags = payload[8 * count : 16 * count]
        vectors = payload[16 * count :]
        return len(vectors) == count * vec_bytes and view.put_int(keys, vectors, tags)
    hashes = payload[: 8 * count]
    if kind == DELETE_STR:
        offsets = payload[8 * count : 8 * (2 * count + 1)]
        blob_len = int(np.frombuffer(offsets, dtype=np.uint64)[-1])
        view.delete_str(hashes, offsets, payload[8 * (2 * count + 1) : 8 * (2 * count + 1) + blob_len])
        return True
    # PUT_STR: hashes | tags | offsets | blob | vectors
    tags = payload[8 * count : 16 * count]
    offsets = payload[16 * count : 8 * (3 * count + 1)]
    blob_len = int(np.frombuffer(offsets, dtype=np.uint64)[-1])
    blob = payload[8 * (3 * count + 1) : 8 * (3 * count + 1) + blob_len]
    vectors = payload[8 * (3 * count + 1) + blob_len :]
    return len(vectors) == count * vec_bytes and view.put_str(hashes, offsets, blob, vectors, tags)


def recover_counters(m: _Mapping, keep_dirty: bool = False) -> None:
    """Recount after a writer died inside a batch: live keys, tombstones and the free-row stack.

    Rows that the dead writer had taken but not yet published are found as unreferenced
    rows below the high-water mark and returned to the free stack.
    """
    lay = m.layout
    slots = m.slots()
    srow = slots[:, 1]
    live = (srow != SLOT_EMPTY) & (srow != SLOT_TOMB)
    c = m.counters
    c[Counter.LIVE] = int(live.sum())
    c[Counter.TOMBS] = int((srow == SLOT_TOMB).sum())
    used = min(int(c[Counter.ROWS_USED]), lay.row_capacity)
    _, referenced, in_range = slot_rows(slots, lay.row_capacity)
    referenced = referenced[in_range]
    free = np.setdiff1d(np.arange(used, dtype=np.int64), referenced)
    freelist = np.frombuffer(m.mm, dtype=np.uint64, count=lay.row_capacity, offset=lay.freelist_offset)
    freelist[: len(free)] = free
    c[Counter.FREE] = len(free)
    if not keep_dirty:
        c[Counter.DIRTY] = 0


def storage_error(exc: OSError, what: str) -> OSError:
    """A typed error for the file system refusing a write; the previous version stays served."""
    from ..errors import StorageError

    if isinstance(exc, StorageError):
        return exc
    return StorageError(exc.errno or 0, f"{what}: {exc.strerror or exc}; nothing was changed, "
                        "the previous version is still served", getattr(exc, "filename", None))


def target_is_durable(path: str) -> bool:
    return not _is_memory_path(path)


def copy_version(m: _Mapping, dest: str, durable: bool) -> None:
    """Write a copy of mapped version ``m`` to the new file ``dest``, as a fresh version.

    The copy gets its own creation stamp, so the destination never mistakes the source's
    write-ahead log for its own, and clean counters (no writer inside a batch). Lock held.
    """
    lay = m.layout
    fresh = dataclasses.replace(lay, created_ns=time.time_ns())
    fd = create_allocated(dest, lay.file_size)
    try:
        view = memoryview(m.mm)
        try:
            step = 64 << 20
            for off in range(HEADER_SIZE, lay.file_size, step):
                os.pwrite(fd, view[off : min(off + step, lay.file_size)], off)
            header = bytearray(view[:HEADER_SIZE])
        finally:
            view.release()
        header[:COUNTERS_OFFSET] = fresh.pack_header()[:COUNTERS_OFFSET]
        counters = np.frombuffer(header, dtype=np.uint64, count=Counter.COUNT, offset=COUNTERS_OFFSET)
        counters[Counter.DIRTY] = 0
        counters[Counter.SUPERSEDED] = 0
        os.pwrite(fd, bytes(header), 0)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prev_path(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}{PREV_SUFFIX}")


def keep_previous(path: str) -> str:
    """Hard-link the current version of ``path`` as ``.<name>.ekv.prev``; returns the link. Lock held."""
    prev = prev_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(prev)  # from an attempt that failed before its rename: nothing to tell anyone
    os.link(path, prev)
    return prev


def finish_interrupted_publish(path: str) -> None:
    """Tell the readers of a version replaced by a publisher that died before telling them. Lock held.

    If the ``.prev`` link is no longer the file at ``path``, set its ``superseded`` flag (a
    write to the file reaches every mapping of it); then remove the link. One ``stat`` when
    there is nothing to do.
    """
    prev = prev_path(path)
    with contextlib.suppress(FileNotFoundError):
        _flag_replaced(prev, path)
        os.unlink(prev)


def finish_publishes_in(folder: str) -> None:
    """On a writable open of a store: finish the publishes that died, for tables no writer holds."""
    for entry in os.listdir(folder):
        if not (entry.startswith(".") and entry.endswith(TABLE_SUFFIX + PREV_SUFFIX)):
            continue
        path = os.path.join(folder, entry[1 : -len(PREV_SUFFIX)])
        try:
            fd = os.open(path[: -len(TABLE_SUFFIX)] + LOCK_SUFFIX, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # no lock file, so no writer: nobody else can be publishing
            finish_interrupted_publish(path)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer holds it: it finishes the publish itself
            finish_interrupted_publish(path)
        finally:
            os.close(fd)  # releases the flock


def _flag_replaced(prev: str, path: str) -> None:
    st = os.stat(prev)
    try:
        cur = os.stat(path)
        if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
            return  # the publisher died before its rename: the link's file is still the current one
    except FileNotFoundError:
        pass  # dropped: readers must learn that too
    fd = os.open(prev, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.pread(fd, 8, 0) != MAGIC:
            return  # not a table file: write nothing into it
        # superseded = 1, dirty = 0 (adjacent counters)
        os.pwrite(fd, struct.pack("<QQ", 1, 0), COUNTERS_OFFSET + 8 * Counter.SUPERSEDED)
    finally:
        os.close(fd)


def remove_stale_temps(folder: str) -> None:
    """Delete temp files left by builders that died (their pid is gone); finish their publishes."""
    finish_publishes_in(folder)
    for entry in os.listdir(folder):
        if not (entry.startswith(".") and entry.endswith(TMP_SUFFIX)):
            continue
        parts = entry.split(".")
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, entry))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
