"""Initial vectors of rows a training table has never stored: N(0, std), seeded by (seed, id).

Counter-based, so an id gets the same vector in any process, any batch, any order, and after a
reopen: the j-th element comes from splitmix64 of (seed, id, j) through Box-Muller. Vectorized
over the whole batch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["initial_vectors"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO53 = float(1 << 53)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    result: np.ndarray = x ^ (x >> np.uint64(31))
    return result


def initial_vectors(ids: np.ndarray, dim: int, std: float, seed: int) -> np.ndarray:
    """float32 [len(ids), dim]: element j of id i's vector is a standard normal times ``std``."""
    if std == 0 or not len(ids):
        return np.zeros((len(ids), dim), dtype=np.float32)
    with np.errstate(over="ignore"):
        base = _mix(ids.astype(np.int64).view(np.uint64) ^ _mix(np.full(1, seed, dtype=np.uint64) * _GOLDEN))
        j = np.arange(dim, dtype=np.uint64)
        a = _mix(base[:, None] + (2 * j + 1) * _GOLDEN)
        b = _mix(base[:, None] + (2 * j + 2) * _GOLDEN)
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) / (_TWO53 + 1.0)  # (0, 1]: log is finite
    u2 = (b >> np.uint64(11)).astype(np.float64) / _TWO53
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (normal * std).astype(np.float32)
