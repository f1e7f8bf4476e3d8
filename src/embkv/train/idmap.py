"""The id -> cache slot map of a training table: the compiled ``IdMap``, or a dict fallback.

Both take whole batches of int64 ids. The fallback loops in Python per id (correct, slow), as
the numpy fallback of the file kernels does for writes; it is used only when the C extension
``embkv.train._idmap`` could not be built (``EMBKV_KERNEL=numpy`` forces it).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol

import numpy as np

__all__ = ["IdMapLike", "make_idmap"]


class IdMapLike(Protocol):
    def lookup(self, keys: Any, out: Any) -> int: ...
    def insert(self, keys: Any, values: Any) -> None: ...
    def remove(self, keys: Any) -> int: ...
    def clear(self) -> None: ...
    def items(self) -> tuple[bytes, bytes]: ...
    def __len__(self) -> int: ...


class DictIdMap:
    """Pure-Python twin of ``_idmap.IdMap``."""

    def __init__(self, max_items: int) -> None:
        self._map: dict[int, int] = {}
        self._max = max_items

    def lookup(self, keys: Any, out: Any) -> int:
        k = np.frombuffer(keys, dtype=np.int64).tolist()
        got = [self._map.get(key, -1) for key in k]
        np.frombuffer(out, dtype=np.int64)[:] = got
        return sum(v >= 0 for v in got)

    def insert(self, keys: Any, values: Any) -> None:
        for key, value in zip(np.frombuffer(keys, dtype=np.int64).tolist(),
                              np.frombuffer(values, dtype=np.int64).tolist(), strict=True):
            if key not in self._map and len(self._map) >= self._max:
                raise OverflowError("IdMap is full")
            self._map[key] = value

    def remove(self, keys: Any) -> int:
        return sum(self._map.pop(key, None) is not None for key in np.frombuffer(keys, dtype=np.int64).tolist())

    def clear(self) -> None:
        self._map.clear()

    def items(self) -> tuple[bytes, bytes]:
        keys = np.fromiter(self._map.keys(), dtype=np.int64, count=len(self._map))
        values = np.fromiter(self._map.values(), dtype=np.int64, count=len(self._map))
        return keys.tobytes(), values.tobytes()

    def __len__(self) -> int:
        return len(self._map)


def _load() -> Any:
    if os.environ.get("EMBKV_KERNEL", "").lower() == "numpy":
        return None
    try:
        return importlib.import_module("embkv.train._idmap")
    except ImportError:
        return None  # the file kernels already warn about a missing compiled part


_C = _load()


def make_idmap(max_items: int) -> IdMapLike:
    """An empty map for up to ``max_items`` ids."""
    if _C is None:
        return DictIdMap(max_items)
    idmap: IdMapLike = _C.IdMap(max_items)
    return idmap
