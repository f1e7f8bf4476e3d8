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

__all__ = ["FP_SHIFT", "KERNEL_BACKEND", "ROW_FIELD", "SLOT_EMPTY", "SLOT_TOMB", "KernelView", "fingerprint",
           "home_slots", "make_view", "mix64", "pack_str"]

# freshness status a classifying get writes per key (the values of embkv.cache HIT / OOV / STALE)
STATUS_FRESH, STATUS_MISS, STATUS_STALE = 0, 1, 2

_STATS_LOCK = threading.Lock()

# an index slot: fingerprint << 40 | row field (0 empty, all ones tombstone, else row + 1); see _kernels.c
ROW_BITS = 40
ROW_FIELD = np.uint64((1 << ROW_BITS) - 1)
FP_SHIFT = np.uint64(ROW_BITS)
FP_MASK = np.uint64(0xFFFFFF)
SLOT_EMPTY = np.uint64(0)
SLOT_TOMB = ROW_FIELD
SEQ_COUNT = 0xFFFFFF  # a row's sequence word: checksum << 32 | key code << 24 | write count
LONG_KEY = 255  # key code of a string key kept in the heap (longer than INLINE_KEY)
LONG_PREFIX = 16
_SPIN_ROUNDS = 10_000
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


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
    # True, or (new rows, heap bytes) the batch needs when it does not fit (nothing written then)
    def put_int(self, keys: Any, vectors: Any, tags: Any = None) -> Literal[True] | tuple[int, int]: ...
    def put_str(self, hashes: Any, offsets: Any, blob: Any, vectors: Any,
                tags: Any = None) -> Literal[True] | tuple[int, int]: ...
    def delete_int(self, keys: Any) -> int: ...
    def delete_str(self, hashes: Any, offsets: Any, blob: Any) -> int: ...
    def export_str(self, rows: Any) -> tuple[bytes, bytes, bytes]: ...
    def set_limits(self, rows: int, heap_bytes: int, free_entries: int) -> None: ...
    # rows of int keys by pread(2): found[i] 1 read, 0 missing, 2 left for get (see _kernels.c)
    def read_rows(self, fd: int, keys: Any, out: Any, found: Any, threads: int) -> int: ...
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


def home_slots(hashes: np.ndarray, slot_count: int) -> np.ndarray:
    """Each hash's home slot, the high 64 bits of ``hash * slot_count`` (``home_slot`` in _kernels.c).

    numpy has no 128-bit product, so it is put together from 32-bit halves.
    """
    h = hashes.astype(np.uint64, copy=False)
    n_lo, n_hi = np.uint64(slot_count & 0xFFFFFFFF), np.uint64(slot_count >> 32)
    h_lo, h_hi = h & _M32, h >> _S32
    lo_lo, hi_lo, lo_hi = h_lo * n_lo, h_hi * n_lo, h_lo * n_hi
    carry = ((lo_lo >> _S32) + (hi_lo & _M32) + (lo_hi & _M32)) >> _S32
    result: np.ndarray = h_hi * n_hi + (hi_lo >> _S32) + (lo_hi >> _S32) + carry
    return result


