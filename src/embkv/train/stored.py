"""The stored rows of a training table: the last checkpoint's rows, and the spill of what came since.

Two embkv tables of the store hold them. ``<name>.train`` has the rows as of the last
checkpoint; ``<name>.train-spill`` has every row written since (evicted dirty from a hot
cache, or written through by a shared trainer), and a *tombstone* for every row deleted since.
A read looks in the spill first. A checkpoint merges the spill into the checkpointed rows
(upserts, then deletes) and empties it; checkpoint.py gives the order that makes this
crash-safe.

A tombstone is a spill row whose first float holds the NaN payload :data:`TOMBSTONE_BITS`.
No stored row can hold it: training rows refuse NaN on the way in, and arithmetic on finite
floats yields only the default NaN, never this payload. So a tombstone needs no other column
and is read in the same batched ``pread`` as the rows.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile

import numpy as np

from ..errors import CorruptTableError
from ..file.publish import pid_alive
from ..file.store import Store
from ..file.table import Table

__all__ = ["TOMBSTONE_BITS", "StoredRows"]

CHUNK = 8192  # rows per read when merging or scanning: 4 MiB of dim-64 Adagrad rows
# rows per put: a put reads each row it replaces and its index slot through the mapping, and
# every such read fault also maps up to 64 KiB of neighbouring page-cache pages (the kernel's
# fault-around), so a put maps up to 128 KiB a row before the budget below can drop it: 256 rows
# keep one put under 32 MiB (18 MiB measured)
WRITE_CHUNK = 256
# file pages a trainer may keep mapped before it drops them: pages written are dropped once this
# process maps this much more file memory than after its last drop, not after every put, so the
# index pages that every put touches stay mapped between drops instead of faulting in again
MAPPED_BUDGET = 16 << 20
READ_THREADS = 8  # parallel preads when cold rows load (a disk keeps several in flight)
PUBLISH_PREFIX = ".train-publish."  # + name.pid.random.npy: the weights a publish streams through
TOMBSTONE_BITS = 0x7FD1E7ED  # a quiet NaN with a payload arithmetic never makes


def _tombstones(rows: np.ndarray) -> np.ndarray:
    """Which of these spill rows are tombstones."""
    first: np.ndarray = np.ascontiguousarray(rows[:, 0]).view(np.uint32) == TOMBSTONE_BITS
    return first


class StoredRows:
    """``<name>.train`` and ``<name>.train-spill`` of one training table, read and changed as one.

    ``shared``: several trainer processes use these tables (each through its own objects), so
    the spill is emptied by deleting its rows, not by dropping its file under the others.
    """

    def __init__(self, store: Store, name: str, width: int, *, create: bool, shared: bool) -> None:
        self.store, self.name, self.width, self.shared = store, name, width, shared
        self._mapped_after_release = _mapped_file_bytes()
        if create:
            self.rows = store.create_table(f"{name}.train", width, tags=True, exist_ok=True)
        else:
            self.rows = store[f"{name}.train"]
        self.rows.advise_random()
        # a crash while the spill table was emptied (dropped, not yet made again) leaves none
        self.spill = self._new_spill(exist_ok=True)

    def _new_spill(self, exist_ok: bool = False) -> Table:
        """The spill table, made big enough for every checkpointed row: growing it would copy it
        through this process's memory. The file is sparse, so the size costs only its index
        (about 11 bytes a row) until rows are written."""
        capacity = max(1024, len(self.rows) + len(self.rows) // 8)
        spill = self.store.create_table(f"{self.name}.train-spill", self.width, tags=True, exist_ok=exist_ok,
                                        capacity=capacity)
        spill.advise_random()
        return spill

    # ---------------------------------------------------------------- reads

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of distinct ``ids``: (rows [n, width], found [n]); a tombstone reads as not found.

        Read with batched ``pread`` (``Table.read_rows``), not through the mappings: cold rows
        come from disk in parallel, and this process's memory holds its cache, not the pages read.
        """
        if len(self.spill):
            rows, found = self.spill.read_rows(ids, READ_THREADS)
            gone = found & _tombstones(rows)
        else:
            rows = np.zeros((len(ids), self.width), dtype=np.float32)
            found = np.zeros(len(ids), dtype=np.bool_)
            gone = np.zeros(len(ids), dtype=np.bool_)
        look = np.flatnonzero(~found)
        if len(look):
            more, found_more = self.rows.read_rows(ids[look], READ_THREADS)
            rows[look[found_more]] = more[found_more]
            found[look[found_more]] = True
        found &= ~gone
        rows[gone] = 0
        return rows, found

    def keys(self) -> np.ndarray:
        """The ids stored (sorted): checkpointed or spilled, less those deleted since."""
        spilled = self.spill.keys()
        dead = np.zeros(len(spilled), dtype=np.bool_)
        for start in range(0, len(spilled), CHUNK):  # read in chunks by pread: no copy of the spill
            rows, _ = self.spill.read_rows(spilled[start : start + CHUNK], READ_THREADS)
            dead[start : start + len(rows)] = _tombstones(rows)
        live = np.union1d(self.rows.keys(), spilled[~dead])
        self.release_pages()  # the key scans mapped the indexes
        result: np.ndarray = np.setdiff1d(live, spilled[dead], assume_unique=True)
        return result

    # ---------------------------------------------------------------- writes since the checkpoint

    def write(self, ids: np.ndarray, rows: np.ndarray, steps: np.ndarray, *, atomic: bool = False) -> None:
        """Spill rows (each tagged with the step it was last touched at).

        The puts write through the spill's mapping, 256 rows at a time, and this process's pages
        of the tables are dropped whenever it maps ``MAPPED_BUDGET`` more (they stay in the page
        cache), so a trainer's memory does not grow with the rows it spills. ``atomic``: one put,
        so that a trainer killed in the middle leaves all of it or none (a shared trainer's push,
        which the others may checkpoint)."""
        self._put(self.spill, ids, rows, steps.astype(np.uint64), max(1, len(ids)) if atomic else WRITE_CHUNK)

    def _put(self, table: Table, ids: np.ndarray, rows: np.ndarray, tags: np.ndarray,
             chunk: int = WRITE_CHUNK) -> None:
        """Upsert into one of the two tables ``chunk`` rows a put, within the mapped budget."""
        for start in range(0, len(ids), chunk):
            end = start + chunk
            table.put(ids[start:end], rows[start:end], tags=tags[start:end])
            self.keep_mapped_within_budget()

    def delete(self, ids: np.ndarray) -> None:
        """Delete rows as of the next checkpoint: a tombstone each in the spill."""
        grave = np.zeros((len(ids), self.width), dtype=np.float32)
        grave[:, 0] = np.array(TOMBSTONE_BITS, dtype=np.uint32).view(np.float32)
        self.write(ids, grave, np.zeros(len(ids), dtype=np.uint64))

    # ---------------------------------------------------------------- checkpoint

    def sync_spill(self) -> None:
        _sync(self.spill)

    def merge(self, evict_before_step: int) -> np.ndarray:
        """Fold the spill into the checkpointed rows, delete rows untouched since ``evict_before_step``
        (0: none) and empty the spill. Returns the ids evicted that way.

        Each part can be redone after a crash with the same result: upserts and deletes of the
        same rows, and an eviction that the stored tags alone decide."""
        keys = self.spill.keys()
        for start in range(0, len(keys), CHUNK):  # a chunk at a time: the spill is never copied whole
            part = keys[start : start + CHUNK]
            vectors, found, tags = self.spill.get_tagged(part)
            dead = _tombstones(vectors)
            live = found & ~dead
            self._put(self.rows, part[live], vectors[live], tags[live])
            if dead.any():
                self.rows.delete(part[dead])
            self.release_pages()
        old = [np.zeros(0, dtype=np.int64)]
        if evict_before_step > 0:
            stored = self.rows.keys()
            for start in range(0, len(stored), CHUNK):
                part = stored[start : start + CHUNK]
                _, found, tags = self.rows.get_tagged(part)
                old.append(part[found & (tags < np.uint64(evict_before_step))])
                self.rows.release_pages()
            for part in old:
                if len(part):
                    self.rows.delete(part)
        _sync(self.rows)
        self.release_pages()
        self.empty_spill()
        result: np.ndarray = np.concatenate(old)
        return result

    def empty_spill(self) -> None:
        """Forget what came after the last checkpoint (merged already, or lost to a crash), and
        give a sole trainer's spill room for every checkpointed row."""
        if not len(self.spill) and (self.shared or self.spill.capacity >= len(self.rows)):
            return
        if self.shared:  # other trainers hold this file open: empty it in place
            keys = self.spill.keys()
            for start in range(0, len(keys), CHUNK):
                self.spill.delete(keys[start : start + CHUNK])
            _sync(self.spill)
        else:  # a new empty file gives the space back
            self.store.drop_table(self.spill.name)
            self.spill = self._new_spill()

    def remove_stale_publish_files(self) -> None:
        """Delete the temporary files of publishes whose process died (a SIGKILL skips the cleanup)."""
        prefix = f"{PUBLISH_PREFIX}{self.name}."
        for entry in os.listdir(self.store.path):
            if not (entry.startswith(prefix) and entry.endswith(".npy")):
                continue
            pid = entry[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.store.path, entry))

    def release_pages(self) -> None:
        """Drop this process's mapped pages of both tables (the page cache keeps them)."""
        self.spill.release_pages()
        self.rows.release_pages()
        self._mapped_after_release = _mapped_file_bytes()

    def keep_mapped_within_budget(self) -> None:
        """Drop the tables' pages if this process maps ``MAPPED_BUDGET`` more file memory than
        after the last drop (/proc/self/statm; where it cannot be read, drop every time)."""
        mapped = _mapped_file_bytes()
        if mapped < 0 or mapped - self._mapped_after_release > MAPPED_BUDGET:
            self.release_pages()

    def publish_weights(self, serving_store: Store, name: str, dim: int) -> Table:
        """Load the first ``dim`` columns of the checkpointed rows as table ``name`` of ``serving_store``.

        The weights stream through a temporary ``.npy`` file beside these tables (``load_table``
        maps it), so a table larger than memory publishes in this process's memory of its keys
        (8 bytes a row) and one chunk of rows."""
        keys = self.rows.keys()
        fd, tmp = tempfile.mkstemp(prefix=f"{PUBLISH_PREFIX}{self.name}.{os.getpid()}.", suffix=".npy",
                                   dir=self.store.path)
        os.close(fd)
        try:
            with open(tmp, "wb") as f:  # written, not mapped: the file's pages do not join this process
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (len(keys), dim)}
                np.lib.format.write_array_header_2_0(f, header)
                for start in range(0, len(keys), CHUNK):
                    rows, found = self.rows.read_rows(keys[start : start + CHUNK], READ_THREADS)
                    if not found.all():
                        raise CorruptTableError(f"{self.rows.path}: rows vanished while {self.name!r} was published "
                                                "(the table changed under the trainer's lock)")
                    f.write(np.ascontiguousarray(rows[:, :dim]).tobytes())
            return serving_store.load_table(name, keys, tmp)
        finally:
            os.unlink(tmp)


def _mapped_file_bytes() -> int:
    """This process's resident file-backed and shared-memory pages, in bytes (-1 if unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return -1


def _sync(table: Table) -> None:
    """Flush a table file and empty its log: its rows survive a crash from here on."""
    with table.write_session() as session:
        session.checkpoint()
