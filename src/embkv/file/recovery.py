"""Crash recovery of one mapped version: recount after a dead writer, and re-apply logged batches.

A writer marks ``dirty`` with its pid for the duration of a batch; whoever takes the lock
next and finds it set recounts (:func:`recover_counters`) and replays the batches the log
holds beyond the file's generation (:func:`apply_record`, driven by ``writer.py``).
"""

from __future__ import annotations

import numpy as np

from .format import Counter
from .kernels import ROW_FIELD, SLOT_EMPTY, SLOT_TOMB
from .mapping import Mapping, delete_packed, put_packed, slot_rows
from .wal import DELETE_INT, DELETE_STR, PUT_INT

__all__ = ["apply_record", "recover_counters"]


def apply_record(m: Mapping, kind: int, count: int, payload: memoryview) -> bool:
    """Re-apply one logged batch; False (nothing written) if it does not fit this version.

    A record may not fit: the writer that logged it found no room and died before growing
    the table, or the batch was cut short when it had used up the spare rows. Recovery then
    grows the table and applies it, as the writer would have.
    """
    vec_bytes = m.layout.vec_bytes
    if kind in (PUT_INT, DELETE_INT):
        keys = payload[: 8 * count]
        if kind == DELETE_INT:
            delete_packed(m, keys)
            return True
        tags = payload[8 * count : 16 * count]
        vectors = payload[16 * count :]
        return len(vectors) == count * vec_bytes and put_packed(m, keys, vectors, tags)
    hashes = payload[: 8 * count]
    if kind == DELETE_STR:
        offsets = payload[8 * count : 8 * (2 * count + 1)]
        blob_len = int(np.frombuffer(offsets, dtype=np.uint64)[-1])
        delete_packed(m, (hashes, offsets, payload[8 * (2 * count + 1) : 8 * (2 * count + 1) + blob_len]))
        return True
    # PUT_STR: hashes | tags | offsets | blob | vectors
    tags = payload[8 * count : 16 * count]
    offsets = payload[16 * count : 8 * (3 * count + 1)]
    blob_len = int(np.frombuffer(offsets, dtype=np.uint64)[-1])
    blob = payload[8 * (3 * count + 1) : 8 * (3 * count + 1) + blob_len]
    vectors = payload[8 * (3 * count + 1) + blob_len :]
    return len(vectors) == count * vec_bytes and put_packed(m, (hashes, offsets, blob), vectors, tags)


def recover_counters(m: Mapping, keep_dirty: bool = False) -> None:
    """Recount after a writer died inside a batch: live keys, tombstones and the free-row stack.

    Rows that the dead writer had taken but not yet published are found as unreferenced
    rows below the high-water mark and returned to the free stack.
    """
    lay = m.layout
    slots = m.slots()
    srow = slots & ROW_FIELD
    live = (srow != SLOT_EMPTY) & (srow != SLOT_TOMB)
    c = m.counters
    c[Counter.LIVE] = int(live.sum())
    c[Counter.TOMBS] = int((srow == SLOT_TOMB).sum())
    used = min(int(c[Counter.ROWS_USED]), lay.row_capacity)
    _, referenced, in_range = slot_rows(slots, lay.row_capacity)
    referenced = referenced[in_range]
    free = np.setdiff1d(np.arange(used, dtype=np.int64), referenced)
    c[Counter.FREE] = 0
    m.reserve(0, free_entries=len(free))  # the stack may be deeper than it was: room for it first
    m.freelist()[: len(free)] = free
    c[Counter.FREE] = len(free)
    if not keep_dirty:
        c[Counter.DIRTY] = 0