def fingerprint(hashes: np.ndarray) -> np.ndarray:
    """The 24 bits of each hash that its index slot keeps."""
    result: np.ndarray = hashes & FP_MASK
    return result


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
        self.slots = raw[layout.index_offset : layout.index_offset + 8 * layout.slot_count].view(np.uint64)
        rows = raw[layout.rows_offset : layout.rows_offset + layout.row_capacity * layout.row_stride]
        self.rows = rows.reshape(layout.row_capacity, layout.row_stride)
        self.meta = self.rows[:, : layout.row_header].view(np.uint64)
        self.tag_word = layout.row_header // 8 - 1 if layout.tagged else 0  # 0: rows keep no tag
        self.vecs = self.rows[:, layout.row_header : layout.row_header + layout.vec_bytes]
        self.freelist = raw[layout.freelist_offset : layout.freelist_offset + 8 * layout.row_capacity].view(
            np.uint64)
        self.heap = raw[layout.heap_offset : layout.heap_offset + layout.heap_capacity]
        self.slot_count = layout.slot_count
        # how far writes may take new rows, heap bytes and free-stack entries (the space reserved)
        self.row_limit = layout.row_capacity
        self.heap_limit = layout.heap_capacity
        self.free_limit = layout.row_capacity

    def set_limits(self, rows: int, heap_bytes: int, free_entries: int) -> None:
        self.row_limit = min(rows, self.layout.row_capacity)
        self.heap_limit = min(heap_bytes, self.layout.heap_capacity)
        self.free_limit = min(free_entries, self.layout.row_capacity)

    def read_rows(self, fd: int, keys: Any, out: Any, found: Any, threads: int) -> int:
        """The fallback leaves every key to ``get`` (found 2): it reads through the mapping."""
        np.frombuffer(found, dtype=np.uint8)[:] = 2
        return 0

    def _rows_in_use(self) -> int:
        """Rows written so far: reads stay below (see rows_in_use in _kernels.c)."""
        return min(int(self.ctr[Counter.ROWS_USED]), self.layout.row_capacity)

    def release(self) -> None:
        for name in ("_raw", "ctr", "slots", "rows", "meta", "vecs", "freelist", "heap"):
            self.__dict__.pop(name, None)
        self._mv.release()

    # ---------------------------------------------------------------- reads

    def _row_key(self, r: int) -> bytes | None:
        """The key bytes string row ``r`` holds, or None if the row is damaged (bounds-checked)."""
        code = (int(self.meta[r, 0]) >> 24) & 0xFF
        area = self.rows[r, 8 : 8 + INLINE_KEY].tobytes()
        if code <= INLINE_KEY:
            return area[:code]
        off = int.from_bytes(area[LONG_PREFIX:], "little")
        cap = min(int(self.ctr[Counter.HEAP_USED]), self.layout.heap_capacity)
        if code != LONG_KEY or off + 8 > cap:
            return None
        length = int.from_bytes(self.heap[off : off + 8].tobytes(), "little")
        if length <= INLINE_KEY or off + 8 + length > cap:
            return None
        key = self.heap[off + 8 : off + 8 + length].tobytes()
        return key if key[:LONG_PREFIX] == area[:LONG_PREFIX] else None

    def _lookup(self, hashes: np.ndarray, exact: Any) -> np.ndarray:
        """Probe all keys in lockstep (a Python iteration per probe step); the row per key or -1."""
        n = len(hashes)
        rows = np.full(n, -1, dtype=np.int64)
        pos = home_slots(hashes, self.slot_count)
        fps = fingerprint(hashes)
        pending = np.arange(n)
        last = np.uint64(self.slot_count - 1)

        def advance(idx: np.ndarray) -> None:
            at = pos[idx]
            pos[idx] = np.where(at == last, np.uint64(0), at + np.uint64(1))

        for _ in range(self.slot_count):
            if not len(pending):
                break
            words = self.slots[pos[pending]]
            field = words & ROW_FIELD
            empty = field == SLOT_EMPTY
            cand = (field != SLOT_EMPTY) & (field != SLOT_TOMB) & ((words >> FP_SHIFT) == fps[pending])
            hit_idx = pending[cand]
            stay = np.zeros(len(pending), dtype=np.bool_)
            if len(hit_idx):
                r_u = field[cand] - np.uint64(1)
                cap = self._rows_in_use()  # read after the slots: it covers every row they name
                if np.any(r_u >= np.uint64(cap)):
                    raise CorruptTableError("index points outside the row area: the table file is corrupt")
                r = r_u.astype(np.int64)
                seq_before = self.meta[r, 0]
                ok = exact(hit_idx, r)
                rows[hit_idx[ok]] = r[ok]
                # another key in the row: a collision if the slot still points there (keep
                # probing), else the writer moved the slot meanwhile (read the same slot again)
                failed = np.flatnonzero(cand)[~ok]
                moved = (self.slots[pos[pending[failed]]] != words[failed]) | (
                    self.meta[r[~ok], 0] != seq_before[~ok])  # rewritten meanwhile: it may have come back
                cand[failed] = False
                stay[failed[moved]] = True
            done = empty | cand
            advance(pending[~done & ~stay])
            pending = pending[~done]
        return rows

    def _get(self, hashes: np.ndarray, exact: Any, out: Any, found: Any, default: Any, tags: Any,
             min_version: int, max_age: int, stats: Any, stale_as_miss: bool) -> int:
        if self.ctr[Counter.SUPERSEDED]:
            return -1
        found_arr = np.frombuffer(found, dtype=np.uint8)
        tags_arr = None if tags is None else np.frombuffer(tags, dtype=np.uint64)
        row_tags = np.zeros(len(hashes), dtype=np.uint64)
        lay = self.layout
        out_arr = None if out is None else np.frombuffer(out, dtype=np.uint8).reshape(len(hashes), lay.out_bytes)
        todo = np.arange(len(hashes))
        for _ in range(_SPIN_ROUNDS):
            sub_exact = functools.partial(_exact_subset, exact, todo)
            rows = self._lookup(hashes[todo], sub_exact)
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
        keys_u64 = k.view(np.uint64)

        def exact(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
            return np.asarray(self.meta[rows, 1] == keys_u64[idx])

        return self._get(mix64(k), exact, out, found, default, tags, min_version, max_age, stats, stale_as_miss)

    def _str_exact(self, offsets: np.ndarray, blob: bytes) -> Any:
        def exact(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
            ok = np.zeros(len(idx), dtype=np.bool_)
            for j, (i, r) in enumerate(zip(idx.tolist(), rows.tolist(), strict=True)):
                ok[j] = self._row_key(r) == blob[offsets[i] : offsets[i + 1]]
            return ok

        return exact

    def get_str(self, hashes: Any, offsets: Any, blob: Any, out: Any, found: Any, default: Any = None,
                tags: Any = None, min_version: int = -1, max_age: int = 0, stats: Any = None,
                stale_as_miss: bool = False) -> int:
        h = np.frombuffer(hashes, dtype=np.uint64)
        o = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        return self._get(h, self._str_exact(o, bytes(blob)), out, found, default, tags, min_version, max_age,
                         stats, stale_as_miss)

    def get_strlist(self, keys: Any, out: Any, found: Any, default: Any = None, tags: Any = None,
                    min_version: int = -1, max_age: int = 0, stats: Any = None, stale_as_miss: bool = False) -> int:
        h, o, b = _pack_str_py(keys)
        return self.get_str(h, o, b, out, found, default, tags, min_version, max_age, stats, stale_as_miss)

    # ---------------------------------------------------------------- writes

    def _room_for(self, n: int, heap_bytes: int) -> bool:
        c = self.ctr
        lay = self.layout
        if int(c[Counter.FREE]) + max(0, self.row_limit - int(c[Counter.ROWS_USED])) < n:
            return False
        if int(c[Counter.LIVE]) + int(c[Counter.TOMBS]) + n > lay.slot_count * MAX_LOAD:  # _kernels.c: x * 4 > s * 3
            return False
        return heap_bytes == 0 or int(c[Counter.HEAP_USED]) + heap_bytes <= self.heap_limit

    def _probe(self, h: int, ikey: int, key_bytes: bytes | None) -> tuple[int, bool]:
        n = self.slot_count
        j = (h * n) >> 64
        fp = h & int(FP_MASK)
        first_tomb = -1
        for _ in range(n):
            w = int(self.slots[j])
            field = w & int(ROW_FIELD)
            if field == 0:
                return (first_tomb if first_tomb >= 0 else j), False
            if field == int(SLOT_TOMB):
                if first_tomb < 0:
                    first_tomb = j
            elif w >> ROW_BITS == fp:
                r = field - 1
                if r >= self._rows_in_use():
                    raise CorruptTableError("index points outside the row area")
                if (int(self.meta[r, 1]) == ikey) if key_bytes is None else (self._row_key(r) == key_bytes):
                    return j, True
            j = 0 if j + 1 == n else j + 1
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
        if r >= self.row_limit:
            raise CorruptTableError("no reserved row left: the counters lie")
        c[Counter.ROWS_USED] += np.uint64(1)
        return r

    def _free_row(self, r: int) -> None:
        nfree = int(self.ctr[Counter.FREE])
        if nfree >= min(self.free_limit, self.layout.row_capacity):
            return  # beyond the reserved stack: leak the row, as _kernels.c does
        self.freelist[nfree] = r
        self.ctr[Counter.FREE] += np.uint64(1)

    def _checksum(self, r: int, code: int) -> int:
        lay = self.layout
        data = self.rows[r, 8 : lay.row_header + lay.vec_bytes].tobytes()
        return xxhash.xxh3_64_intdigest(data, seed=code) & 0xFFFFFFFF

    def _write_row(self, r: int, code: int, meta: list[int], vec: np.ndarray) -> None:
        word = int(self.meta[r, 0])
        count = word & SEQ_COUNT
        count += count & 1
        self.meta[r, 0] = (word & ~SEQ_COUNT) | ((count + 1) & SEQ_COUNT)
        self.meta[r, 1 : 1 + len(meta)] = meta
        self.vecs[r] = vec
        self.meta[r, 0] = (self._checksum(r, code) << 32) | (code << 24) | ((count + 2) & SEQ_COUNT)

    def verify_rows(self, rows: Any) -> list[tuple[int, str]]:
        bad = []
        for r in np.frombuffer(rows, dtype=np.int64).tolist():
            if not 0 <= r < self.layout.row_capacity:
                bad.append((r, "row number outside the row area"))
                continue
            if r >= self._rows_in_use():
                bad.append((r, "row above the rows-used mark (never written)"))
                continue
            word = int(self.meta[r, 0])
            code = (word >> 24) & 0xFF
            if word & 1:
                bad.append((r, "row left half-written (odd sequence)"))
            elif word >> 32 != self._checksum(r, code):
                bad.append((r, "row checksum mismatch (vector or key damaged)"))
            elif self.key_type == 1 and code:
                bad.append((r, "int row with a string key code"))
            elif self.key_type == 2 and self._row_key(r) is None:
                bad.append((r, "string key bytes outside the key heap or differing from it"))
        return bad

    def _put_one(self, h: int, ikey: int, key_bytes: bytes | None, vec: np.ndarray, tag: int) -> None:
        j, found = self._probe(h, ikey, key_bytes)
        r = self._alloc_row()
        old_field = int(self.slots[j]) & int(ROW_FIELD)
        tail = [tag] if self.tag_word else []
        if key_bytes is None:
            self._write_row(r, 0, [ikey, *tail], vec)
        else:
            kl = len(key_bytes)
            if kl <= INLINE_KEY:
                code, area = kl, key_bytes.ljust(INLINE_KEY, b"\0")
            else:
                code = LONG_KEY
                if found:  # the same key bytes: share them
                    off = int.from_bytes(self.rows[old_field - 1, 8 + LONG_PREFIX : 8 + INLINE_KEY].tobytes(),
                                         "little")
                else:
                    off = int(self.ctr[Counter.HEAP_USED])
                    record = kl.to_bytes(8, "little") + key_bytes
                    self.heap[off : off + len(record)] = np.frombuffer(record, dtype=np.uint8)
                    self.ctr[Counter.HEAP_USED] += np.uint64(len(record))
                area = key_bytes[:LONG_PREFIX] + off.to_bytes(8, "little")
            self._write_row(r, code, [*np.frombuffer(area, dtype=np.uint64).tolist(), *tail], vec)
        word = ((h & int(FP_MASK)) << ROW_BITS) | (r + 1)
        if found:
            self.slots[j] = word
            self._free_row(old_field - 1)
        else:
            if old_field == int(SLOT_TOMB):
                self.ctr[Counter.TOMBS] -= np.uint64(1)
            self.slots[j] = word
            self.ctr[Counter.LIVE] += np.uint64(1)

    def _needs(self, hashes: list[int], ikeys: list[int], key_bytes: list[bytes] | None) -> tuple[int, int]:
        """Like _kernels.c: only keys not yet present need rows and heap (plus one spare row)."""
        fresh, fresh_heap = 0, 0
        for i, h in enumerate(hashes):
            kb = None if key_bytes is None else key_bytes[i]
            if not self._probe(h, ikeys[i], kb)[1]:
                fresh += 1
                fresh_heap += 0 if kb is None else _heap_need(len(kb))
        return fresh + 1, fresh_heap

    def put_int(self, keys: Any, vectors: Any, tags: Any = None) -> Literal[True] | tuple[int, int]:
        k = np.frombuffer(keys, dtype=np.int64)
        hashes = mix64(k).tolist()
        ikeys = k.view(np.uint64).tolist()
        if not self._room_for(len(k), 0):
            needs = self._needs(hashes, ikeys, None)
            if not self._room_for(*needs):
                return needs
        vecs = np.frombuffer(vectors, dtype=np.uint8).reshape(len(k), self.layout.vec_bytes)
        row_tags = _tags_list(tags, len(k))
        for i, key in enumerate(ikeys):
            self._put_one(hashes[i], key, None, vecs[i], row_tags[i])
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return True

    def put_str(self, hashes: Any, offsets: Any, blob: Any, vectors: Any,
                tags: Any = None) -> Literal[True] | tuple[int, int]:
        h = np.frombuffer(hashes, dtype=np.uint64).tolist()
        o = np.frombuffer(offsets, dtype=np.uint64).tolist()
        blob = bytes(blob)
        keys = [blob[o[i] : o[i + 1]] for i in range(len(h))]
        if not self._room_for(len(h), sum(_heap_need(len(kb)) for kb in keys)):
            needs = self._needs(h, [0] * len(h), keys)
            if not self._room_for(*needs):
                return needs
        vecs = np.frombuffer(vectors, dtype=np.uint8).reshape(len(h), self.layout.vec_bytes)
        row_tags = _tags_list(tags, len(h))
        for i, hv in enumerate(h):
            self._put_one(hv, 0, keys[i], vecs[i], row_tags[i])
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return True

    def _delete_one(self, h: int, ikey: int, key_bytes: bytes | None) -> int:
        j, found = self._probe(h, ikey, key_bytes)
        if not found:
            return 0
        old = (int(self.slots[j]) & int(ROW_FIELD)) - 1
        self.slots[j] = SLOT_TOMB
        self._free_row(old)
        self.ctr[Counter.LIVE] -= np.uint64(1)
        self.ctr[Counter.TOMBS] += np.uint64(1)
        return 1

    def delete_int(self, keys: Any) -> int:
        k = np.frombuffer(keys, dtype=np.int64)
        hashes = mix64(k).tolist()
        n = sum(self._delete_one(hashes[i], key, None) for i, key in enumerate(k.view(np.uint64).tolist()))
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return n

    def delete_str(self, hashes: Any, offsets: Any, blob: Any) -> int:
        h = np.frombuffer(hashes, dtype=np.uint64).tolist()
        o = np.frombuffer(offsets, dtype=np.uint64).tolist()
        blob = bytes(blob)
        n = sum(self._delete_one(hv, 0, blob[o[i] : o[i + 1]]) for i, hv in enumerate(h))
        self.ctr[Counter.GENERATION] += np.uint64(1)
        return n

    def export_str(self, rows: Any) -> tuple[bytes, bytes, bytes]:
        r = np.frombuffer(rows, dtype=np.int64)
        if len(r) and (r.min() < 0 or r.max() >= self._rows_in_use()):
            raise CorruptTableError(f"row {int(r.max())} holds a damaged string key: the table file is corrupt")
        keys = []
        for row in r.tolist():
            kb = self._row_key(row)
            if kb is None:
                raise CorruptTableError(f"row {row} holds a damaged string key: the table file is corrupt")
            keys.append(kb)
        return _pack_str_py(keys)


def _heap_need(length: int) -> int:
    """Heap bytes a new string key takes: none in its row, else a length word and the bytes."""
    return 0 if length <= INLINE_KEY else 8 + length


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
