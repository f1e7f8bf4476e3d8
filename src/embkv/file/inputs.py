"""What callers hand a table, checked and put in the form the kernels read.

Every check raises a typed error (:class:`KeyTypeError`, :class:`SchemaError`) before
anything is written, so a bad batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import KeyTypeError, SchemaError
from .kernels import pack_str

__all__ = [
    "as_int_keys",
    "as_str_keys",
    "as_tags",
    "as_vectors",
    "default_row",
    "lookup_keys",
    "str_keys_as_list",
    "unpack_str",
]

_INT64_MAX = np.iinfo(np.int64).max
_ARRAY_LIKE = (np.ndarray, list, tuple, range, int)  # what np.asarray takes as it is, checked first (cheap)


def as_int_keys(keys: Any) -> np.ndarray:
    """Keys for an int64 table as a contiguous int64 array; typed errors for anything else."""
    if isinstance(keys, (str, bytes)):
        raise KeyTypeError("int64 table: keys must be integers, got a string")
    if (type(keys) not in _ARRAY_LIKE and not hasattr(keys, "__array__") and isinstance(keys, Iterable)
            and not isinstance(keys, Sequence)):
        keys = list(keys)  # a generator or a set: numpy would make a 0-d object array of it
    try:
        arr = np.asarray(keys)
    except (ValueError, TypeError) as exc:
        raise KeyTypeError(f"int64 table: keys must be a flat array of integers ({exc})") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise KeyTypeError(f"keys must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind == "u":
        if arr.max() > _INT64_MAX:
            raise KeyTypeError("int64 table: unsigned keys above 2**63-1 do not fit")
    elif arr.dtype.kind != "i":
        raise KeyTypeError(f"int64 table: keys must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def str_keys_as_list(keys: Any) -> Sequence[Any]:
    """Keys for a str table as a sequence of str/bytes (a bare str or bytes is one key)."""
    if isinstance(keys, (str, bytes)):
        return [keys]
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise KeyTypeError(f"keys must be one-dimensional, got shape {keys.shape}")
        if keys.dtype.kind not in "USO" and keys.size:
            raise KeyTypeError(f"str table: keys must be str or bytes, got dtype {keys.dtype}")
        listed: list[Any] = keys.tolist()
        return listed
    if isinstance(keys, Sequence):
        return keys
    try:
        return list(keys)
    except TypeError:
        raise KeyTypeError(f"str table: keys must be a sequence of str or bytes, got {type(keys).__name__}") from None


def as_str_keys(keys: Any) -> tuple[bytes, bytes, bytes]:
    """Keys for a str table packed as (xxh3 hashes, offsets, UTF-8 blob)."""
    keys = str_keys_as_list(keys)
    try:
        packed: tuple[bytes, bytes, bytes] = pack_str(keys)
    except (TypeError, UnicodeEncodeError) as exc:
        raise KeyTypeError(f"str table: {exc}") from None
    return packed


def lookup_keys(keys: Any, int_keys: bool) -> Any:
    """Keys as the kernel's lookups read them: a contiguous int64 array, or a list of str/bytes.

    A one-shot iterable (a generator) becomes a list here, so a caller that reads the keys
    twice (a lookup, then the misses) passes the result instead.
    """
    if int_keys:
        if type(keys) is np.ndarray and keys.dtype == np.int64 and keys.ndim == 1 and keys.flags.c_contiguous:
            return keys
        return as_int_keys(keys)
    if type(keys) is list or type(keys) is tuple:
        return keys  # the kernel reads str/bytes straight from the list
    return str_keys_as_list(keys)


def unpack_str(packed: tuple[bytes, bytes, bytes]) -> list[str | bytes]:
    """Inverse of :func:`as_str_keys` (keys that are not valid UTF-8 come back as bytes)."""
    offsets = np.frombuffer(packed[1], dtype=np.uint64).tolist()
    blob = packed[2]
    out: list[str | bytes] = []
    for i in range(len(offsets) - 1):
        raw = blob[offsets[i] : offsets[i + 1]]
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(raw)
    return out


def as_vectors(vectors: Any, n: int, dim: int) -> np.ndarray:
    """``vectors`` as a real ``[n, dim]`` array (not yet in the stored form); SchemaError otherwise."""
    try:
        arr = np.asarray(vectors)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"vectors must be a [{n}, {dim}] array: {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise SchemaError(f"vectors must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1 and n == 1:
        arr = arr.reshape(1, -1)
    if arr.shape != (n, dim):
        raise SchemaError(f"vectors must have shape ({n}, {dim}), got {arr.shape}")
    return arr


def default_row(default: Any, dim: int, dtype: np.dtype[Any]) -> bytes:
    """The raw row a lookup writes for a missing key: a scalar or a ``[dim]`` vector, as bytes."""
    try:
        given = np.asarray(default)
        if given.dtype.kind not in "fiu":
            raise TypeError(f"got dtype {given.dtype}")
        arr = np.broadcast_to(given.astype(dtype), (dim,))
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"default must be a real scalar or a vector of dim {dim}: {exc}") from None
    return arr.tobytes()


def as_tags(tags: Any, n: int) -> np.ndarray:
    """Row tags as a contiguous uint64 ``[n]`` array; SchemaError for anything else."""
    if tags is None:
        return np.zeros(n, dtype=np.uint64)
    try:
        arr = np.asarray(tags)
        if arr.dtype.kind in "fO" and not isinstance(tags, np.ndarray):
            # a list holding ints above 2**63 comes out as float or object: convert it exactly
            items = list(tags) if isinstance(tags, (list, tuple)) else [tags]
            if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                arr = np.array(items, dtype=np.uint64).reshape(np.shape(tags))
        if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
            raise TypeError(f"got dtype {arr.dtype}")
        if arr.ndim == 0:
            arr = np.full(n, arr)
        if arr.shape != (n,):
            raise ValueError(f"got shape {arr.shape}")
        if arr.dtype.kind == "i" and (arr < 0).any():
            raise ValueError("tags must not be negative")
    except (ValueError, TypeError, OverflowError) as exc:
        raise SchemaError(f"tags must be unsigned 64-bit integers, one per key or one for all {n}: {exc}") from None
    return np.ascontiguousarray(arr, dtype=np.uint64)
