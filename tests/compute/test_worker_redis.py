"""A worker process on the Redis Streams queue, SIGKILLed in the middle of a batch, loses no key.

The SQLite twin is ``test_cache.py::test_worker_killed_mid_batch_loses_no_key``. On Redis the
killed worker's batch stays in the consumer group's pending-entries list (XPENDING), leased to a
consumer that will never ack it; the next worker's ``claim`` takes it over (XAUTOCLAIM) once it
has been idle for ``lease_seconds``.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

import embkv
from embkv import RedisStreamQueue, Worker
from embkv.compute.worker import run_in_process
from embkv.testing import poll

DIM = 4
N = 200
BATCH = 16
DONE_BEFORE_KILL = 3  # batches the doomed worker completes (and acks) before it hangs
LEASE = 1.0

_calls = [0]  # batches computed by this process (each worker process has its own)


# ---------------------------------------------------------------- compute functions (importable by workers)

def embed(keys: list[Any]) -> np.ndarray:
    """Deterministic from the key alone: row i is ``keys[i] * ones``."""
    return np.array(keys, dtype=np.float64)[:, None] * np.ones(DIM)


def embed_then_hang(marker: str, keys: list[Any]) -> np.ndarray:
    """Compute the first DONE_BEFORE_KILL batches, then say which keys we hold and never return."""
    _calls[0] += 1
    if _calls[0] <= DONE_BEFORE_KILL:
        return embed(keys)
    with open(marker + ".part", "w") as f:  # renamed whole: the test never reads half a list
        f.write(",".join(str(k) for k in keys))
    os.replace(marker + ".part", marker)
    time.sleep(600)
    raise AssertionError("should have been killed")


# ---------------------------------------------------------------- the test

@pytest.fixture
def table(store: embkv.Store) -> embkv.Table:
    return store.create_table("t", dim=DIM, tags=True)


def pending_of(r: Any, consumer: str) -> int:
    """Messages the consumer group has handed to ``consumer`` and not yet seen acked."""
    summary = r.xpending("embkv:t:stream", "workers")
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"] in (consumer, consumer.encode()))


def test_redis_worker_killed_mid_batch_loses_no_key(store: embkv.Store, store_path: str, table: embkv.Table,
                                                    redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    queue = RedisStreamQueue(redis_url, "t", consumer="survivor")
    survivor = Worker(store, "t", embed, queue, batch=64, lease_seconds=LEASE, idle_sleep=0.01)
    assert queue.enqueue(range(N)) == N
    marker = os.path.join(store_path, "held")
    wp = run_in_process(store_path, "t", functools.partial(embed_then_hang, marker), redis_url,
                        queue_kwargs={"consumer": "doomed"}, batch=BATCH, lease_seconds=LEASE, idle_sleep=0.01)
    try:
        poll(lambda: os.path.exists(marker), 30, "the worker to be inside a batch")
        with open(marker) as f:
            held = [int(k) for k in f.read().split(",")]
        assert wp.pid is not None
        os.kill(wp.pid, signal.SIGKILL)
        wp.process.join(10)
        assert wp.process.exitcode == -signal.SIGKILL
    finally:
        if wp.is_alive():
            wp.process.kill()
            wp.process.join(10)

    # the state the kill left: earlier batches written and acked, the held one leased to a dead
    # consumer and written nowhere, the rest never delivered
    done = DONE_BEFORE_KILL * BATCH
    assert len(held) == BATCH
    assert pending_of(r, "doomed") == BATCH
    assert len(table) == done
    assert not table.contains(np.array(held, dtype=np.int64)).any()
    assert queue.depth() == N - done

    # the survivor computes the never-delivered keys at once; the held ones stay leased to the
    # dead consumer until they have been idle for the lease (XAUTOCLAIM's min-idle), which takes
    # far longer than this pass
    survivor.run(until_idle=True)
    assert len(table) == N - BATCH
    assert not table.contains(np.array(held, dtype=np.int64)).any()
    assert pending_of(r, "doomed") == BATCH and queue.depth() == BATCH

    # run(until_idle) returns as soon as a claim comes back empty: keep at it until the lease ends
    deadline = time.monotonic() + 30
    while queue.depth() > 0:
        assert time.monotonic() < deadline, f"{queue.depth()} keys still queued"
        survivor.run(until_idle=True)
        time.sleep(0.02)

    keys = np.arange(N, dtype=np.int64)
    vectors, found = table.get(keys)
    assert found.all(), f"lost keys: {keys[~found].tolist()}"
    np.testing.assert_array_equal(vectors, embed(list(range(N))))
    m = survivor.metrics()
    assert m.computed == N - done and m.failed == 0  # each key once: the held ones were never written
    assert queue.depth() == 0
    assert pending_of(r, "doomed") == 0 and pending_of(r, "survivor") == 0
    assert r.xlen("embkv:t:stream") == 0
    queue.close()
    r.close()
