"""The writer side of one table in one process: the writer lock, the log, recovery, publishing.

``TableWriter.session()`` takes the table's writer lock (``flock`` on ``<name>.ekv.lock``,
waiting up to ``lock_timeout``), makes sure the process maps the current version, finishes
what a dead writer left (an interrupted publish, a batch cut short) and marks the file
``dirty`` for the duration; it yields a :class:`WriteSession`, the only way to change a
version. The store, check/repair and the table's own ``put``/``delete`` all write through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CorruptTableError, EmbkvError, SchemaError, StorageError, TableNotFoundError, WriterLockedError
from .format import Counter, Layout
from .mapping import Chunk, Mapping, Progress, build_version, export_live, heap_bytes
from .publish import (
    finish_interrupted_publish,
    fsync_dir,
    is_memory_path,
    keep_previous,
    lock_path,
    temp_path,
    wait_for_flock,
)
from .recovery import apply_record, recover_counters
from .wal import SyncPolicy, WriteAheadLog, boot_id, checkpoint_due, log_from_another_boot, wal_path

__all__ = ["CurrentVersion", "TableWriter", "WriteSession"]

Apply = Callable[[Mapping], bool]  # writes one batch into a version; False (nothing written) if it has no room


class CurrentVersion:
    """The version of a table file this process maps, switched to newer ones as they are published.

    The table (reads) and its writer (writes, publishes) share one; ``on_switch`` (a bound
    method of the table) tells the table each time the mapping changes, so it can refresh what
    its hot path keeps at hand. It is held weakly: a table dropped without ``close()`` must not
    be kept alive, with its mapping, by a reference cycle until the garbage collector runs.
    """

    def __init__(self, path: str, name: str, writable: bool, on_switch: Callable[[Mapping], None]) -> None:
        self.path = path
        self.name = name
        self.writable = writable
        self._on_switch = weakref.WeakMethod(on_switch)
        self.mapping: Mapping | None = None
        self.random_access = False  # Table.advise_random: every mapping of it gets Mapping.advise_random
        self.switch()

    def get(self) -> Mapping:
        """The mapped version; :class:`TableClosedError` once closed."""
        if self.mapping is None:
            from ..errors import TableClosedError

            raise TableClosedError(f"table {self.name!r} is closed")
        return self.mapping

    def switch(self) -> Mapping:
        """Map the file now at the path and let the old mapping go (when its last call ends)."""
        m = Mapping(self.path, writable=self.writable)
        if self.random_access:
            m.advise_random()
        old, self.mapping = self.mapping, m
        adopt = self._on_switch()
        if adopt is not None:
            adopt(m)
        if old is not None:
            old.close()
        return m

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


class TableWriter:
    """Writes to one table from this process, one batch at a time across every process.

    Fork rules: the lock descriptor and the thread lock are re-created in a child (an
    inherited descriptor would share the parent's ``flock``, an inherited thread lock may be
    held), so parent and children never both believe they hold the lock.
    """

    def __init__(self, version: CurrentVersion, *, lock_timeout: float, sync: SyncPolicy = "interval",
                 sync_interval: float = 1.0) -> None:
        self.version = version
        self.name = version.name
        self.path = version.path
        self.lock_timeout = lock_timeout
        self.sync = sync
        self.sync_interval = sync_interval
        # every write batch is logged before it is applied, so a batch cut short by a crash is
        # completed by the next writer (see wal.py); only a disk path syncs the log and file
        self.durable = not is_memory_path(self.path)
        self._wal: WriteAheadLog | None = None
        self._wal_checked: tuple[int, int] | None = None  # (pid, created_ns) whose log header was checked
        self._lock_path = lock_path(self.path)
        self._lock_fd: int | None = None
        self._lock_pid = 0
        # flock is per open file description, so it does not exclude threads sharing our descriptor
        self._thread_lock = threading.Lock()
        self._thread_lock_pid = os.getpid()

    # ---------------------------------------------------------------- lock and recovery

    def needs_recovery(self) -> bool:
        """A dead writer's batch, or a log written before the last reboot, waits to be replayed."""
        m = self.version.get()
        if m.counters[Counter.DIRTY] or m.counters[Counter.SUPERSEDED]:
            return True
        return log_from_another_boot(wal_path(self.path), m.layout.created_ns)

    def try_recover(self) -> None:
        """Complete a dead writer's batch now, unless a live writer holds the lock (it will)."""
        with contextlib.suppress(WriterLockedError), self.session(lock_timeout=0.0):
            pass

    @contextlib.contextmanager
    def session(self, lock_timeout: float | None = None) -> Iterator[WriteSession]:
        """Hold the table's writer lock, on the newest version, with crash recovery done."""
        self.version.get()
        if self._thread_lock_pid != os.getpid():
            self._thread_lock = threading.Lock()  # a fork may have copied it in the locked state
            self._thread_lock_pid = os.getpid()
        with self._thread_lock:
            fd = self._acquire_lock(self.lock_timeout if lock_timeout is None else lock_timeout)
            session = WriteSession(self)
            try:
                with self._locked():
                    yield session
            finally:
                session._active = False  # a session kept past its block must not write unlocked
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _acquire_lock(self, timeout: float) -> int:
        pid = os.getpid()
        if self._lock_fd is None or self._lock_pid != pid:
            # after fork() the inherited descriptor shares its flock with the parent: open our own
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._lock_pid = pid
        fd = self._lock_fd
        wait_for_flock(fd, timeout, f"table {self.name!r}")
        return fd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """What a session does with the lock held: switch to the current file, recover, mark dirty."""
        m = self.version.get()
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino) == m.inode
        except FileNotFoundError:
            raise TableNotFoundError(f"table {self.name!r} was dropped") from None
        if not current:
            m = self.version.switch()
        finish_interrupted_publish(self.path)  # we hold the lock: no publish is in flight
        if m.counters[Counter.SUPERSEDED]:
            m.counters[Counter.SUPERSEDED] = 0  # this file is at the path and we hold the lock: it is current
        self._recover_from_log(m)
        m = self.version.get()  # recovery may have grown the table into a new version
        if m.counters[Counter.DIRTY]:
            recover_counters(m)
        m.counters[Counter.DIRTY] = os.getpid()
        try:
            yield
        finally:
            if self.version.mapping is not None:
                self.version.mapping.counters[Counter.DIRTY] = 0

    # ---------------------------------------------------------------- the log

    def _log(self) -> WriteAheadLog:
        if self._wal is None or self._wal.pid != os.getpid():
            self._wal = WriteAheadLog(wal_path(self.path), self.sync if self.durable else "never",
                                      self.sync_interval, durable=self.durable)
            self._wal_checked = None
        return self._wal

    def _logged(self, m: Mapping, kind: int, count: int, parts: list[Any]) -> int:
        """Append a batch to the log; returns the log's size before it (see WriteAheadLog.truncate)."""
        try:
            return self._log().append(kind, count, int(m.counters[Counter.GENERATION]) + 1, parts)
        except OSError as exc:
            raise StorageError.from_os_error(exc, f"table {self.name!r}: could not log the write") from exc

    def _checkpoint(self, m: Mapping) -> None:
        """Flush the table file to disk and empty the log. Lock held."""
        if self.durable:
            m.mm.flush()
        self._log().reset(m.layout.created_ns, int(m.counters[Counter.GENERATION]))

    def _recover_from_log(self, m: Mapping) -> None:
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

            def replay(v: Mapping, kind: int = kind, count: int = count, payload: memoryview = payload) -> bool:
                return apply_record(v, kind, count, payload)

            # a batch cut short can need one more spare row than is left: grow, as put would
            grown = self._apply_growing(kind, count, [payload], replay, extra_rows=count,
                                        extra_heap=len(payload)) or grown
            m = self.version.get()
            last = max(last, gen)
        recover_counters(m, keep_dirty=True)
        m.counters[Counter.GENERATION] = last
        self._checkpoint(m)

    def _apply_growing(self, kind: int, count: int, parts: list[Any], apply: Apply, *, extra_rows: int,
                       extra_heap: int, logged_at: int | None = None) -> bool:
        """Apply one logged batch; if it does not fit, grow the table, log it again there and apply it.

        The one path that both ``put`` and recovery take when a version runs out of room;
        returns whether the table grew. ``logged_at``: where the batch's record starts in the
        current log, taken back before growing, so that a batch refused while growing (disk
        full) can never come back in a later recovery.
        """
        if self._apply_or_refuse(apply, logged_at):
            return False
        if logged_at is not None:
            self._log().truncate(logged_at)
        self._rebuild(self.version.get(), extra_rows=extra_rows, extra_heap=extra_heap)  # starts a new log
        m = self.version.get()
        mark = self._logged(m, kind, count, parts)
        if not self._apply_or_refuse(apply, None if logged_at is None else mark):
            if logged_at is None:  # a logged batch that no version can hold: the log is damaged
                raise CorruptTableError(f"{self.path}: a logged batch does not fit even after growing")
            raise SchemaError("internal: table did not grow enough")
        return True

    def _apply_or_refuse(self, apply: Apply, logged_at: int | None) -> bool:
        """Apply a batch to the current version. If the file system refuses its space (the file is
        sparse: a full disk fails the reservation, before anything is written), take the batch
        back out of the log (unless it came from the log: recovery) and raise :class:`StorageError`."""
        try:
            return apply(self.version.get())
        except OSError as exc:
            if logged_at is not None:
                self._log().truncate(logged_at)
            raise StorageError.from_os_error(exc, f"table {self.name!r}: no space for the batch") from exc

    # ---------------------------------------------------------------- versions

    def _rebuild(self, m: Mapping, extra_rows: int, extra_heap: int) -> None:
        """Copy the live rows into a larger (or compacted) new version and publish it. Lock held."""
        lay = m.layout
        live = int(m.counters[Counter.LIVE])
        need = live + extra_rows
        # grow by 7/5, not 2: the index is sized to the capacity and allocated whole, and
        # right after growth its load is 0.75 / 1.4 = 0.54, so a slot costs under 15 bytes a row
        # (the spare rows themselves are sparse, so cost nothing until used)
        grown = max(lay.row_capacity * 7 // 5, need + need // 8)
        capacity = lay.row_capacity if need <= lay.row_capacity else grown
        keys, vectors, tags = export_live(m)
        heap = 0
        if lay.key_type == "str":
            heap_needed = heap_bytes(keys) + extra_heap
            heap = lay.heap_capacity if heap_needed <= lay.heap_capacity else max(2 * lay.heap_capacity,
                                                                                  heap_needed * 5 // 4)
        new_layout = Layout.plan(lay.dim, lay.dtype, lay.key_type, capacity, heap, time.time_ns(), tagged=lay.tagged)
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
            raise StorageError.from_os_error(exc, f"table {self.name!r}: could not write a new version") from exc
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
        old = self.version.mapping
        if old is not None:
            old.counters[Counter.DIRTY] = 0
            old.counters[Counter.SUPERSEDED] = 1
        os.unlink(prev)
        m = self.version.switch()
        # we are still inside a write (a put that grew the table applies its batch next):
        # mark the new version so a crash from here on is recovered from its log
        m.counters[Counter.DIRTY] = os.getpid()
        # the new version holds every logged write: start its log empty
        self._log().reset(m.layout.created_ns, int(m.counters[Counter.GENERATION]))
        self._wal_checked = (os.getpid(), m.layout.created_ns)

    def _drop(self) -> None:
        m = self.version.get()
        prev = keep_previous(self.path)  # see _install: flagged later if we die before the flag
        os.unlink(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(wal_path(self.path))
        m.counters[Counter.SUPERSEDED] = 1
        os.unlink(prev)

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint a durable table's log (unless ``checkpoint=False``), close it and the lock file.

        Only this process's: a forked child closes nothing its parent still uses. Whatever the
        checkpoint meets (the table dropped or replaced by a foreign file, the lock held, a full
        disk), the log and the lock are still closed: the next writer recovers from the log.
        """
        try:
            if (checkpoint and self._wal is not None and self._wal.pid == os.getpid()
                    and self.version.mapping is not None and self._wal.size() > 64):
                with contextlib.suppress(EmbkvError), self.session() as session:
                    session.checkpoint()
        finally:
            if self._wal is not None and self._wal.pid == os.getpid():
                self._wal.close()
            self._wal = None
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                os.close(self._lock_fd)
            self._lock_fd = None


class WriteSession:
    """What may be done to a table while its writer lock is held (see :meth:`TableWriter.session`).

    Obtained with ``table.write_session()``; valid only inside that ``with`` block.
    """

    def __init__(self, writer: TableWriter) -> None:
        self._writer = writer
        self._active = True

    def _held(self) -> TableWriter:
        if not self._active:
            raise WriterLockedError(f"table {self._writer.name!r}: this write session ended with its with block")
        return self._writer

    @property
    def mapping(self) -> Mapping:
        """The current version (it changes when the session publishes one)."""
        return self._held().version.get()

    def log(self, kind: int, count: int, parts: list[Any]) -> int:
        """Append a batch to the log before applying it; returns where its record starts."""
        return self._held()._logged(self.mapping, kind, count, parts)

    def write(self, kind: int, count: int, parts: list[Any], apply: Apply, *, extra_rows: int,
              extra_heap: int = 0) -> None:
        """Log a batch (``parts``: its record payload), then apply it, growing the table if it has no room."""
        w = self._held()
        mark = w._logged(self.mapping, kind, count, parts)
        w._apply_growing(kind, count, parts, apply, extra_rows=extra_rows, extra_heap=extra_heap, logged_at=mark)
        if checkpoint_due(w._log()):
            w._checkpoint(self.mapping)

    def checkpoint(self) -> None:
        """Flush the table file to disk and empty the log."""
        self._held()._checkpoint(self.mapping)

    def publish(self, layout: Layout, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
        """Build a whole new version from ``chunks`` and publish it atomically."""
        self._held()._publish(layout, chunks, progress)

    def rebuild(self, extra_rows: int = 0, extra_heap: int = 0) -> None:
        """Copy the live rows into a fresh version in the current format (compacted) and publish it."""
        w = self._held()
        w._rebuild(self.mapping, extra_rows=extra_rows, extra_heap=extra_heap)

    def install(self, complete_file: str) -> None:
        """Make a complete, synced table file (built elsewhere, e.g. a copy) the current version."""
        self._held()._install(complete_file)

    def drop(self) -> None:
        """Delete the table: readers that still map it learn it on their next call."""
        self._held()._drop()
