"""One mapped version of a table file, and what is done to a whole version: build, copy, export.

Every function here works on one :class:`Mapping`; which version is current, and who may
write, is decided by the table (``table.py``) and its writer (``writer.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from ..errors import CorruptTableError, SchemaError, TableNotFoundError
from .codec import QUANTIZED
from .format import COUNTERS_OFFSET, HEADER_SIZE, INLINE_KEY, PAGE, Counter, Layout, check_counters
from .kernels import FP_SHIFT, ROW_FIELD, SLOT_EMPTY, SLOT_TOMB, KernelView, make_view
from .publish import is_memory_path

SCAN_BYTES = 8 << 20  # a key scan drops the pages it read every this many bytes (see row_int_keys)

__all__ = [
    "Chunk",
    "Mapping",
    "Progress",
    "build_version",
    "bytes_per_row",
    "copy_version",
    "create_sparse",
    "delete_packed",
    "export_live",
    "heap_bytes",
    "live_keys",
    "put_packed",
    "row_tags",
    "row_vectors",
    "slot_fingerprints",
    "slot_rows",
]

Progress = Callable[[int], None]
# what builds a version: (keys packed for the kernel, vectors, row tags or None for untagged)
Chunk = tuple[Any, np.ndarray, "np.ndarray | None"]


class Mapping:
    """One mapped version of a table file plus its kernel view.

    Opening validates the header and counters (a damaged or foreign file raises a typed
    error before anything reads the sections).
    """

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
        except BaseException:
            os.close(fd)
            raise
        # kept open: the writer reserves space through it, info() counts allocated blocks
        self.fd: int | None = fd
        self._reserved = {"rows": 0, "free": 0, "heap": 0}  # byte ends this process reserved
        self.path = path
        self.inode = (st.st_dev, st.st_ino)
        self.counters = np.frombuffer(self.mm, dtype=np.uint64, count=Counter.COUNT, offset=COUNTERS_OFFSET)
        check_counters(self.counters, self.layout, where=path)
        self.view: KernelView = make_view(self.mm, writable, self.layout)
        if writable:  # what lies below the counters was written, so is allocated
            c = self.counters
            self.view.set_limits(int(c[Counter.ROWS_USED]), int(c[Counter.HEAP_USED]), int(c[Counter.FREE]))

    def advise_random(self) -> None:
        """Tell the kernel this process reads and writes the file at random: no readahead for
        ``pread`` on its descriptor, none for faults on its mapping. Before the file's pages are
        in the page cache this also keeps them small: large folios (ext4 makes them on Linux
        >= 6.x) are mapped whole on a fault, so one touched row would map up to 2 MiB."""
        with contextlib.suppress(ValueError, OSError):
            self.mm.madvise(mmap.MADV_RANDOM)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def close(self) -> None:
        """Drop this process's references; the memory goes when the last in-flight call ends."""
        mm = self.mm
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.__dict__.pop("view", None)
        self.__dict__.pop("counters", None)
        # a call running on another thread still exports the buffer: the mapping then
        # closes when that call's view is garbage collected
        with contextlib.suppress(BufferError):
            mm.close()

    def flush(self) -> None:
        """msync the whole file (a no-op in shared memory, where nothing goes to disk)."""
        if not is_memory_path(self.path):
            self.mm.flush()

    def reserve(self, rows: int, heap_bytes: int = 0, free_entries: int | None = None) -> bool:
        """Allocate file space for a batch that may take ``rows`` new rows, free ``free_entries``
        (default: as many) and add ``heap_bytes`` of string keys, before the kernel writes
        there; returns whether the rows or heap reserved grew. Lock held.

        The file is sparse beyond its index (format.py): a write into a hole of a full disk or
        tmpfs would kill the writer with SIGBUS, so space is reserved first and a full disk is an
        ``OSError`` (ENOSPC) with nothing written. The kernel takes no new row or heap byte
        beyond what is reserved (``set_limits``). Reservations are rounded up to
        ``RESERVE_GRANULE`` so most batches make no system call.
        """
        lay = self.layout
        c = self.counters
        sections = {
            # rows come off the free stack first: only what it cannot give needs new space
            "rows": (lay.rows_offset, lay.row_stride, lay.row_capacity, int(c[Counter.ROWS_USED]),
                     max(0, rows - int(c[Counter.FREE]))),
            "free": (lay.freelist_offset, 8, lay.row_capacity, int(c[Counter.FREE]),
                     rows if free_entries is None else free_entries),
            "heap": (lay.heap_offset, 1, lay.heap_capacity, int(c[Counter.HEAP_USED]), heap_bytes),
        }
        grew = False
        for section, (start, unit, count, used, more) in sections.items():
            # what lies below the counter was written, so is allocated already: start from there
            done = max(self._reserved[section], unit * min(used, count) // PAGE * PAGE)
            need = unit * min(used + more, count)
            if need <= done:
                continue
            end = min(_align(need, RESERVE_GRANULE), _align(unit * count, PAGE))
            if self.fd is not None:
                _allocate(self.fd, start + done, end - done)
            self._reserved[section] = end
            grew = grew or section != "free"
        rows_end = max(self._reserved["rows"] // lay.row_stride, int(c[Counter.ROWS_USED]))
        free_end = max(self._reserved["free"] // 8, int(c[Counter.FREE]))
        self.view.set_limits(rows_end, max(self._reserved["heap"], int(c[Counter.HEAP_USED])), free_end)
        return grew

    def allocated_bytes(self) -> int:
        """Bytes of memory (``/dev/shm``) or disk the file holds: its allocated blocks."""
        if self.fd is None:
            return self.layout.file_size
        return os.fstat(self.fd).st_blocks * 512

    # the parts of the file that writers and exporters read with numpy
    def slots(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint64, count=lay.slot_count, offset=lay.index_offset)

    def rows(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint8, count=lay.row_capacity * lay.row_stride,
                             offset=lay.rows_offset).reshape(lay.row_capacity, lay.row_stride)

    def freelist(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint64, count=lay.row_capacity, offset=lay.freelist_offset)


RESERVE_GRANULE = 64 << 10  # bytes: reservations of the sparse sections are rounded up to this


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _allocate(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # no fallocate on this file system: it stays sparse, as a plain file would


def create_sparse(path: str, layout: Layout) -> int:
    """Create ``path`` (it must not exist) for ``layout``, its header and index allocated; returns the descriptor.

    The rest of the file is a hole until the writer reserves it (``Mapping.reserve``). The
    index is allocated whole because hashing touches all of it at once.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, layout.file_size)
        _allocate(fd, 0, layout.rows_offset)
    except BaseException:
        os.close(fd)
        raise
    return fd


def put_packed(m: Mapping, keys: Any, vectors: Any, tags: Any, *, may_free: bool = True) -> bool:
    """Upsert packed keys and stored vectors through the kernel; False (nothing written) if the version has no room.

    ``tags`` are ignored by a table whose rows keep no tag word. ``may_free=False`` (a fresh
    version being built: every key is new) reserves no room on the free-row stack.
    ``vectors`` and ``tags`` may be arrays or raw buffers (a replayed log record).
    """
    n = memoryview(vectors).nbytes // m.layout.vec_bytes
    free_entries = n if may_free else 0
    if m.layout.key_type == "int64":

        def put() -> Literal[True] | tuple[int, int]:
            return m.view.put_int(keys, vectors, tags)
    else:
        hashes, offsets, blob = keys

        def put() -> Literal[True] | tuple[int, int]:
            return m.view.put_str(hashes, offsets, blob, vectors, tags)

    # first within the space already reserved (updates take the rows they free, so a steady
    # stream of them needs no more); if it does not fit, the kernel says how many new rows and
    # heap bytes it needs: reserve that and try once more. No room even then: the table must grow
    m.reserve(0, free_entries=free_entries)
    result = put()
    if result is True:
        return True
    rows, heap = result
    return m.reserve(rows, heap, free_entries) and put() is True


def heap_bytes(keys: Any) -> int:
    """Heap bytes packed string keys take if all are new: a length word and the bytes of each
    key too long for its row."""
    lengths = np.diff(np.frombuffer(keys[1], dtype=np.uint64).astype(np.int64))
    return int((lengths[lengths > INLINE_KEY] + 8).sum())


def delete_packed(m: Mapping, keys: Any) -> int:
    """Delete packed keys through the kernel; returns how many were present."""
    if m.layout.key_type == "int64":
        m.reserve(0, free_entries=memoryview(keys).nbytes // 8)
        return m.view.delete_int(keys)
    m.reserve(0, free_entries=len(keys[0]) // 8)
    return m.view.delete_str(*keys)


def build_version(path: str, layout: Layout, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
    """Write a complete new table file at ``path`` (which must not exist) from (keys, vectors, tags) chunks."""
    fd = create_sparse(path, layout)
    try:
        os.pwrite(fd, layout.pack_header(), 0)
    finally:
        os.close(fd)
    mapping = Mapping(path, writable=True)
    try:
        for keys, vectors, tags in chunks:
            if not put_packed(mapping, keys, vectors, tags, may_free=False):
                raise SchemaError("internal: a fresh table version was sized too small")
            if progress is not None:
                progress(len(vectors))
        mapping.flush()
    finally:
        mapping.close()


def copy_version(m: Mapping, dest: str, durable: bool) -> None:
    """Write a copy of mapped version ``m`` to the new file ``dest``, as a fresh version.

    Only what is in use is copied (the index, rows up to the high-water mark, the free-row
    stack, the key heap), so the copy stays as sparse as the source. The copy gets its own
    creation stamp, so the destination never mistakes the source's write-ahead log for its
    own, and clean counters (no writer inside a batch). Lock held.
    """
    lay = m.layout
    fresh = dataclasses.replace(lay, created_ns=time.time_ns())
    c = m.counters
    used = [
        (lay.index_offset, lay.slot_count * 8),
        (lay.rows_offset, int(c[Counter.ROWS_USED]) * lay.row_stride),
        (lay.freelist_offset, int(c[Counter.FREE]) * 8),
        (lay.heap_offset, int(c[Counter.HEAP_USED])),
    ]
    fd = create_sparse(dest, lay)
    try:
        view = memoryview(m.mm)
        try:
            step = 64 << 20
            for start, length in used:
                _allocate(fd, start, length)
                for off in range(start, start + length, step):
                    os.pwrite(fd, view[off : min(off + step, start + length)], off)
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


def slot_rows(slots: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Live index slots: (slot numbers, row numbers as int64, row-in-range mask).

    The range test is done on the unsigned field: a damaged slot must never turn into a
    negative int64 that numpy would happily index from the end.
    """
    field = slots & ROW_FIELD
    live = np.flatnonzero((field != SLOT_EMPTY) & (field != SLOT_TOMB))
    rows_u = field[live] - np.uint64(1)
    in_range = rows_u < np.uint64(capacity)
    return live, np.where(in_range, rows_u, np.uint64(0)).astype(np.int64), in_range


def slot_fingerprints(slots: np.ndarray) -> np.ndarray:
    """The fingerprint (24 bits of the key's hash) each slot carries."""
    return slots >> FP_SHIFT


def row_int_keys(m: Mapping, rows: np.ndarray) -> np.ndarray:
    """The int64 key each of ``rows`` (sorted) holds (the word after its sequence word), copied.

    A scan of a big table reads every page of its rows: it drops the pages it read from this
    process every ``SCAN_BYTES`` (they stay in the page cache or ``/dev/shm``), so listing the
    keys of a table larger than memory does not map all of it (a trainer's memory bound)."""
    lay = m.layout
    every = m.rows()
    step = max(1, SCAN_BYTES // lay.row_stride)
    out = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        out[start : start + len(part)] = np.ascontiguousarray(every[part, 8:16]).view(np.int64).reshape(-1)
        if len(rows) > step:
            drop_pages(m, lay.rows_offset + int(part[0]) * lay.row_stride,
                       lay.rows_offset + (int(part[-1]) + 1) * lay.row_stride)
    return out


def drop_pages(m: Mapping, start: int, end: int) -> None:
    """Drop this process's mapped pages of bytes ``start..end`` of the file (MADV_DONTNEED on a
    shared file mapping only unmaps them: the data stays in the file and the page cache)."""
    page = mmap.PAGESIZE
    lo = start // page * page
    hi = min(len(m.mm), -(-end // page) * page)
    if hi > lo:
        with contextlib.suppress(ValueError, OSError):
            m.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def row_vectors(m: Mapping, rows: np.ndarray) -> np.ndarray:
    """The stored vectors of ``rows``, copied: float rows in their dtype, int8/bfloat16 rows as raw bytes.

    What a new version is built from (growth, repair); :func:`embkv.file.codec.decode_rows`
    turns them into what a read returns.
    """
    lay = m.layout
    raw = m.rows()[rows, lay.row_header : lay.row_header + lay.vec_bytes].copy()
    return raw if lay.dtype in QUANTIZED else raw.view(lay.dtype)


def row_tags(m: Mapping, rows: np.ndarray) -> np.ndarray:
    """The tag word of each of ``rows`` (the last word of the row header), copied."""
    lay = m.layout
    if not lay.tagged:
        return np.zeros(len(rows), dtype=np.uint64)
    return np.ascontiguousarray(m.rows()[rows, lay.row_header - 8 : lay.row_header]).view(np.uint64).reshape(-1)


def export_live(m: Mapping) -> tuple[Any, np.ndarray, np.ndarray]:
    """Keys (packed for str tables), vectors and tags of every live row. Writer lock held."""
    lay = m.layout
    _, rows, in_range = slot_rows(m.slots(), min(lay.row_capacity, int(m.counters[Counter.ROWS_USED])))
    if not in_range.all():  # beyond what was written: damage (and a read there would touch a hole)
        raise CorruptTableError(f"{m.path}: index points outside the row area; run `embkv check`")
    rows = np.sort(rows)  # sequential reads of the row area
    vectors = row_vectors(m, rows)
    tags = row_tags(m, rows)
    if lay.key_type == "int64":
        return row_int_keys(m, rows), vectors, tags
    return m.view.export_str(rows), vectors, tags


def live_keys(m: Mapping) -> Any:
    """Keys of the live rows: int64 array, or packed (hashes, offsets, blob) for a str table."""
    lay = m.layout
    _, rows, in_range = slot_rows(m.slots(), min(lay.row_capacity, int(m.counters[Counter.ROWS_USED])))
    rows = np.sort(rows[in_range])
    if lay.slot_count * 8 > SCAN_BYTES:  # the whole index was read: let it go too
        drop_pages(m, lay.index_offset, lay.index_offset + lay.slot_count * 8)
    if m.layout.key_type == "int64":
        return row_int_keys(m, rows)
    return m.view.export_str(rows)


def bytes_per_row(m: Mapping) -> dict[str, float]:
    """Where the bytes of this version go, per live row: what ``info()["bytes_per_row"]`` reports.

    ``vector`` is the stored vector (int8: codes and scale); ``row_header`` the row's own words
    (sequence, key fields, tag) plus padding to 8 bytes; ``index`` the hash slots; ``spare`` rows
    written but not live (free for reuse); ``free_list`` its stack; ``key_heap`` the bytes of
    string keys too long for their row; ``total`` the file's allocated bytes (what it costs in
    memory or on disk: the file is sparse) over the live rows, and ``overhead`` all but the
    vector. With no live row every share is counted over one row.
    """
    lay = m.layout
    c = m.counters
    live = max(1, int(c[Counter.LIVE]))
    spare_rows = max(0, int(c[Counter.ROWS_USED]) - int(c[Counter.LIVE]))
    shares = {
        "vector": float(lay.vec_bytes),
        "row_header": float(lay.row_stride - lay.vec_bytes),
        "index": lay.slot_count * 8 / live,
        "spare": spare_rows * lay.row_stride / live,
        "free_list": int(c[Counter.FREE]) * 8 / live,
        "key_heap": int(c[Counter.HEAP_USED]) / live,
        "total": m.allocated_bytes() / live,
    }
    shares["overhead"] = shares["total"] - shares["vector"]
    return {k: round(v, 2) for k, v in shares.items()}
