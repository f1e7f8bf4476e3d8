"""What callers hand a training table, checked: ids, rows of floats, and duplicates among ids.

The checks are the file tables' (``embkv.file.inputs``), so a training table takes and refuses
the same keys and vectors as any :class:`embkv.EmbeddingTable`; errors name the training table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KeyTypeError, SchemaError
from ..file.inputs import as_int_keys, as_vectors

__all__ = ["as_ids", "as_rows", "last_of_duplicates"]


def as_ids(ids: Any, table: str) -> np.ndarray:
    """``ids`` as a contiguous int64 array (a scalar is one id); :class:`KeyTypeError` for
    strings, floats, bools, 2-D arrays or values beyond int64."""
    if type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1 and ids.flags.c_contiguous:
        return ids  # the hot path: a batch of int64 ids as a data loader gives them
    try:
        return as_int_keys(ids)
    except KeyTypeError as exc:
        raise KeyTypeError(f"training table {table!r}: ids: {exc}") from None


def as_rows(values: Any, n: int, width: int, what: str, table: str) -> np.ndarray:
    """``values`` as float32 ``[n, width]`` (one 1-D row for one id); :class:`SchemaError` otherwise."""
    try:
        arr = as_vectors(values, n, width)
    except SchemaError as exc:
        raise SchemaError(f"training table {table!r}: {what}: {exc}") from None
    return np.ascontiguousarray(arr, dtype=np.float32)


def last_of_duplicates(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids (sorted), and for each the index of its last occurrence."""
    uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return uniq, len(ids) - 1 - first_in_reversed
