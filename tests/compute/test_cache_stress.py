"""Compute on miss under load: several service processes and several worker processes at once.

Each service process looks up random batches from a universe of keys (most of them new at
first), checks every vector it gets against its status, and closes its cache; two worker
processes compute. At the end every key is a fresh hit with the right vector, nothing is
left queued, and the metrics every process pushed add up.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np

import embkv
from embkv import HIT, OOV, STALE, EmbeddingCache, SQLiteQueue
from embkv.compute.worker import run_in_process
from helpers import results_of

DIM = 8
UNIVERSE = 3000


def stress_embed(keys: list[Any]) -> np.ndarray:
    """Row of key k: k, k+1, ... (importable by the worker processes)."""
    return np.asarray(keys, dtype=np.float64)[:, None] + np.arange(DIM)


def service(store_path: str, seed: int, calls: int, out: Any) -> None:
    store = embkv.open(store_path)
    cache = EmbeddingCache(store, "t", SQLiteQueue.beside(store, "t"), oov=np.full(DIM, -1.0))
    rng = np.random.default_rng(seed)
    bad = 0
    for _ in range(calls):
        keys = rng.integers(0, UNIVERSE, int(rng.integers(1, 64)))
        vecs, status = cache.lookup(keys)
        want = stress_embed(keys.tolist())
        hit = status == HIT
        bad += int((vecs[hit] != want[hit]).any(axis=1).sum())  # a hit must be the computed vector
        bad += int((vecs[status == OOV] != -1).any(axis=1).sum())  # a miss must be the OOV vector
        bad += int((status == STALE).sum())  # nothing is ever stale here
    m = cache.metrics()
    cache.close()  # pushes this process's counters
    store.close()
    out.put((bad, m.lookups, m.keys, m.hits))


def test_many_services_and_workers(store: embkv.Store, store_path: str) -> None:
    store.create_table("t", dim=DIM, tags=True)
    SQLiteQueue.beside(store, "t").close()
    # the workers import stress_embed by module name: spawned processes get pytest's sys.path
    workers = [run_in_process(store_path, "t", "test_cache_stress:stress_embed", batch=32, idle_sleep=0.005,
                              lease_seconds=5.0) for _ in range(2)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    services = [ctx.Process(target=service, args=(store_path, seed, 3000, out)) for seed in range(3)]
    try:
        results = results_of(services, out, timeout=120)
        # the keys no service asked for are queued now; wait until the workers have every key
        cache = EmbeddingCache(store, "t", SQLiteQueue.beside(store, "t"))
        universe = np.arange(UNIVERSE)
        vecs, status = cache.lookup(universe, wait=60)
    finally:
        for w in workers:
            w.stop(10)
        for p in services:
            if p.is_alive():
                p.kill()
                p.join()
    assert sum(r[0] for r in results) == 0, "a service saw a wrong vector or status"
    assert (status == HIT).all()
    np.testing.assert_array_equal(vecs, stress_embed(universe.tolist()))
    m = cache.metrics()
    assert m.queue_depth == 0 and m.outbox == 0
    shared = m.shared
    assert shared is not None
    # the three services' counters all reached the queue (this cache has not pushed yet)
    assert shared.lookups == sum(r[1] for r in results) and shared.keys == sum(r[2] for r in results)
    assert shared.hits == sum(r[3] for r in results)
    assert shared.computed >= UNIVERSE and shared.failed == 0  # at least once each
    assert shared.fill is not None and shared.fill.count == shared.computed
    cache.close()
