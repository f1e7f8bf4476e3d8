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
from typing import Any

import numpy as np

from ..errors import CorruptTableError, SchemaError, TableNotFoundError
from .codec import QUANTIZED
from .format import COUNTERS_OFFSET, HEADER_SIZE, Counter, Layout, check_counters
from .kernels import SLOT_EMPTY, SLOT_TOMB, KernelView, make_view
from .publish import is_memory_path

__all__ = [
    "Chunk",
    "Mapping",
    "Progress",
    "build_version",
    "bytes_per_row",
    "copy_version",
    "create_allocated",
    "export_live",
    "live_keys",
    "put_packed",
    "row_tags",
    "row_vectors",
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

    def flush(self) -> None:
        """msync the whole file (a no-op in shared memory, where nothing goes to disk)."""
        if not is_memory_path(self.path):
            self.mm.flush()

    # the parts of the file that writers and exporters read with numpy
    def slots(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint64, count=2 * lay.slot_count,
                             offset=lay.index_offset).reshape(-1, 2)

    def rows(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint8, count=lay.row_capacity * lay.row_stride,
                             offset=lay.rows_offset).reshape(lay.row_capacity, lay.row_stride)

    def freelist(self) -> np.ndarray:
        lay = self.layout
        return np.frombuffer(self.mm, dtype=np.uint64, count=lay.row_capacity, offset=lay.freelist_offset)


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


def put_packed(view: KernelView, layout: Layout, keys: Any, vectors: np.ndarray, tags: np.ndarray | None) -> bool:
    """Upsert packed keys and stored vectors through the kernel; False (nothing written) if the version has no room.

    ``tags`` are ignored by a table whose rows keep no tag word.
    """
    if layout.key_type == "int64":
        return view.put_int(keys, vectors, tags)
    hashes, offsets, blob = keys
    return view.put_str(hashes, offsets, blob, vectors, tags)


def build_version(path: str, layout: Layout, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
    """Write a complete new table file at ``path`` (which must not exist) from (keys, vectors, tags) chunks."""
    fd = create_allocated(path, layout.file_size)
    try:
        os.pwrite(fd, layout.pack_header(), 0)
    finally:
        os.close(fd)
    mapping = Mapping(path, writable=True)
    try:
        for keys, vectors, tags in chunks:
            if not put_packed(mapping.view, layout, keys, vectors, tags):
                raise SchemaError("internal: a fresh table version was sized too small")
            if progress is not None:
                progress(len(vectors))
        mapping.flush()
    finally:
        mapping.close()


def copy_version(m: Mapping, dest: str, durable: bool) -> None:
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
    slots = m.slots()
    live, rows, in_range = slot_rows(slots, lay.row_capacity)
    if not in_range.all():
        raise CorruptTableError(f"{m.path}: index points outside the row area; run `embkv check`")
    order = np.argsort(rows, kind="stable")  # sequential reads of the row area
    rows = rows[order]
    vectors = row_vectors(m, rows)
    tags = row_tags(m, rows)
    if lay.key_type == "int64":
        return slots[live[order], 0].view(np.int64).copy(), vectors, tags
    return m.view.export_str(rows), vectors, tags


def live_keys(m: Mapping) -> Any:
    """Keys of the live rows: int64 array, or packed (hashes, offsets, blob) for a str table."""
    slots = m.slots()
    live, rows, in_range = slot_rows(slots, m.layout.row_capacity)
    if m.layout.key_type == "int64":
        return slots[live, 0].view(np.int64).copy()
    return m.view.export_str(rows[in_range])


def bytes_per_row(m: Mapping) -> dict[str, float]:
    """Where the bytes of this version go, per live row: what ``info()["bytes_per_row"]`` reports.

    ``vector`` is the stored vector (int8: codes and scale); ``row_header`` the row's own words
    (sequence, key fields, tag) plus padding to 8 bytes; ``index`` the hash slots; ``spare`` rows
    allocated but not live (free or never used); ``free_list`` its stack; ``key_heap`` string
    key bytes; ``overhead`` all but the vector, and ``total`` the whole file over the live rows.
    With no live row every share is counted over one row.
    """
    lay = m.layout
    live = max(1, int(m.counters[Counter.LIVE]))
    spare_rows = lay.row_capacity - int(m.counters[Counter.LIVE])
    shares = {
        "vector": float(lay.vec_bytes),
        "row_header": float(lay.row_stride - lay.vec_bytes),
        "index": lay.slot_count * 16 / live,
        "spare": spare_rows * lay.row_stride / live,
        "free_list": lay.row_capacity * 8 / live,
        "key_heap": lay.heap_capacity / live,
        "total": lay.file_size / live,
    }
    shares["overhead"] = shares["total"] - shares["vector"]
    return {k: round(v, 2) for k, v in shares.items()}
