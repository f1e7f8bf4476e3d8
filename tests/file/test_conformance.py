"""The file table runs the shipped table contract (``embkv.testing.BackendTests``).

Twice: a store in /dev/shm and a durable store on disk (every write logged and synced).
test_backends.py runs this file again on the numpy kernel. Tables start at the smallest
capacity, so the suite's batches also grow them (publish new versions) as they go.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import embkv
from embkv.testing import BackendTests, open_store_table


class FileTableTests(BackendTests):
    """What every file table adds to the contract: row bookkeeping, and files left as they were."""

    store: embkv.Store
    quantized_dtypes = ("int8", "bfloat16")

    def open_store(self, path: str) -> embkv.Store:
        return embkv.open(path)

    @pytest.fixture
    def make_table(self, path: str) -> Iterator[Callable[..., embkv.EmbeddingTable]]:
        self.store = self.open_store(path)
        made = iter(range(10**6))

        def make(key_type: str = "int64", dim: int = 16, dtype: str = "float32",
                 tagged: bool = False) -> embkv.EmbeddingTable:
            return self.store.create_table(f"t{next(made)}", dim, dtype, key_type, capacity=16,  # type: ignore[arg-type]
                                           tags=tagged)

        yield make
        self.store.close()

    def reader_opener(self, table: Any) -> Callable[[], embkv.EmbeddingTable]:
        return functools.partial(open_store_table, self.store.path, table.name)

    def replace_all(self, table: Any, keys: Any, vectors: np.ndarray) -> bool:
        self.store.load_table(table.name, keys, vectors)  # a new version, published atomically
        return True

    def state(self, table: Any) -> object:
        st = os.stat(table.path)
        folder = sorted(os.listdir(os.path.dirname(table.path)))
        return super().state(table), table.generation, table.capacity, (st.st_ino, st.st_size), folder

    def check_invariants(self, table: Any) -> None:
        super().check_invariants(table)
        info = table.info()
        assert info["rows_used"] - info["free_rows"] == info["rows"], info  # every used row is live or free
        assert info["rows_used"] <= info["capacity"]

    def test_growth_keeps_tags_and_publishes_a_new_version(self, make_table: Any) -> None:
        t = make_table(dim=4, tagged=True)
        t.put([1, 2], np.ones((2, 4)), tags=[7, 8])
        t.put(np.arange(100, 200), np.ones((100, 4)))
        assert t.capacity > 16
        assert t.get_tagged([1, 2])[2].tolist() == [7, 8], "growth lost the tags"
        self.check_invariants(t)


class TestMemoryTable(FileTableTests):
    @pytest.fixture
    def path(self, store_path: str) -> str:
        return store_path


class TestDiskTable(FileTableTests):
    @pytest.fixture
    def path(self, disk_store_path: str) -> str:
        return disk_store_path

    def open_store(self, path: str) -> embkv.Store:
        return embkv.open(path, sync="always")

    def test_is_durable(self, make_table: Any) -> None:
        t = make_table()
        assert t.capabilities.durable and t.durable
