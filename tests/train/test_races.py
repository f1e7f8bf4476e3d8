"""Regressions from the review of the training-table interface and shared trainers: what another
thread (the prefetcher, a delete, a bulk put) or another trainer changes while a call waits or
reads must never come back stale, and nothing is left behind by a killed publish."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embkv
from embkv.train import SGD, TrainingTable
from embkv.train.cache import slot_bytes


def _slow_prefetch_reads(table: TrainingTable) -> tuple[threading.Event, threading.Event]:
    """Make the prefetch thread's reads stop until ``go`` is set (``started`` says it got there)."""
    real = table.stored.read
    started, go = threading.Event(), threading.Event()

    def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = real(ids)
        if threading.current_thread().name.startswith("embkv-prefetch"):
            started.set()
            go.wait(10)
        return rows

    table.stored.read = read  # type: ignore[method-assign]
    return started, go


def test_a_prefetch_spanning_a_bulk_put_does_not_cache_the_old_rows(disk_store_path: str) -> None:
    with embkv.open(disk_store_path) as store:
        t = TrainingTable(store, "t", 4, SGD(lr=1.0), init_std=0.0, cache_bytes=100 * slot_bytes(4))
        ids = np.arange(64)
        t.put(ids, np.ones((64, 4)))
        t.checkpoint()  # the rows leave the cache's dirty set; a bulk put writes straight to the files
        started, go = _slow_prefetch_reads(t)
        t.prefetch(ids)
        assert started.wait(10)
        t.put(ids, np.full((64, 4), 7.0))  # more than a quarter of the cache: the bulk path
        go.set()
        t.wait_prefetch(10)
        np.testing.assert_array_equal(t.get(ids)[0], np.full((64, 4), 7.0))
        t.close()


def test_a_delete_while_a_pull_waits_for_room_gives_no_other_ids_row(store: embkv.Store) -> None:
    t = TrainingTable(store, "t", 4, SGD(lr=1.0), init_std=0.0, cache_bytes=16 * slot_bytes(4))
    every = np.arange(100)
    t.put(every, np.repeat(every[:, None], 4, axis=1).astype(np.float32))
    held, x = np.arange(14), 50
    t.pull(held)
    t.pull([x])
    t.release([x])  # 14 pinned, x cached and unpinned, one slot free
    out: dict[str, np.ndarray] = {}
    waiter = threading.Thread(target=lambda: out.setdefault("rows", t.pull([x, 60, 61, 62])))
    waiter.start()
    time.sleep(0.3)  # the pull holds x and waits for room
    t.delete([x])  # frees x's slot under the waiting pull
    t.push(held, np.zeros((14, 4), dtype=np.float32))  # room: the pull goes on
    waiter.join(30)
    got = out["rows"][:, 0]
    assert got[1:].tolist() == [60, 61, 62]
    assert got[0] == 0.0  # x has no row any more: it starts anew from its initial vector (zeros)
    t.close()


def test_export_lists_only_rows_that_exist(store: embkv.Store) -> None:
    t = TrainingTable(store, "t", 4, SGD(), init_std=1.0)
    t.put(np.arange(5), np.full((5, 4), 5.0))
    t.checkpoint()  # the rows are in the files: the key scan lists them
    real = t.stored.keys

    def keys_then_delete() -> np.ndarray:
        listed = real()
        t.delete([2])  # the same thread: the table's lock is re-entrant, as it is for the trainer
        return listed

    t.stored.keys = keys_then_delete  # type: ignore[method-assign]
    keys, vectors = t.export()
    t.stored.keys = real  # type: ignore[method-assign]
    assert keys.tolist() == [0, 1, 3, 4] and (vectors == 5).all()
    t.close()


def test_bad_settings_are_refused_before_any_file_is_made(store: embkv.Store) -> None:
    for kwargs in ({"cache_bytes": "x"}, {"cache_bytes": 1}, {"cache_bytes": True}, {"staleness": -1}):
        with pytest.raises(embkv.SchemaError):
            TrainingTable(store, "u", 4, SGD(), **kwargs)  # type: ignore[arg-type]
    assert not [f for f in os.listdir(store.path) if f.startswith("u.")]
    t = TrainingTable(store, "u", 8, SGD())  # and nothing holds the name: another dim opens
    with pytest.raises(ValueError, match="max_age"):
        t.get_fresh([1], min_version=0, max_age=-1)
    t.close()


KILLED_PUBLISH = """
import os, sys
import numpy as np
import embkv
from embkv.train import SGD, TrainingTable
t = TrainingTable(embkv.open(sys.argv[1]), "t", 4, SGD(), init_std=0.0)
t.put(np.arange(1000), np.ones((1000, 4)))
serve = embkv.open(sys.argv[2])
serve.load_table = lambda *a, **k: os._exit(9)  # dies with the weights written, before the load
t.publish(serve, "w")
"""


def test_a_publish_killed_midway_leaves_no_file_after_the_next_open(disk_store_path: str, tmp_path) -> None:
    serve = tmp_path / "serve"
    rc = subprocess.call([sys.executable, "-c", KILLED_PUBLISH, disk_store_path, str(serve)])
    assert rc == 9
    assert any(".train-publish." in f for f in os.listdir(disk_store_path))
    with embkv.open(disk_store_path) as store:
        TrainingTable(store, "t", 4, SGD()).close()
        assert not any(".train-publish." in f for f in os.listdir(disk_store_path))
