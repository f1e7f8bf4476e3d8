"""Table files of older format versions: read them for ``embkv upgrade``, and write them for its tests.

Versions 2 (embkv 0.2) and 3 (unreleased, between 0.2 and format 4) share one layout:
``slot_count`` (a power of two) x (key u64, row u64) index slots; int rows ``seq | key |
[tag] | vector``; string rows ``seq | xxh3 | heap offset | length | 24 inline bytes | [tag] |
vector`` with every key's bytes in the heap. Version 2 has no flags word (every row tagged)
and its header CRC at 112; version 3 has flags and a reserved word, CRC at 120. This embkv
does not open them as tables (the kernels read format 4 only): :func:`read_legacy` copies
their live rows out with numpy, bounds-checking everything it reads, so that
``Store.upgrade_table`` can publish them as a format-4 version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import xxhash

from ..errors import (
    CorruptTableError,
    FormatVersionError,
    NotATableError,
    StorageError,
    TableNotFoundError,
    TruncatedTableError,
)
from .codec import QUANTIZED, stored_bytes
from .format import (
    COUNTERS_OFFSET,
    DTYPES,
    FORMAT_VERSION,
    HEADER_SIZE,
    KEY_TYPES,
    MAGIC,
    PAGE,
    UPGRADABLE_VERSIONS,
    Counter,
    DTypeName,
    KeyType,
    Layout,
)
from .kernels import mix64, pack_str
from .mapping import Chunk, build_version
from .publish import (
    finish_interrupted_publish,
    fsync_dir,
    is_memory_path,
    keep_previous,
    lock_path,
    temp_path,
    wait_for_flock,
)
from .wal import log_from_another_boot, wal_path

__all__ = ["LegacyRows", "file_version", "read_legacy", "upgrade_file", "write_legacy"]

UPGRADE_CHUNK = 65536  # rows per kernel call while the new version is built

_V2 = struct.Struct("<8sIIIIII QQQQ QQQQ QQ")
_V3 = struct.Struct("<8sIIIIII QQQQ QQQQ QQ II")
_TOMB = np.uint64(0xFFFFFFFFFFFFFFFF)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_KEY_NAMES = {v: k for k, v in KEY_TYPES.items()}


@dataclasses.dataclass
class LegacyRows:
    """The live rows of an old table file, as ``read_legacy`` found them."""

    version: int
    dim: int
    dtype: DTypeName
    key_type: KeyType
    tagged: bool
    keys: Any  # int64 array, or a list of key bytes
    vectors: np.ndarray  # stored vectors: float rows in their dtype, int8 / bfloat16 rows as raw bytes
    tags: np.ndarray  # u64 per row (0 where untagged)
    dirty: int  # pid of a writer that died inside a batch (0: clean)
    created_ns: int  # the version's creation stamp (its log is recognized by it)


def file_version(path: str) -> int:
    """The format version in a table file's header (typed errors for a foreign or short file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        raise TableNotFoundError(f"no table file at {path}") from None
    if head[:8] != MAGIC:
        raise NotATableError(f"{path}: not an embkv table file (magic {head[:8]!r})")
    if len(head) < 12:
        raise TruncatedTableError(f"{path}: file ends inside its header")
    return int(struct.unpack_from("<I", head, 8)[0])


