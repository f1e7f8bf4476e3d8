"""Index and row kernels: the compiled C path, and a pure-numpy fallback with the same interface.

``View`` wraps a mapped table file. The C extension (``embkv.file._kernels``, built at install)
is used when present; ``EMBKV_KERNEL=numpy`` forces the fallback, which reads with
vectorized numpy (one Python iteration per probe round, not per key) and writes with a
Python loop per key: correct and file-compatible, but slow for writes. Both follow the
protocol described in ``_kernels.c`` and ARCHITECTURE.md.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
import warnings
from typing import Any, Literal, Protocol

import numpy as np
import xxhash

from ..errors import CorruptTableError, KernelFallbackWarning, ReadRetryError
from .codec import QUANTIZED, decode_rows
from .format import COUNTERS_OFFSET, INLINE_KEY, MAX_LOAD, Counter, Layout

__all__ = ["KERNEL_BACKEND", "KernelView", "make_view", "mix64", "pack_str"]

# freshness status a classifying get writes per key (the values of embkv.cache HIT / OOV / STALE)
STATUS_FRESH, STATUS_MISS, STATUS_STALE = 0, 1, 2

_STATS_LOCK = threading.Lock()

SLOT_EMPTY = np.uint64(0)
SLOT_TOMB = np.uint64(0xFFFFFFFFFFFFFFFF)
_SPIN_ROUNDS = 10_000


class KernelView(Protocol):
    """What table.py needs from a kernel backend."""

    # ``tags``: None or a u64 buffer that receives each row's tag. ``min_version >= 0`` makes
    # ``found`` a freshness status per key (FRESH / MISS / STALE, see tag_status), with rows
    # filled more than ``max_age`` seconds ago stale (0: no limit), stale rows reported as
    # misses holding the default if ``stale_as_miss``, and calls, keys, fresh and stale rows
    # added to the int64[4] ``stats`` (GIL held: threads never lose counts)
    def get_int(self, keys: Any, out: Any, found: Any, default: Any = None, tags: Any = None,
                min_version: int = -1, max_age: int = 0, stats: Any = None, stale_as_miss: bool = False) -> int: ...
    def get_str(self, hashes: Any, offsets: Any, blob: Any, out: Any, found: Any, default: Any = None,
                tags: Any = None, min_version: int = -1, max_age: int = 0, stats: Any = None,
                stale_as_miss: bool = False) -> int: ...
    def get_strlist(self, keys: Any, out: Any, found: Any, default: Any = None, tags: Any = None,
                    min_version: int = -1, max_age: int = 0, stats: Any = None, stale_as_miss: bool = False) -> int: ...
    def put_int(self, keys: Any, vectors: Any, tags: Any = None) -> bool: ...
    def put_str(self, hashes: Any, offsets: Any, blob: Any, vectors: Any, tags: Any = None) -> bool: ...
    def delete_int(self, keys: Any) -> int: ...
    def delete_str(self, hashes: Any, offsets: Any, blob: Any) -> int: ...
    def export_str(self, rows: Any) -> tuple[bytes, bytes, bytes]: ...
    def verify_rows(self, rows: Any) -> list[tuple[int, str]]: ...
    def release(self) -> None: ...


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of int64 keys as uint64 (same as ``mix64`` in _kernels.c)."""
    x = keys.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _pack_str_py(keys: Any) -> tuple[bytes, bytes, bytes]:
    """Pure-Python twin of ``_kernels.pack_str``."""
    encoded = []
    for i, key in enumerate(keys):
        if isinstance(key, str):
            encoded.append(key.encode("utf-8"))
        elif isinstance(key, bytes):
            encoded.append(key)
        else:
            raise TypeError(f"string-keyed table: key #{i} is {type(key).__name__}, not str or bytes")
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(b) for b in encoded), dtype=np.uint64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.uint64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return hashes.tobytes(), offsets.tobytes(), b"".join(encoded)


def tag_status(tags: np.ndarray, min_version: int, min_time: int) -> np.ndarray:
    """FRESH where a row is untagged or its tag has version >= min_version and time >= min_time."""
    fresh = (tags == 0) | (((tags >> np.uint64(32)) >= np.uint64(min_version))
                           & ((tags & np.uint64(0xFFFFFFFF)) >= np.uint64(min_time)))
    return np.where(fresh, STATUS_FRESH, STATUS_STALE).astype(np.uint8)


