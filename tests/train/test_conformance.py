"""Training tables run the shipped table contract (``embkv.testing.BackendTests``) on their weights.

A training table has int64 keys and float32 rows, so the suite's str-key and other-dtype tests
skip (the factory says why). Its cache holds 64 rows, so the suite's batches also evict rows
to the spill and read them back; ``sole`` and ``shared`` trainers both run it. Each table is
closed (checkpointed) at teardown and its checkpoint must then reopen to the same content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import embkv
from embkv.testing import BackendTests
from embkv.train import Adagrad, TrainingTable
from embkv.train.cache import slot_bytes

CACHE_ROWS = 64


class TrainingTableTests(BackendTests):
    shared = False

    @pytest.fixture
    def make_table(self, disk_store_path: str) -> Iterator[Callable[..., embkv.EmbeddingTable]]:
        store = embkv.open(disk_store_path)
        made: list[TrainingTable] = []

        def make(key_type: str = "int64", dim: int = 16, dtype: str = "float32",
                 tagged: bool = False) -> embkv.EmbeddingTable:
            if key_type != "int64" or dtype != "float32":
                pytest.skip("training tables have int64 keys and float32 rows")
            table = TrainingTable(store, f"t{len(made)}", dim, Adagrad(lr=0.1),
                                  cache_bytes=CACHE_ROWS * slot_bytes(2 * dim), shared=self.shared)
            made.append(table)
            return table

        yield make
        for table in made:
            if table._closed:
                continue
            before = table.export()
            table.close()  # checkpointed: the same rows come back
            again = TrainingTable(store, table.name, table.dim, Adagrad(lr=0.1), shared=self.shared)
            after = again.export()
            again.close()
            np.testing.assert_array_equal(after[0], before[0])
            np.testing.assert_array_equal(after[1], before[1])
        store.close()

    def check_invariants(self, table: Any) -> None:
        super().check_invariants(table)
        assert table.stats()["rows_cached"] <= CACHE_ROWS

    def test_nan_inf_and_signed_zero_stored_as_given(self, make_table: Any) -> None:
        """Where training tables part from the contract: a NaN or inf weight never trains back, so
        ``put`` refuses them (and changes nothing); a signed zero is kept."""
        t = make_table(dim=3)
        t.put([1], [[1.0, -0.0, 2.0]])
        before = self.state(t)
        for bad in ([[np.nan, 0, 0]], [[0, np.inf, 0]], [[0, 0, -np.inf]]):
            with pytest.raises(embkv.SchemaError, match="NaN or inf"):
                t.put([1, ], bad)
            assert self.state(t) == before
        assert np.signbit(t.get([1])[0][0, 1])

    def test_big_put_goes_past_the_cache(self, make_table: Any) -> None:
        t = make_table(dim=4)
        t.put(np.arange(1000), np.arange(4000).reshape(1000, 4))
        assert t.stats()["rows_cached"] <= CACHE_ROWS and len(t) == 1000
        assert t.get([999])[0].tolist() == [[3996, 3997, 3998, 3999]]


class TestSoleTrainer(TrainingTableTests):
    pass


class TestSharedTrainer(TrainingTableTests):
    shared = True
