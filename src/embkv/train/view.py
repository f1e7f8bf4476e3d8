"""The :class:`embkv.EmbeddingTable` reads of a training table, on three of its own calls.

:class:`WeightsView` gives ``get``, ``get_tagged``, ``get_fresh``, ``contains``, ``len`` and
iteration to a class with ``read(ids)`` (weights | state rows as they are now,
and which exist), ``keys()`` and ``dim``: the weights columns are the table's vectors, the
optimizer state stays out of sight, and training rows keep no tags of the caller's (their tags
are steps), so every row present is fresh.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import KeyTypeError, SchemaError
from ..file.inputs import default_row

__all__ = ["WeightsView"]

HIT, OOV = 0, 1  # get_fresh statuses (embkv.HIT, embkv.OOV)


def _fill(default: Any, dim: int) -> np.ndarray:
    if default is None:
        return np.zeros(dim, dtype=np.float32)
    return np.frombuffer(default_row(default, dim, np.dtype(np.float32)), dtype=np.float32)


def _stats_buffer(stats: Any) -> np.ndarray | None:
    if stats is None:
        return None
    counters = np.asarray(stats)
    if counters.dtype != np.int64 or counters.shape != (4,):
        raise ValueError("stats must be an int64 buffer of 4 counters (calls, keys, fresh, stale)")
    return counters


class WeightsView:
    """The table interface's reads over ``read``/``keys``/``dim`` (see the module docstring)."""

    dim: int

    def read(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def keys(self) -> np.ndarray:
        raise NotImplementedError

    def get(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(weights [B, dim], found [B])``; ids without a row hold ``default`` (zeros if None).
        ``weights(ids)`` gives their initial vector instead."""
        fill = _fill(default, self.dim)
        rows, found = self.read(keys)
        vectors = np.ascontiguousarray(rows[:, : self.dim])
        vectors[~found] = fill
        return vectors, found

    def get_tagged(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`get`, and a tag of 0 for every row."""
        vectors, found = self.get(keys, default)
        return vectors, found, np.zeros(len(found), dtype=np.uint64)

    def get_fresh(self, keys: Any, min_version: int, max_age: int = 0, default: Any = None,
                  stats: Any = None, stale_as_miss: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """As for any untagged table: every row present is fresh (``embkv.HIT``), the rest ``embkv.OOV``."""
        for label, value in (("min_version", min_version), ("max_age", max_age)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise SchemaError(f"{label} must be an int, got {value!r}")
        if min_version < 0:
            raise SchemaError(f"min_version must not be negative, got {min_version}")
        if max_age < 0:
            raise ValueError(f"max_age must not be negative, got {max_age}")  # as the file table says
        counters = _stats_buffer(stats)
        vectors, found = self.get(keys, default)
        fresh = int(found.sum())
        if counters is not None:
            counters += np.array([1, len(found), fresh, 0], dtype=np.int64)
        return vectors, np.where(found, HIT, OOV).astype(np.int8), fresh

    def contains(self, keys: Any) -> np.ndarray:
        """Bool [B]: which ids have a row."""
        found: np.ndarray = self.read(keys)[1]
        return found

    def __contains__(self, key: object) -> bool:
        try:
            return bool(self.contains([key])[0])
        except KeyTypeError:
            return False

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys().tolist())

    def __len__(self) -> int:
        """Rows that exist now (a scan of the stored keys, as :meth:`keys` makes)."""
        return len(self.keys())