def _exact_subset(exact: Any, subset: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    result: np.ndarray = exact(subset[idx], rows)
    return result


class NumpyView:
    """Fallback kernels over numpy views of the mapped file."""

    def __init__(self, buf: Any, writable: bool, layout: Layout) -> None:
        mv = memoryview(buf)
        if len(mv) < layout.file_size:
            raise CorruptTableError("table layout does not fit the mapped file")
        self._mv = mv
        self.writable = writable
        self.layout = layout
        self.key_type = 1 if layout.key_type == "int64" else 2
        raw = np.frombuffer(mv, dtype=np.uint8)
        self._raw = raw
        self.ctr = raw[COUNTERS_OFFSET : COUNTERS_OFFSET + 8 * Counter.COUNT].view(np.uint64)
        self.slots = raw[layout.index_offset : layout.index_offset + 16 * layout.slot_count].view(
            np.uint64).reshape(-1, 2)
        rows = raw[layout.rows_offset : layout.rows_offset + layout.row_capacity * layout.row_stride]
        self.rows = rows.reshape(layout.row_capacity, layout.row_stride)
        self.meta = self.rows[:, : layout.row_header].view(np.uint64)
        self.tag_word = layout.row_header // 8 - 1 if layout.tagged else 0  # 0: rows keep no tag
        self.vecs = self.rows[:, layout.row_header : layout.row_header + layout.vec_bytes]
        self.freelist = raw[layout.freelist_offset : layout.freelist_offset + 8 * layout.row_capacity].view(
            np.uint64)
        self.heap = raw[layout.heap_offset : layout.heap_offset + layout.heap_capacity]
        self.mask = np.uint64(layout.slot_count - 1)

    def release(self) -> None:
        for name in ("_raw", "ctr", "slots", "rows", "meta", "vecs", "freelist", "heap"):
            self.__dict__.pop(name, None)
        self._mv.release()

    # ---------------------------------------------------------------- reads

    def _heap_key(self, off: int, length: int) -> bytes | None:
        if off + length > self.layout.heap_capacity:
            return None
        return bytes(self.heap[off : off + length])

    def _lookup(self, slotkeys: np.ndarray, starts: np.ndarray, exact: Any) -> np.ndarray:
        """Probe all keys in lockstep (a Python iteration per probe step); the row per key or -1."""
        n = len(slotkeys)
        rows = np.full(n, -1, dtype=np.int64)
        pos = starts & self.mask
        pending = np.arange(n)
        cap = self.layout.row_capacity
        for _ in range(self.layout.slot_count):
            if not len(pending):
                break
            srow = self.slots[pos[pending], 1]
            skey = self.slots[pos[pending], 0]
            empty = srow == SLOT_EMPTY
            cand = (srow != SLOT_EMPTY) & (srow != SLOT_TOMB) & (skey == slotkeys[pending])
            hit_idx = pending[cand]
            if len(hit_idx):
                r = (srow[cand] - np.uint64(1)).astype(np.int64)
                if np.any((r < 0) | (r >= cap)):
                    raise CorruptTableError("index points outside the row area: the table file is corrupt")
                seq_before = self.meta[r, 0]
                ok = exact(hit_idx, r)
                rows[hit_idx[ok]] = r[ok]
                # another key in the row: a collision if the slot still points there (keep
                # probing), else the writer moved the slot meanwhile (read the same slot again)
                failed = np.flatnonzero(cand)[~ok]
                moved = (self.slots[pos[pending[failed]], 1] != srow[failed]) | (
                    self.meta[r[~ok], 0] != seq_before[~ok])  # rewritten meanwhile: it may have come back
                cand[failed] = False
                stay = np.zeros(len(pending), dtype=np.bool_)
                stay[failed[moved]] = True
                done = empty | cand
                advance = ~done & ~stay
                pending_next = pending[~done]
                pos[pending[advance]] = (pos[pending[advance]] + np.uint64(1)) & self.mask
                pending = pending_next
                continue
            else:
                done = empty
            pending = pending[~done]
            pos[pending] = (pos[pending] + np.uint64(1)) & self.mask
        return rows

    def _get(self, slotkeys: np.ndarray, starts: np.ndarray, exact: Any, out: Any, found: Any,
             default: Any, tags: Any, min_version: int, max_age: int, stats: Any, stale_as_miss: bool) -> int:
        if self.ctr[Counter.SUPERSEDED]:
            return -1
        found_arr = np.frombuffer(found, dtype=np.uint8)
        tags_arr = None if tags is None else np.frombuffer(tags, dtype=np.uint64)
        row_tags = np.zeros(len(slotkeys), dtype=np.uint64)
        lay = self.layout
        out_arr = None if out is None else np.frombuffer(out, dtype=np.uint8).reshape(len(slotkeys), lay.out_bytes)
        todo = np.arange(len(slotkeys))
        for _ in range(_SPIN_ROUNDS):
            sub_exact = functools.partial(_exact_subset, exact, todo)
            rows = self._lookup(slotkeys[todo], starts[todo], sub_exact)
            hit = rows >= 0
            seq1 = np.zeros(len(todo), dtype=np.uint64)
            seq1[hit] = self.meta[rows[hit], 0]
            if out_arr is not None:
                stored = self.vecs[rows[hit]]
                out_arr[todo[hit]] = (stored if lay.dtype not in QUANTIZED
                                      else decode_rows(stored, lay.dtype, lay.dim).view(np.uint8))
            if self.tag_word:
                row_tags[todo[hit]] = self.meta[rows[hit], self.tag_word]
            key_ok = np.ones(len(todo), dtype=np.bool_)
            key_ok[hit] = exact(todo[hit], rows[hit])
            seq2 = np.zeros(len(todo), dtype=np.uint64)
            seq2[hit] = self.meta[rows[hit], 0]
            stable = ~hit | ((seq1 == seq2) & (seq1 % np.uint64(2) == 0) & key_ok)
            found_arr[todo[stable]] = hit[stable]
            row_tags[todo[stable & ~hit]] = 0
            if out_arr is not None:
                miss = todo[stable & ~hit]
                if default is None:
                    out_arr[miss] = 0
                else:
                    out_arr[miss] = np.frombuffer(default, dtype=np.uint8)
            todo = todo[~stable]
            if not len(todo):
                if tags_arr is not None:
                    tags_arr[:] = row_tags
                if min_version < 0:
                    return int(found_arr.sum())
                return self._classify(found_arr, row_tags, out_arr, default, min_version, max_age, stats,
                                      stale_as_miss)
        raise ReadRetryError(f"rows kept changing during {_SPIN_ROUNDS} read attempts")

    def _classify(self, found_arr: np.ndarray, row_tags: np.ndarray, out_arr: np.ndarray | None, default: Any,
                  min_version: int, max_age: int, stats: Any, stale_as_miss: bool) -> int:
        now = int(time.time())
        min_time = max(0, now - max_age) if max_age else 0
        hit_all = found_arr.astype(np.bool_)
        found_arr[:] = STATUS_MISS
        found_arr[hit_all] = tag_status(row_tags[hit_all], min_version, min_time)
        stale = found_arr == STATUS_STALE
        if stale_as_miss and stale.any():
            found_arr[stale] = STATUS_MISS
            if out_arr is not None:
                out_arr[stale] = 0 if default is None else np.frombuffer(default, dtype=np.uint8)
            stale[:] = False
        fresh = int(np.count_nonzero(found_arr == STATUS_FRESH))
        if stats is not None:
            view = memoryview(stats)
            if view.itemsize != 8 or view.format[-1:] not in ("l", "q") or view.nbytes != 32:
                raise ValueError("stats must be an int64 array of 4")
            with _STATS_LOCK:  # the C kernel adds under the GIL; numpy's += is several steps
                st = np.frombuffer(stats, dtype=np.int64)
                st += np.array([1, len(found_arr), fresh, int(stale.sum())], dtype=np.int64)
        return fresh

    def get_int(self, keys: Any, out: Any, found: Any, default: Any = None, tags: Any = None,
                min_version: int = -1, max_age: int = 0, stats: Any = None, stale_as_miss: bool = False) -> int:
        k = np.frombuffer(keys, dtype=np.int64)
        slotkeys = k.view(np.uint64)

        def exact(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
            return np.asarray(self.meta[rows, 1] == slotkeys[idx])

        return self._get(slotkeys, mix64(k), exact, out, found, default, tags, min_version, max_age, stats,
                         stale_as_miss)

    def _str_exact(self, hashes: np.ndarray, offsets: np.ndarray, blob: bytes) -> Any:
        def exact(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
            ok = np.zeros(len(idx), dtype=np.bool_)
            meta = self.meta[rows]
            for j, (i, m) in enumerate(zip(idx.tolist(), meta.tolist(), strict=True)):
                want = blob[offsets[i] : offsets[i + 1]]
                ok[j] = m[1] == hashes[i] and m[3] == len(want) and self._heap_key(m[2], m[3]) == want
            return ok

        return exact

    def get_str(self, hashes: Any, offsets: Any, blob: Any, out: Any, found: Any, default: Any = None,
                tags: Any = None, min_version: int = -1, max_age: int = 0, stats: Any = None,
                stale_as_miss: bool = False) -> int:
        h = np.frombuffer(hashes, dtype=np.uint64)
        o = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        return self._get(h, h, self._str_exact(h, o, bytes(blob)), out, found, default, tags, min_version, max_age,
                         stats, stale_as_miss)

    def get_strlist(self, keys: Any, out: Any, found: Any, default: Any = None, tags: Any = None,
                    min_version: int = -1, max_age: int = 0, stats: Any = None, stale_as_miss: bool = False) -> int:
        h, o, b = _pack_str_py(keys)
        return self.get_str(h, o, b, out, found, default, tags, min_version, max_age, stats, stale_as_miss)

    # ---------------------------------------------------------------- writes

    def _room_for(self, n: int, heap_bytes: int) -> bool:
        c = self.ctr
        lay = self.layout
        if int(c[Counter.FREE]) + lay.row_capacity - int(c[Counter.ROWS_USED]) < n:
            return False
        if int(c[Counter.LIVE]) + int(c[Counter.TOMBS]) + n > lay.slot_count * MAX_LOAD:  # _kernels.c: x * 4 > s * 3
            return False
        return int(c[Counter.HEAP_USED]) + heap_bytes <= lay.heap_capacity

    def _probe(self, slotkey: int, start: int, key_bytes: bytes | None) -> tuple[int, bool]:
        mask = self.layout.slot_count - 1
        j = start & mask
        first_tomb = -1
        for _ in range(self.layout.slot_count):
            srow = int(self.slots[j, 1])
            if srow == 0:
                return (first_tomb if first_tomb >= 0 else j), False
            if srow == int(SLOT_TOMB):
                if first_tomb < 0:
                    first_tomb = j
            elif int(self.slots[j, 0]) == slotkey:
                r = srow - 1
                if r >= self.layout.row_capacity:
                    raise CorruptTableError("index points outside the row area")
                if key_bytes is None or self._heap_key(int(self.meta[r, 2]), int(self.meta[r, 3])) == key_bytes:
                    return j, True
            j = (j + 1) & mask
        if first_tomb >= 0:
            return first_tomb, False
        raise CorruptTableError("index is full")

    def _alloc_row(self) -> int:
        c = self.ctr
        if c[Counter.FREE] > 0:
            c[Counter.FREE] -= np.uint64(1)
            r = int(self.freelist[int(c[Counter.FREE])])
            if r >= self.layout.row_capacity:
                raise CorruptTableError("free list points outside the row area")
            return r
        r = int(c[Counter.ROWS_USED])
        c[Counter.ROWS_USED] += np.uint64(1)
        return r

    def _free_row(self, r: int) -> None:
        self.freelist[int(self.ctr[Counter.FREE])] = r
        self.ctr[Counter.FREE] += np.uint64(1)

    def _checksum(self, r: int) -> int:
        lay = self.layout
        return xxhash.xxh3_64_intdigest(self.rows[r, 8 : lay.row_header + lay.vec_bytes].tobytes()) & 0xFFFFFFFF

    def _write_row(self, r: int, meta: list[int], vec: np.ndarray) -> None:
        word = int(self.meta[r, 0])
        count = word & 0xFFFFFFFF
        count += count & 1
        self.meta[r, 0] = (word & 0xFFFFFFFF00000000) | ((count + 1) & 0xFFFFFFFF)
        self.meta[r, 1 : 1 + len(meta)] = meta
        self.vecs[r] = vec
        self.meta[r, 0] = (self._checksum(r) << 32) | ((count + 2) & 0xFFFFFFFF)

    def verify_rows(self, rows: Any) -> list[tuple[int, str]]:
        bad = []
        for r in np.frombuffer(rows, dtype=np.int64).tolist():
            if not 0 <= r < self.layout.row_capacity:
                bad.append((r, "row number outside the row area"))
                continue
            word = int(self.meta[r, 0])
            if word & 1:
                bad.append((r, "row left half-written (odd sequence)"))
            elif word >> 32 != self._checksum(r):
                bad.append((r, "row checksum mismatch (vector or key damaged)"))
            elif self.key_type == 2:
                key = self._heap_key(int(self.meta[r, 2]), int(self.meta[r, 3]))
                if key is None:
                    bad.append((r, "string key outside the key heap"))
                elif xxhash.xxh3_64_intdigest(key) != int(self.meta[r, 1]):
                    bad.append((r, "string key bytes do not match their hash"))
                elif self.meta[r, 4:7].tobytes()[: len(key)] != key[:INLINE_KEY]:
                    bad.append((r, "string key bytes in the row differ from the key heap"))
        return bad

    def _put_one(self, slotkey: int, start: int, key_bytes: bytes | None, vec: np.ndarray, tag: int) -> None:
        j, found = self._probe(slotkey, start, key_bytes)
        r = self._alloc_row()
        if key_bytes is None:
            self._write_row(r, [slotkey, tag] if self.tag_word else [slotkey], vec)
        else:
            if found:
                off = int(self.meta[int(self.slots[j, 1]) - 1, 2])
            else:
                off = int(self.ctr[Counter.HEAP_USED])
                self.heap[off : off + len(key_bytes)] = np.frombuffer(key_bytes, dtype=np.uint8)
                self.ctr[Counter.HEAP_USED] += np.uint64(len(key_bytes))
            inline = np.frombuffer(key_bytes[:INLINE_KEY].ljust(INLINE_KEY, b"\0"), dtype=np.uint64).tolist()
            meta = [slotkey, off, len(key_bytes), *inline]
            self._write_row(r, [*meta, tag] if self.tag_word else meta, vec)
        if found:
            old = int(self.slots[j, 1]) - 1
            self.slots[j, 1] = r + 1
            self._free_row(old)
        else:
            if self.slots[j, 1] == SLOT_TOMB:
                self.ctr[Counter.TOMBS] -= np.uint64(1)
            self.slots[j, 0] = slotkey
            self.slots[j, 1] = r + 1
            self.ctr[Counter.LIVE] += np.uint64(1)

    def _room_for_exact(self, slotkeys: list[int], starts: list[int], key_bytes: list[bytes] | None) -> bool:
        """Like _kernels.c: only keys not yet present need rows, slots and heap (plus one spare row)."""
        fresh, fresh_heap = 0, 0
        for i, key in enumerate(slotkeys):
            kb = None if key_bytes is None else key_bytes[i]
            if not self._probe(key, starts[i], kb)[1]:
                fresh += 1
                fresh_heap += 0 if kb is None else len(kb)
        return self._room_for(fresh + 1, fresh_heap)

    def put_int(self, keys: Any, vectors: Any, tags: Any = None) -> bool:
        k = np.frombuffer(keys, dtype=np.int64)
        if not self._room_for(len(k), 0) and not self._room_for_exact(
                k.view(np.uint64).tolist(), mix64(k).tolist(), None):
            return False
        vecs = np.frombuffer(vectors, dtype=np.uint8).reshape(len(k), self.layout.vec_bytes)
        starts = mix64(k)
        row_tags = _tags_list(tags, len(k))
        for i, key in enumerate(k.view(np.uint64).tolist()):
            self._put_one(key, int(starts[i]), None, vecs[i], row_tags[i])
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return True

    def put_str(self, hashes: Any, offsets: Any, blob: Any, vectors: Any, tags: Any = None) -> bool:
        h = np.frombuffer(hashes, dtype=np.uint64).tolist()
        o = np.frombuffer(offsets, dtype=np.uint64).tolist()
        blob = bytes(blob)
        if not self._room_for(len(h), len(blob)) and not self._room_for_exact(
                h, h, [blob[o[i] : o[i + 1]] for i in range(len(h))]):
            return False
        vecs = np.frombuffer(vectors, dtype=np.uint8).reshape(len(h), self.layout.vec_bytes)
        row_tags = _tags_list(tags, len(h))
        for i, hv in enumerate(h):
            self._put_one(hv, hv, blob[o[i] : o[i + 1]], vecs[i], row_tags[i])
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return True

    def _delete_one(self, slotkey: int, start: int, key_bytes: bytes | None) -> int:
        j, found = self._probe(slotkey, start, key_bytes)
        if not found:
            return 0
        old = int(self.slots[j, 1]) - 1
        self.slots[j, 1] = SLOT_TOMB
        self._free_row(old)
        self.ctr[Counter.LIVE] -= np.uint64(1)
        self.ctr[Counter.TOMBS] += np.uint64(1)
        return 1

    def delete_int(self, keys: Any) -> int:
        k = np.frombuffer(keys, dtype=np.int64)
        starts = mix64(k)
        keys_u64 = k.view(np.uint64).tolist()
        n = sum(self._delete_one(key, int(starts[i]), None) for i, key in enumerate(keys_u64))
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return n

    def delete_str(self, hashes: Any, offsets: Any, blob: Any) -> int:
        h = np.frombuffer(hashes, dtype=np.uint64).tolist()
        o = np.frombuffer(offsets, dtype=np.uint64).tolist()
        blob = bytes(blob)
        n = sum(self._delete_one(hv, hv, blob[o[i] : o[i + 1]]) for i, hv in enumerate(h))
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return n

    def export_str(self, rows: Any) -> tuple[bytes, bytes, bytes]:
        r = np.frombuffer(rows, dtype=np.int64)
        if len(r) and (r.min() < 0 or r.max() >= self.layout.row_capacity):
            raise CorruptTableError("row outside the row area")
        meta = self.meta[r]
        keys = []
        for m in meta.tolist():
            kb = self._heap_key(m[2], m[3])
            if kb is None:
                raise CorruptTableError("string key outside the key heap")
            keys.append(kb)
        return _pack_str_py(keys)


def _tags_list(tags: Any, n: int) -> list[int]:
    if tags is None:
        return [0] * n
    arr = np.frombuffer(tags, dtype=np.uint64)
    if len(arr) != n:
        raise ValueError("tags must be one u64 per key")
    return [int(t) for t in arr.tolist()]


def _load_c() -> Any:
    """The compiled kernels, or None for the numpy fallback (asked for, or the only one there)."""
    if os.environ.get("EMBKV_KERNEL", "").lower() == "numpy":
        return None  # asked for: no warning
    try:
        kernels = importlib.import_module("embkv.file._kernels")
    except ImportError as exc:
        # a silent switch would hide a broken install behind writes that are 100x slower
        warnings.warn(KernelFallbackWarning(
            f"embkv's C kernel is not available ({exc}); using the numpy fallback (same files, slower). "
            "Reinstall with a C compiler present (EMBKV_REQUIRE_KERNEL=1 makes a failed build an error), "
            "or set EMBKV_KERNEL=numpy to choose the fallback and silence this warning."), stacklevel=2)
        return None
    kernels.set_errors(CorruptTableError, ReadRetryError)
    return kernels


_C_KERNELS = _load_c()
KERNEL_BACKEND: Literal["c", "numpy"] = "c" if _C_KERNELS is not None else "numpy"
pack_str = _C_KERNELS.pack_str if _C_KERNELS is not None else _pack_str_py


_QUANT_CODES = {"int8": 1, "bfloat16": 2}  # QUANT_INT8, QUANT_BF16 in _kernels.c


def make_view(buf: Any, writable: bool, layout: Layout) -> KernelView:
    """Wrap a mapped file in the best available kernel backend."""
    if _C_KERNELS is None:
        return NumpyView(buf, writable, layout)
    view: KernelView = _C_KERNELS.View(
        buf, writable, 1 if layout.key_type == "int64" else 2, layout.slot_count, layout.row_capacity,
        layout.heap_capacity, layout.index_offset, layout.rows_offset, layout.freelist_offset,
        layout.heap_offset, layout.row_stride, layout.row_header, layout.vec_bytes, layout.dim,
        _QUANT_CODES.get(layout.dtype, 0), layout.tagged,
    )
    return view
