"""Admission counters: how many times ``pull`` has seen each id not yet given a stored row.

With ``admit_after=k`` a training table stores a row for an id only once k pulls have seen it
(rare ids then cost a counter, not a row). The counters live in a compiled ``IdMap`` that
starts small (most tables never use one) and doubles as it fills; a checkpoint saves them
(checkpoint.py) so that admission continues where it was after a restart.
"""

from __future__ import annotations

import numpy as np

from ..errors import SchemaError
from .idmap import make_idmap

__all__ = ["AdmissionCounters"]

MAX_SEEN = 1 << 30  # ids the counters can follow before they refuse more
SEEN_START = 1 << 12


class AdmissionCounters:
    """id -> sightings, for ids waiting for admission (the owner holds its lock around every call)."""

    def __init__(self, table: str, admit_after: int) -> None:
        self.table = table
        self.admit_after = admit_after
        self._map = make_idmap(SEEN_START)
        self._capacity = SEEN_START

    def __len__(self) -> int:
        return len(self._map)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) as int64 arrays, to save at a checkpoint."""
        ids, counts = self._map.items()
        return np.frombuffer(ids, dtype=np.int64), np.frombuffer(counts, dtype=np.int64)

    def set(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Set the counters of ``ids``, growing the map as needed."""
        while len(self._map) + len(ids) > self._capacity:
            if self._capacity >= MAX_SEEN:
                raise SchemaError(f"training table {self.table!r}: more than {MAX_SEEN:,} ids wait for admission; "
                                  "lower admit_after")
            keys, values = self._map.items()
            self._capacity *= 2
            self._map = make_idmap(self._capacity)
            self._map.insert(keys, values)
        self._map.insert(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(counts, dtype=np.int64))

    def admit(self, ids: np.ndarray, count_seen: bool) -> np.ndarray:
        """Count one sighting of each distinct never-stored id (if ``count_seen``); True where it
        has now been seen ``admit_after`` times, which also ends its counter."""
        counts = np.empty(len(ids), dtype=np.int64)
        self._map.lookup(np.ascontiguousarray(ids, dtype=np.int64), counts)
        counts = np.maximum(counts, 0) + (1 if count_seen else 0)
        admit = counts >= self.admit_after
        if count_seen:
            keep = ~admit
            if keep.any():
                self.set(ids[keep], counts[keep])
            self.forget(ids[admit])
        return admit

    def forget(self, ids: np.ndarray) -> None:
        """End the counters of ids that got a row another way (``push_rows``)."""
        if len(ids):
            self._map.remove(np.ascontiguousarray(ids, dtype=np.int64))
