"""What callers hand a training table, checked: ids, rows of floats, and duplicates among ids.

The checks are the file tables' (``embkv.file.inputs``), so a training table takes and refuses
the same keys and vectors as any :class:`embkv.EmbeddingTable`; errors name the training table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KeyTypeError, SchemaError
from ..file.inputs import as_int_keys, as_vectors
from .cache import slot_bytes
from .optimizers import Optimizer

__all__ = ["as_ids", "as_rows", "check_settings", "last_of_duplicates"]


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


def check_settings(dim: Any, optimizer: Any, *, cache_bytes: Any, init_std: Any, seed: Any, staleness: Any,
                   admit_after: Any, evict_after_steps: Any, shared: bool) -> None:
    """:class:`SchemaError` for a training table's settings that cannot work, before any file is made."""
    if not isinstance(optimizer, Optimizer):
        raise SchemaError(f"optimizer must be embkv.train.SGD, Adagrad or Adam, got {optimizer!r}")
    for label, value in (("dim", dim), ("staleness", staleness), ("admit_after", admit_after),
                         ("evict_after_steps", evict_after_steps), ("seed", seed), ("cache_bytes", cache_bytes)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise SchemaError(f"{label} must be an int >= 0, got {value!r}")
    if not 0 < dim <= 1 << 16:
        raise SchemaError(f"dim must be in 1..65536, got {dim}")
    if not (isinstance(init_std, (int, float)) and np.isfinite(init_std) and init_std >= 0):
        raise SchemaError(f"init_std must be finite and >= 0, got {init_std!r}")
    one_row = slot_bytes(int(dim) + optimizer.state_dim(int(dim)))
    if cache_bytes < one_row:
        raise SchemaError(f"cache_bytes={cache_bytes} holds no row: one row and its state take {one_row} bytes")
    if shared and admit_after > 1:
        raise SchemaError("admit_after needs a sole trainer: its counters live in one process (shared=False)")
