"""The durable record of a training table: its schema, the step count, and the checkpoint protocol.

A training table ``<name>`` keeps, in its store's folder:

- ``<name>.train`` (an embkv table): the rows of the last checkpoint, each ``weights | optimizer
  state`` as float32, the row tag the step it was last touched at;
- ``<name>.train-spill`` (an embkv table): rows the hot cache evicted dirty since then;
- ``<name>.train.json``: this record, replaced atomically (write, fsync, rename);
- ``<name>.train-seen.<epoch>.npz``: the admission counters of ids not yet stored, as of that
  checkpoint.

A checkpoint writes every dirty cached row to the spill table and syncs it, writes the
counters, then the record with ``merging = true``: that rename is the commit point. It then
merges the spill table into ``<name>.train`` (upserts, then the evictions the record's step
decides), syncs, empties the spill and rewrites the record with ``merging = false``. Opening
finishes a merge the record says was under way (each part can be redone), or else empties the
spill table: its rows came after the last checkpoint. So a trainer killed at any point reopens
at its last checkpoint, with no push half applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import numpy as np

from ..errors import CorruptTableError, SchemaError

__all__ = ["TrainRecord", "load_counters", "record_path", "save_counters"]

RECORD_VERSION = 1


def record_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.train.json")


def counters_path(folder: str, name: str, epoch: int) -> str:
    return os.path.join(folder, f"{name}.train-seen.{epoch}.npz")


@dataclasses.dataclass
class TrainRecord:
    """What a training table keeps beside its rows (``<name>.train.json``)."""

    dim: int
    optimizer: dict[str, Any]
    init_std: float
    seed: int
    admit_after: int
    evict_after_steps: int
    step: int = 0  # pushes applied, as of the checkpoint
    epoch: int = 0  # checkpoints taken
    merging: bool = False  # the spill table holds a committed checkpoint not yet merged
    version: int = RECORD_VERSION

    @classmethod
    def load(cls, path: str) -> TrainRecord | None:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CorruptTableError(f"{path}: unreadable training record ({exc})") from None
        if data.get("version") != RECORD_VERSION:
            raise SchemaError(f"{path}: training record version {data.get('version')!r}, this embkv reads "
                              f"{RECORD_VERSION}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CorruptTableError(f"{path}: training record fields are wrong ({exc})") from None

    def with_settings(self, other: TrainRecord) -> TrainRecord:
        """This record's progress (step, epoch, merging) with ``other``'s settings: a trainer's
        optimizer settings, init and admission may change each time it opens the table."""
        return dataclasses.replace(other, step=self.step, epoch=self.epoch, merging=self.merging)

    def save(self, path: str, durable: bool) -> None:
        """Replace the record atomically: readers see the old one or the new one, whole."""
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_counters(folder: str, name: str, epoch: int, ids: np.ndarray, counts: np.ndarray, durable: bool) -> None:
    """Write the admission counters of checkpoint ``epoch`` (before the record names that epoch)."""
    path = counters_path(folder, name, epoch)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, ids=ids.astype(np.int64), counts=counts.astype(np.int64))
    if durable:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def load_counters(folder: str, name: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    path = counters_path(folder, name, epoch)
    if epoch == 0 and not os.path.exists(path):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    try:
        with np.load(path) as data:
            return data["ids"].astype(np.int64), data["counts"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptTableError(f"{path}: admission counters unreadable ({exc})") from None


def remove_counters_except(folder: str, name: str, keep_epoch: int) -> None:
    prefix = f"{name}.train-seen."
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry != os.path.basename(counters_path(folder, name, keep_epoch)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
