"""Torn reads (issue item 2): 4 reader processes verify every vector they read while a writer
rewrites rows in place as fast as it can.

test_concurrency.py has readers next to a mixed workload (inserts, deletes, loads) paced by
version counts; this file is the targeted check: a small table (so freed rows are reused for
other keys within microseconds), every row rewritten over and over, readers on both kernels
(2 on the C kernel, 2 on the numpy fallback). Each vector is self-checking (helpers.encode):
element 0 is its key, element 1 its version, every other element a function of both, so a torn
row (half old, half new), a row of another key, or a stale row read through a reused slot all
fail verification. Bounded run: about 2.5 s per key type. Figures print with ``-s``.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

import embkv
from helpers import encode
from reliability import rewrite_as_fast_as_possible, stop_processes, torn_reader

FORK = mp.get_context("fork")
READERS = 4
SECONDS = 2.5
KEY_SPACE = 256
DIM = 64  # 256-byte vectors: a copy long enough for a writer to land in the middle of it


@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_readers_never_see_a_torn_or_misplaced_row(store_path, key_type):
    store = embkv.open(store_path)
    table = store.create_table("t", DIM, key_type=key_type, capacity=KEY_SPACE + 64)
    idx = np.arange(KEY_SPACE)
    keys = idx if key_type == "int64" else [f"k{i}" for i in idx]
    table.put(keys, encode(idx, 0, DIM))
    ready = [FORK.Event() for _ in range(READERS)]
    go, stop, q = FORK.Event(), FORK.Event(), FORK.Queue()
    readers = [FORK.Process(target=torn_reader, args=(store_path, "t", key_type, KEY_SPACE, 1000 + i, i >= 2,
                                                       ready[i], go, stop, q))
               for i in range(READERS)]
    for p in readers:
        p.start()
    try:
        deadline = time.monotonic() + 30
        while not all(e.is_set() for e in ready):  # a reader that failed to start says why on q
            assert q.empty(), q.get()
            assert time.monotonic() < deadline, "a reader did not start"
            time.sleep(0.01)
        go.set()
        t0 = time.perf_counter()
        rows = rewrite_as_fast_as_possible(table, key_type, KEY_SPACE, DIM, SECONDS, seed=7)
        elapsed = time.perf_counter() - t0
        stop.set()
        out = []
        for _ in range(READERS):
            status, value = q.get(timeout=30)
            assert status == "ok", value
            out.append(value)
    finally:
        stop_processes(readers, q, stop, go)
    info = table.info()
    store.close()
    vectors = sum(r["vectors"] for r in out)
    bad = sum(r["torn"] + r["backwards"] + (0 if r["numpy"] else r["missing"]) for r in out)
    numpy_misses = sum(r["missing"] for r in out if r["numpy"])
    print(f"\n[torn reads] {key_type} keys: writer rewrote {rows:,} rows in {elapsed:.1f} s "
          f"({rows / elapsed:,.0f}/s) on a {KEY_SPACE}-key table; {READERS} readers "
          f"({sum(not r['numpy'] for r in out)} C kernel, {sum(r['numpy'] for r in out)} numpy) did "
          f"{sum(r['reads'] for r in out):,} reads verifying {vectors:,} vectors; bad reads {bad} "
          f"(known numpy-kernel false misses: {numpy_misses})")
    for r in out:
        assert r["torn"] == 0, f"torn or misplaced vectors: {r}"
        assert r["backwards"] == 0, f"a key's version went backwards: {r}"
        assert r["reads"] >= 50, r
        if not r["numpy"]:
            assert r["missing"] == 0, f"a key that is always present was reported missing: {r}"
    # the numpy kernel's false misses are a known bug (test_numpy_kernel_lookup_is_not_fooled_by_a_reused_row);
    # they are counted above, never torn or wrong data
    assert rows >= 20_000, "the writer hardly wrote"
    assert info["capacity"] == KEY_SPACE + 64, "rewrites in place must not grow the table"


def test_numpy_kernel_lookup_is_not_fooled_by_a_reused_row(store, monkeypatch):
    from embkv.file import kernels

    t = store.create_table("t", 16, capacity=16)
    t.put([1], encode([1], 1, 16))  # key 1 in row 0
    t.put([2], encode([2], 1, 16))  # key 2 in row 1
    with monkeypatch.context() as m:
        m.setattr(kernels, "_C_KERNELS", None)
        reader = embkv.open(store.path, readonly=True)["t"]
    assert type(reader._view).__name__ == "NumpyView"
    real = kernels._exact_subset
    calls = []

    def racing_writer(exact, subset, idx, rows):  # runs between the reader's slot read and its key check
        calls.append(1)
        if len(calls) > 1:
            return real(exact, subset, idx, rows)
        t.put([1], encode([1], 2, 16))  # key 1 moves to a new row; row 0 goes on the free stack ...
        t.put([2], encode([2], 2, 16))  # ... and key 2 takes it
        seen = real(exact, subset, idx, rows)  # the reader finds key 2 in key 1's row
        t.put([2], encode([2], 3, 16))  # key 2 moves on, freeing row 0 ...
        t.put([1], encode([1], 3, 16))  # ... and key 1 comes back to it
        return seen

    monkeypatch.setattr(kernels, "_exact_subset", racing_writer)
    _, found = reader.get([1])
    assert found[0], "key 1 was present all along but the lookup reported it missing"