def read_legacy(path: str) -> LegacyRows:
    """Copy the live keys, stored vectors and tags out of a version-2 or version-3 file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            raise TruncatedTableError(f"{path}: file ends inside its header ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read(path, mm, size)
    finally:
        # a view of the mapping may still be alive in a traceback: the memory goes with it then
        with contextlib.suppress(BufferError):
            mm.close()


def _read(path: str, mm: mmap.mmap, size: int) -> LegacyRows:
    head = mm[:HEADER_SIZE]
    version = int(struct.unpack_from("<I", head, 8)[0])
    if version not in (2, 3):
        raise FormatVersionError(f"{path}: format version {version} is not one `embkv upgrade` reads (2 or 3)")
    fixed = _V2 if version == 2 else _V3
    fields = fixed.unpack_from(head)
    if zlib.crc32(head[: fixed.size]) != struct.unpack_from("<I", head, fixed.size)[0]:
        raise CorruptTableError(f"{path}: header checksum mismatch (the header is damaged)")
    (_, _, _, dim, dtype_code, key_code, row_header, row_stride, slot_count, row_capacity, heap_capacity,
     index_offset, rows_offset, freelist_offset, heap_offset, file_size, created_ns) = fields[:17]
    tagged = version == 2 or bool(fields[17] & 1)
    if dtype_code not in _DTYPE_NAMES or key_code not in _KEY_NAMES or not 0 < dim <= 1 << 16:
        raise CorruptTableError(f"{path}: header fields out of range")
    dtype, key_type = _DTYPE_NAMES[dtype_code], _KEY_NAMES[key_code]
    vec_bytes = stored_bytes(dtype, dim)
    want_header = (16 if key_type == "int64" else 56) + (8 if tagged else 0)
    sections = [(index_offset, 16 * slot_count), (rows_offset, row_capacity * row_stride),
                 (freelist_offset, 8 * row_capacity), (heap_offset, heap_capacity)]
    if (row_header != want_header or row_stride < row_header + vec_bytes or row_stride % 8
            or slot_count < 1 or slot_count & (slot_count - 1) or file_size > size
            or any(start < HEADER_SIZE or start + length > file_size for start, length in sections)
            or index_offset + 16 * slot_count > rows_offset
            or rows_offset + row_capacity * row_stride > freelist_offset):
        raise CorruptTableError(f"{path}: header section offsets are inconsistent")
    counters = np.frombuffer(mm, dtype=np.uint64, count=Counter.COUNT, offset=COUNTERS_OFFSET).copy()
    slots = np.frombuffer(mm, dtype=np.uint64, count=2 * slot_count, offset=index_offset).reshape(-1, 2)
    srow = slots[:, 1]
    live = np.flatnonzero((srow != 0) & (srow != _TOMB))
    rows_u = srow[live] - np.uint64(1)
    if (rows_u >= np.uint64(row_capacity)).any():
        raise CorruptTableError(f"{path}: index points outside the row area; run `embkv check` with embkv 0.2")
    rows = np.sort(rows_u.astype(np.int64))
    area = np.frombuffer(mm, dtype=np.uint8, count=row_capacity * row_stride,
                         offset=rows_offset).reshape(row_capacity, row_stride)
    picked = area[rows]
    meta = np.ascontiguousarray(picked[:, :row_header]).view(np.uint64)
    raw = np.ascontiguousarray(picked[:, row_header : row_header + vec_bytes])
    vectors = raw if dtype in QUANTIZED else raw.view(dtype)
    tags = meta[:, -1].copy() if tagged else np.zeros(len(rows), dtype=np.uint64)
    damaged = _damaged_rows(picked, meta, row_header + vec_bytes)
    keys: Any
    if key_type == "int64":
        keys = meta[:, 1].view(np.int64).copy()
    else:
        heap = np.frombuffer(mm, dtype=np.uint8, count=heap_capacity, offset=heap_offset)
        keys = []
        for i, (hashed, off, length) in enumerate(meta[:, 1:4].tolist()):
            key = heap[off : off + length].tobytes() if off + length <= heap_capacity else None
            if key is None or xxhash.xxh3_64_intdigest(key) != hashed:
                damaged.append(int(rows[i]))
                key = b""
            keys.append(key)
    if damaged:
        raise CorruptTableError(f"{path}: {len(damaged)} row(s) of the old file are damaged (checksum or key bytes), "
                                f"e.g. row {damaged[0]}; repair it with embkv 0.2 (`embkv repair`) before upgrading")
    return LegacyRows(version, dim, dtype, key_type, tagged, keys, vectors, tags, int(counters[Counter.DIRTY]),
                      int(created_ns))


def upgrade_file(path: str, name: str, lock_timeout: float, headroom: int = 32) -> bool:
    """Rewrite the old-format table file at ``path`` in the current format; False if already current.

    Takes the table's writer lock (an embkv 0.2 writer holds the same ``flock``), copies the
    live rows into a new version sized to them plus 1/``headroom``, and publishes it as
    every publish does: rename over the path, then flag the old file ``superseded`` so that
    embkv 0.2 readers still mapping it let go. A file whose last writer died inside a
    batch is refused: only embkv 0.2 can complete that batch from its log.
    """
    if file_version(path) == FORMAT_VERSION:
        return False
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        wait_for_flock(fd, lock_timeout, f"table {name!r}")
        finish_interrupted_publish(path)
        version = file_version(path)
        if version == FORMAT_VERSION:
            return False  # another process upgraded it while we waited
        if version not in UPGRADABLE_VERSIONS:
            raise FormatVersionError(f"{path}: format version {version} cannot be upgraded; export it with "
                                     "the embkv that wrote it and load it again")
        old = read_legacy(path)
        if old.dirty or log_from_another_boot(wal_path(path), old.created_ns):
            why = (f"a writer of embkv 0.2 (pid {old.dirty}) died inside a batch" if old.dirty
                   else "its write-ahead log dates from before the last reboot")
            raise StorageError(f"table {name!r}: {why}; open the table once with embkv 0.2 (it replays the "
                               "log), then upgrade")
        _publish_upgrade(path, old, headroom)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return True


def _publish_upgrade(path: str, old: LegacyRows, headroom: int) -> None:
    n = len(old.keys)
    if old.key_type == "str":
        packed = pack_str(old.keys)
        heap = len(packed[2]) + 8 * n
    capacity = n + n // headroom
    layout = Layout.plan(old.dim, old.dtype, old.key_type, capacity, heap if old.key_type == "str" else 0,
                         time.time_ns(), tagged=old.tagged)

    def chunks() -> Iterator[Chunk]:
        for start in range(0, n, UPGRADE_CHUNK):
            end = min(n, start + UPGRADE_CHUNK)
            keys = old.keys[start:end] if old.key_type == "int64" else pack_str(old.keys[start:end])
            yield keys, np.ascontiguousarray(old.vectors[start:end]), np.ascontiguousarray(old.tags[start:end])

    tmp = temp_path(path)
    try:
        build_version(tmp, layout, chunks())
        durable = not is_memory_path(path)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        keep_previous(path)
        os.rename(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(path))
        finish_interrupted_publish(path)  # flags the replaced file superseded, drops the link
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _damaged_rows(picked: np.ndarray, meta: np.ndarray, covered: int) -> list[int]:
    """Rows whose seq word is odd or whose checksum (xxh3 of everything after it) is wrong."""
    seq = meta[:, 0].tolist()
    return [i for i, word in enumerate(seq)
            if word & 1 or word >> 32 != xxhash.xxh3_64_intdigest(picked[i, 8:covered].tobytes()) & 0xFFFFFFFF]


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def write_legacy(path: str, keys: Any, vectors: np.ndarray, *, dtype: DTypeName = "float32", version: int = 2,
                 tagged: bool = True, tags: np.ndarray | None = None, created_ns: int = 1) -> int:
    """Write a table file exactly as embkv 0.2 (version 2) or the unreleased version 3 laid it out.

    For the upgrade's tests and the memory benchmark: rows sized with 1/8 spare, the index a
    power of two at most 60% full, every section allocated. ``vectors`` are the stored rows
    (float rows in ``dtype``; int8 / bfloat16 as ``encode_rows`` gives them). Returns the file's size.
    """
    if version == 2 and not tagged:
        raise ValueError("every version-2 row carries a tag word")
    str_keys = not isinstance(keys, np.ndarray)
    n = len(keys)
    raw = np.ascontiguousarray(vectors).view(np.uint8).reshape(n, -1)
    dim = vectors.shape[1] if dtype not in QUANTIZED else _dim_of(dtype, raw.shape[1])
    vec_bytes = stored_bytes(dtype, dim)
    encoded = [k.encode() if isinstance(k, str) else bytes(k) for k in keys] if str_keys else []
    row_header = (56 if str_keys else 16) + (8 if tagged else 0)
    row_stride = row_header + (vec_bytes + 7) // 8 * 8
    capacity = max(16, n + n // 8)
    slot_count = 1 << max(4, (int(capacity / 0.6) + 1 - 1).bit_length())
    heap_capacity = max(sum(len(k) for k in encoded), 4096) if str_keys else 0
    index_offset = HEADER_SIZE
    rows_offset = _align(index_offset + 16 * slot_count)
    freelist_offset = _align(rows_offset + capacity * row_stride)
    heap_offset = _align(freelist_offset + capacity * 8)
    file_size = _align(heap_offset + heap_capacity)
    fixed = _V2 if version == 2 else _V3
    values = [MAGIC, version, HEADER_SIZE, dim, DTYPES[dtype], KEY_TYPES["str" if str_keys else "int64"],
              row_header, row_stride, slot_count, capacity, heap_capacity, index_offset, rows_offset,
              freelist_offset, heap_offset, file_size, created_ns]
    if version == 3:
        values += [1 if tagged else 0, 0]
    header = bytearray(HEADER_SIZE)
    packed = fixed.pack(*values)
    header[: len(packed)] = packed
    header[fixed.size : fixed.size + 4] = struct.pack("<I", zlib.crc32(packed))
    buf = np.zeros(file_size, dtype=np.uint8)
    buf[:HEADER_SIZE] = np.frombuffer(bytes(header), dtype=np.uint8)
    counters = buf[COUNTERS_OFFSET : COUNTERS_OFFSET + 8 * Counter.COUNT].view(np.uint64)
    counters[Counter.LIVE] = n
    counters[Counter.ROWS_USED] = n
    rows = buf[rows_offset : rows_offset + capacity * row_stride].reshape(capacity, row_stride)
    meta = rows[:, :row_header].view(np.uint64)
    rows[:n, row_header : row_header + vec_bytes] = raw[:, :vec_bytes]
    if tagged:
        meta[:n, -1] = np.zeros(n, dtype=np.uint64) if tags is None else tags
    if str_keys:
        slotkeys = np.fromiter((xxhash.xxh3_64_intdigest(k) for k in encoded), dtype=np.uint64, count=n)
        starts = slotkeys
        heap = buf[heap_offset : heap_offset + heap_capacity]
        pos = 0
        for i, k in enumerate(encoded):
            heap[pos : pos + len(k)] = np.frombuffer(k, dtype=np.uint8)
            inline = k[:24].ljust(24, b"\0")
            meta[i, 1:4] = [slotkeys[i], pos, len(k)]
            meta[i, 4:7] = np.frombuffer(inline, dtype=np.uint64)
            pos += len(k)
        counters[Counter.HEAP_USED] = pos
    else:
        slotkeys = np.asarray(keys, dtype=np.int64).view(np.uint64)
        starts = mix64(slotkeys.view(np.int64))
        meta[:n, 1] = slotkeys
    for i in range(n):
        checksum = xxhash.xxh3_64_intdigest(rows[i, 8 : row_header + vec_bytes].tobytes()) & 0xFFFFFFFF
        meta[i, 0] = (checksum << 32) | 2
    slots = buf[index_offset : index_offset + 16 * slot_count].view(np.uint64).reshape(-1, 2)
    _insert_all(slots, slotkeys, starts)
    with open(path, "xb") as f:
        f.write(buf.tobytes())
    return file_size


def _insert_all(slots: np.ndarray, slotkeys: np.ndarray, starts: np.ndarray) -> None:
    """Linear-probing inserts of distinct keys into an empty power-of-two index, in lockstep."""
    mask = np.uint64(len(slots) - 1)
    pos = starts & mask
    pending = np.arange(len(slotkeys))
    while len(pending):
        free = slots[pos[pending], 1] == 0
        claim = pending[free]
        _, first = np.unique(pos[claim], return_index=True)
        won = claim[first]
        slots[pos[won], 0] = slotkeys[won]
        slots[pos[won], 1] = won.astype(np.uint64) + np.uint64(1)
        lost = np.setdiff1d(pending, won)
        occupied = lost[slots[pos[lost], 1] != 0]
        pos[occupied] = (pos[occupied] + np.uint64(1)) & mask
        pending = lost


def _dim_of(dtype: DTypeName, width: int) -> int:
    return width - 4 if dtype == "int8" else width // 2
