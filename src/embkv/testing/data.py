"""Self-checking vectors and a polling helper, shared by the conformance suites and embkv's own tests.

Row ``v`` of key ``k`` written in version ``n`` holds ``v[0] = k``, ``v[1] = n`` and
``v[j] = (k*7919 + n*104729 + j*31) mod 2**20`` for j >= 2. Every element is an integer below
2**24, so float32 stores it exactly, and a vector mixing two writes (two keys, or two
versions of one key) fails :func:`check_vectors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

__all__ = ["DIM", "check_vectors", "encode", "poll"]

DIM = 16
_MOD = 1 << 20
T = TypeVar("T")


def encode(keys: Any, versions: Any, dim: int = DIM) -> np.ndarray:
    """The vectors of ``keys`` as written in ``versions`` (one per key, or one for all), float32."""
    k = np.asarray(keys, dtype=np.int64).reshape(-1)
    n = np.broadcast_to(np.asarray(versions, dtype=np.int64), k.shape)
    j = np.arange(dim, dtype=np.int64)
    out = (k[:, None] * 7919 + n[:, None] * 104729 + j[None, :] * 31) % _MOD
    out[:, 0] = k
    out[:, 1] = n
    return out.astype(np.float32)


def check_vectors(keys: Any, vectors: np.ndarray) -> np.ndarray:
    """Assert each vector is a whole write of its key; return the version of each."""
    k = np.asarray(keys, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors)
    assert vectors.shape == (len(k), vectors.shape[1])
    versions = vectors[:, 1].astype(np.int64)
    want = encode(k, versions, vectors.shape[1])
    bad = np.flatnonzero((want != vectors).any(axis=1))
    assert not len(bad), (
        f"{len(bad)} inconsistent vectors, e.g. key {k[bad[0]]}: got {vectors[bad[0]].tolist()}, "
        f"want {want[bad[0]].tolist()}"
    )
    return versions


def poll(fn: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Call ``fn`` until it returns something truthy and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
