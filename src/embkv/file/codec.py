"""How a stored dtype turns vectors into row bytes and back: plain floats, bfloat16, int8 with a scale.

- ``float16`` / ``float32`` / ``float64``: the values as numpy casts them (out of float16's range
  becomes inf, as ``astype`` does).
- ``bfloat16``: the top 16 bits of the float32, rounded to nearest even; out of range becomes
  inf, NaN stays NaN. Read back as float32.
- ``int8``: symmetric per-row quantization, ``scale = max|x| / 127`` kept as a float32 before
  the row's ``dim`` int8 codes, ``x ~ code * scale`` with an error of at most ``scale / 2`` per
  element. Read back as float32. NaN and inf cannot be scaled and are refused. A row whose
  largest value is below about 1.8e-43 gets a scale that underflows to 0 and reads back as
  zeros (an error below 1.8e-43).

The kernels decode in the same way when they copy rows out (``_kernels.c: copy_vec``); this
module is the encoder for every write and the decoder of the numpy fallback and of exports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SchemaError

__all__ = ["QUANTIZED", "decode_rows", "encode_rows", "stored_bytes"]

QUANTIZED = ("int8", "bfloat16")  # stored dtypes read back as float32
SCALE_BYTES = 4


def stored_bytes(dtype: str, dim: int) -> int:
    """Bytes one vector takes in a row."""
    if dtype == "int8":
        return SCALE_BYTES + dim
    if dtype == "bfloat16":
        return 2 * dim
    return dim * np.dtype(dtype).itemsize


def encode_rows(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """``vectors`` ``[n, dim]`` (any real dtype) as stored rows: a C-contiguous array of the stored form.

    Raises :class:`SchemaError` for an int8 row holding NaN or inf (nothing is written then).
    """
    if dtype == "int8":
        given = np.asarray(vectors)
        if not np.isfinite(given).all():
            bad = int(np.flatnonzero(~np.isfinite(given).all(axis=1))[0])
            raise SchemaError(f"int8 rows need finite values (a scale cannot hold NaN or inf): row {bad} has one")
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(given, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise SchemaError(f"int8 rows are scaled in float32: row {bad} holds a value beyond its range (3.4e38)")
        n, dim = x.shape
        peak = np.abs(x).max(axis=1) if dim else np.zeros(n, dtype=np.float32)
        scale = (peak / np.float32(127)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        codes = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
        out = np.empty((n, SCALE_BYTES + dim), dtype=np.uint8)
        out[:, :SCALE_BYTES] = scale.view(np.uint8).reshape(n, SCALE_BYTES)
        out[:, SCALE_BYTES:] = codes.view(np.uint8)
        return out
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        # a NaN keeps its sign and becomes a quiet NaN (rounding could carry it into inf)
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
        return np.ascontiguousarray(rounded.astype(np.uint16))
    return np.ascontiguousarray(vectors, dtype=dtype)


def decode_rows(raw: Any, dtype: str, dim: int) -> np.ndarray:
    """Stored rows (``[n, stored_bytes]`` bytes, or an array of them) as vectors of the read dtype."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, stored_bytes(dtype, dim))
    if dtype == "int8":
        scale = np.ascontiguousarray(data[:, :SCALE_BYTES]).view(np.float32)
        codes = data[:, SCALE_BYTES:].view(np.int8).astype(np.float32)
        result: np.ndarray = codes * scale
        return result
    if dtype == "bfloat16":
        return (np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(data).view(dtype)
