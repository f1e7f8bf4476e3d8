"""The one table interface: what every kind of embkv table serves and takes by key.

The file table (:class:`embkv.Table`) and the training table (:class:`embkv.train.TrainingTable`)
implement it today; the tiers, versioned readers and the remote client will implement it too,
and every implementation runs the
same conformance suite, :class:`embkv.testing.BackendTests`. Code written against
:class:`EmbeddingTable` works with any of them; what a kind cannot do is said by its
:class:`Capabilities`, not discovered by catching errors.

Example::

    def warm(table: embkv.EmbeddingTable, keys) -> None:
        if table.capabilities.writable:
            table.put(keys, compute(keys))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["Capabilities", "EmbeddingTable"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a table can do beyond reading.

    - ``writable``: ``put`` and ``delete`` work (else they raise :class:`embkv.ReadOnlyError`).
    - ``durable``: an acknowledged write survives a crash of the process (a disk store, or a
      server that persists); a table in ``/dev/shm`` survives a process crash but not a reboot.
    - ``tagged``: rows keep the u64 tag given to ``put(..., tags=)``, read by ``get_tagged``
      and ``get_fresh`` (an untagged kind reads every tag as 0 and every present row as fresh,
      and refuses tags given to ``put`` with :class:`embkv.SchemaError`).
    - ``shared_across_processes``: readers in other processes opened on the same table see
      every write (a shared-memory or file table, a server); an in-process table does not.
    """

    writable: bool
    durable: bool
    tagged: bool
    shared_across_processes: bool


@runtime_checkable
class EmbeddingTable(Protocol):
    """Vectors of one fixed width, looked up, written and deleted by key, in batches.

    Keys are int64 (``key_type == "int64"``) or str/bytes (``"str"``); a batch of keys is an
    array, a list, or any iterable. Every call takes a whole batch: one call per request, not
    per key. Bad input raises a typed :class:`embkv.EmbkvError` and changes nothing.
    """

    name: str
    dim: int
    dtype: np.dtype[Any]
    key_type: Literal["int64", "str"]
    capabilities: Capabilities

    def get(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [B, dim], found [B])``; missing rows hold ``default`` (zeros if None)."""
        ...

    def get_tagged(self, keys: Any, default: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`get`, plus each row's u64 tag (0 for misses and untagged rows)."""
        ...

    def get_fresh(self, keys: Any, min_version: int, max_age: int = 0, default: Any = None,
                  stats: Any = None, stale_as_miss: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """Vectors, a status per key (``embkv.HIT`` / ``OOV`` / ``STALE``) and the number fresh."""
        ...

    def contains(self, keys: Any) -> np.ndarray:
        """Bool ``[B]``: which keys are present."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def put(self, keys: Any, vectors: Any, tags: Any = None) -> None:
        """Upsert a batch (duplicate keys in it: the last wins)."""
        ...

    def delete(self, keys: Any) -> int:
        """Remove keys; returns how many were present."""
        ...

    def __len__(self) -> int: ...

    def keys(self) -> Any:
        """A snapshot of the keys present: int64 array, or a list of str (bytes if not UTF-8)."""
        ...

    def __iter__(self) -> Iterator[Any]: ...

    def export(self) -> tuple[Any, np.ndarray]:
        """Every ``(keys, vectors)`` present, as one consistent snapshot."""
        ...

    def info(self) -> dict[str, Any]:
        """Schema and counts as a plain dict (at least ``name``, ``dim``, ``dtype``, ``key_type``, ``rows``)."""
        ...

    def close(self) -> None:
        """Release what the table holds; arrays already returned stay valid."""
        ...
