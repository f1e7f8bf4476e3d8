"""The hot-row cache of a training table: rows and their optimizer state in process memory.

A fixed number of slots, chosen from ``cache_bytes``: each holds one row's ``weights | state``
(float32), its id, the step it was last touched at, whether it is dirty (changed since it was
written to a store table) and how many pulls of it are outstanding (bounded staleness: a row
with outstanding pulls is never evicted). Ids map to slots through ``IdMap`` (compiled, one call
per batch). Eviction is by least recent touch among unpinned slots, in bulk (at least 1/16 of
the cache at a time) so that its cost is paid rarely. The owner (``TrainingTable``) holds its
lock around every call.
"""

from __future__ import annotations

import numpy as np

from ..errors import SchemaError
from .idmap import make_idmap

__all__ = ["HotCache", "slot_bytes"]

_BOOKKEEPING = 8 + 8 + 4 + 1 + 32  # id, last step, pins, dirty flag, and an IdMap entry at half load


def slot_bytes(width: int) -> int:
    """Memory one cache slot takes for rows of ``width`` float32 (weights and state)."""
    return 4 * width + _BOOKKEEPING


class HotCache:
    """Slots of ``width`` float32; see the module docstring."""

    def __init__(self, cache_bytes: int, width: int) -> None:
        self.width = width
        self.capacity = int(cache_bytes) // slot_bytes(width)
        if self.capacity < 1:
            raise SchemaError(f"cache_bytes={cache_bytes} holds no row: one row and its state take "
                              f"{slot_bytes(width)} bytes")
        c = self.capacity
        # np.zeros maps untouched pages lazily: memory grows with the slots used, up to cache_bytes
        self.data = np.zeros((c, width), dtype=np.float32)
        self.ids = np.zeros(c, dtype=np.int64)
        self.last = np.zeros(c, dtype=np.int64)
        self.pins = np.zeros(c, dtype=np.int32)
        self.dirty = np.zeros(c, dtype=np.bool_)
        self.used = np.zeros(c, dtype=np.bool_)
        self._free = np.arange(c - 1, -1, -1, dtype=np.int64)  # a stack: slots 0, 1, ... first
        self._free_top = c
        self.map = make_idmap(c)

    @property
    def free(self) -> int:
        return self._free_top

    def __len__(self) -> int:
        return len(self.map)

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 where it is not cached."""
        slots = np.empty(len(ids), dtype=np.int64)
        self.map.lookup(np.ascontiguousarray(ids, dtype=np.int64), slots)
        return slots

    def insert(self, ids: np.ndarray, rows: np.ndarray, last: np.ndarray | int, dirty: np.ndarray | bool) -> np.ndarray:
        """Put distinct, uncached ``ids`` with their ``rows`` into free slots; returns the slots."""
        n = len(ids)
        if n > self._free_top:
            raise SchemaError("internal: not enough free cache slots (evict first)")
        slots = self._free[self._free_top - n : self._free_top][::-1].copy()
        self._free_top -= n
        self.data[slots] = rows
        self.ids[slots] = ids
        self.last[slots] = last
        self.pins[slots] = 0
        self.dirty[slots] = dirty
        self.used[slots] = True
        self.map.insert(np.ascontiguousarray(ids, dtype=np.int64), slots)
        return slots

    def victims(self, count: int, protect: np.ndarray) -> np.ndarray:
        """Up to ``count`` least recently touched unpinned slots, none of ``protect``."""
        candidates = self.used & (self.pins == 0)
        candidates[protect[protect >= 0]] = False
        pool = np.flatnonzero(candidates)
        if len(pool) <= count:
            return pool
        pick = np.argpartition(self.last[pool], count - 1)[:count]
        result: np.ndarray = pool[pick]
        return result

    def remove(self, slots: np.ndarray) -> None:
        """Free ``slots`` (the caller wrote dirty ones back first)."""
        if not len(slots):
            return
        self.map.remove(np.ascontiguousarray(self.ids[slots]))
        self.used[slots] = False
        self.dirty[slots] = False
        self.pins[slots] = 0
        self._free[self._free_top : self._free_top + len(slots)] = slots
        self._free_top += len(slots)

    def clear(self) -> None:
        self.map.clear()
        self.used[:] = False
        self.dirty[:] = False
        self.pins[:] = 0
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self._free_top = self.capacity
