"""Conformance suites that every kind of embkv table and work queue runs (needs pytest).

As ``zarr.testing`` does for stores: a backend proves it keeps the contract by subclassing
the suite with a factory, and pytest collects the subclass like any test class::

    # tests/test_my_table.py
    import pytest
    import embkv
    from embkv.testing import BackendTests

    class TestMyTable(BackendTests):
        @pytest.fixture
        def make_table(self, tmp_path):
            store = embkv.open(tmp_path)
            names = iter(range(1_000_000))

            def make(key_type="int64", dim=16, dtype="float32", tagged=False):
                return store.create_table(f"t{next(names)}", dim, dtype, key_type, tags=tagged)

            yield make
            store.close()

The suites are :class:`BackendTests` and :class:`WorkQueueTests` (loaded on first use, so
the helpers :func:`encode`, :func:`check_vectors` and :func:`poll` import without pytest);
``help(embkv.testing.BackendTests)`` lists the hooks a subclass may set. Tests a kind cannot
run are skipped by its :class:`embkv.Capabilities` (a table that keeps
no tags skips the tag tests), never by catching errors. :class:`WorkQueueTests` does the same
for :class:`embkv.WorkQueue` backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .data import check_vectors, encode, poll

if TYPE_CHECKING:
    from .backend import BackendTests, TableFactory, open_store_table
    from .queue import QueueFactory, WorkQueueTests

# the suites import pytest; they load on first use, so that the helpers in ``data`` stay cheap
# to import in the child processes that tests spawn
_LAZY = {"BackendTests": "backend", "TableFactory": "backend", "open_store_table": "backend",
         "QueueFactory": "queue", "WorkQueueTests": "queue"}

__all__ = [
    "BackendTests",
    "QueueFactory",
    "TableFactory",
    "WorkQueueTests",
    "check_vectors",
    "encode",
    "open_store_table",
    "poll",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
