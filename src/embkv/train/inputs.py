"""What callers hand a training table, checked: ids, rows of floats, and duplicates among ids."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KeyTypeError, SchemaError

__all__ = ["as_ids", "as_rows", "last_of_duplicates"]


def as_ids(ids: Any, table: str) -> np.ndarray:
    """``ids`` as a contiguous int64 array; :class:`KeyTypeError` for floats, bools, 2-D or too large."""
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise KeyTypeError(f"training table {table!r}: ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise KeyTypeError(f"training table {table!r}: ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.uint64 and len(arr) and arr.max() > np.iinfo(np.int64).max:
        raise KeyTypeError(f"training table {table!r}: ids must fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_rows(values: Any, n: int, width: int, what: str, table: str) -> np.ndarray:
    """``values`` as float32 ``[n, width]``; :class:`SchemaError` otherwise."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"training table {table!r}: {what} must be numbers ({exc})") from None
    if arr.shape != (n, width):
        raise SchemaError(f"training table {table!r}: {what} must have shape ({n}, {width}), got {arr.shape}")
    return arr


def last_of_duplicates(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids (sorted), and for each the index of its last occurrence."""
    uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return uniq, len(ids) - 1 - first_in_reversed
