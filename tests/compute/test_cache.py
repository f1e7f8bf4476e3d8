"""Compute on miss: EmbeddingCache lookups, workers (threads, processes, the CLI), invalidation, bad input."""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import embkv
from embkv import HIT, OOV, STALE, EmbeddingCache, SQLiteQueue, Worker
from embkv.compute.worker import run_in_process, run_in_thread
from embkv.file.format import make_tag
from embkv.testing import poll
from helpers import fork_and_run, free_port

DIM = 4
HERE = os.path.dirname(os.path.abspath(__file__))
# a worker started as `embkv worker --compute test_cache:...` imports this module and helpers.py
TESTS = HERE + os.pathsep + os.path.dirname(HERE)


# ---------------------------------------------------------------- compute functions (importable by workers)

def embed(keys: list[Any]) -> np.ndarray:
    """Row i is [k, k+1, k+2, k+3] for an int key (len(key) for a str key)."""
    base = np.array([k if isinstance(k, int) else len(k) for k in keys], dtype=np.float64)
    return base[:, None] + np.arange(DIM)


def embed_fails_on_multiples_of_3(keys: list[Any]) -> np.ndarray:
    bad = [k for k in keys if k % 3 == 0]
    if bad:
        raise ValueError(f"cannot embed {bad}")
    return embed(keys)


def embed_nan_on_odd(keys: list[Any]) -> np.ndarray:
    out = embed(keys)
    out[[k % 2 == 1 for k in keys]] = np.nan
    return out


def embed_wrong_shape(keys: list[Any]) -> np.ndarray:
    return np.zeros((len(keys), DIM + 1))


def embed_strings(keys: list[Any]) -> list[list[str]]:
    return [["x"] * DIM for _ in keys]


def embed_huge(keys: list[Any]) -> np.ndarray:
    return np.full((len(keys), DIM), 1e6)  # inf in a float16 table


def embed_then_block(keys: list[Any]) -> np.ndarray:
    """Say which keys we hold, then never return (the test kills us mid-batch)."""
    with open(os.environ["EMBKV_TEST_MARKER"], "w") as f:
        f.write(",".join(str(k) for k in keys))
    time.sleep(600)
    return embed(keys)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def table(store: embkv.Store) -> embkv.Table:
    return store.create_table("t", dim=DIM, tags=True)


@pytest.fixture
def queue(store: embkv.Store, table: embkv.Table) -> Iterator[SQLiteQueue]:
    q = SQLiteQueue.beside(store, "t", backoff=0.05, max_attempts=3)
    yield q
    q.close()


def cache_of(store: embkv.Store, queue: SQLiteQueue, **kwargs: Any) -> EmbeddingCache:
    return EmbeddingCache(store, "t", queue, **kwargs)


def lookup_sent(cache: EmbeddingCache, keys: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """A lookup, then wait until its misses reached the queue (the sender thread queues them)."""
    got = cache.lookup(keys, **kwargs)
    assert cache.flush(10), "the sender thread did not hand the misses to the queue"
    return got


def drain(store: embkv.Store, queue: SQLiteQueue, compute: Any = embed, **kwargs: Any) -> Worker:
    w = Worker(store, "t", compute, queue, **kwargs)
    w.run(until_idle=True)
    return w


# ---------------------------------------------------------------- lookups

def test_miss_is_answered_at_once_then_filled(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    vecs, status = lookup_sent(cache, [1, 2])
    assert status.tolist() == [OOV, OOV] and status.dtype == np.int8
    assert not vecs.any()
    lookup_sent(cache, [2, 1, 2])  # already queued: not queued again
    assert queue.depth() == 2
    w = drain(store, queue)
    vecs, status = lookup_sent(cache, [1, 2, 3])
    assert status.tolist() == [HIT, HIT, OOV]
    np.testing.assert_array_equal(vecs[:2], embed([1, 2]))
    m = cache.metrics()
    assert (m.lookups, m.keys, m.hits, m.oov_served, m.stale_served, m.enqueued) == (3, 8, 2, 6, 0, 3)
    assert m.keys == m.hits + m.oov_served + m.stale_served
    assert m.hit_rate == pytest.approx(2 / 8)
    assert m.queue_depth == 1 and m.queue_available and m.last_queue_error is None and m.outbox == 0
    wm = w.metrics()
    assert (wm.computed, wm.failed, wm.batches) == (2, 0, 1)
    assert 0 < wm.fill_seconds_max < 60 and wm.compute_seconds_total >= 0
    # the vectors carry the model version and fill time in their row tags
    _, found, tags = store["t"].get_tagged([1, 2])
    assert found.all() and [t >> 32 for t in tags.tolist()] == [1, 1]
    assert abs((int(tags[0]) & 0xFFFFFFFF) - time.time()) < 60
    # workers report to the queue's shared counters; the cache pushes its own on close
    shared = cache.metrics().shared
    assert shared is not None and shared.computed == 2 and shared.fill is not None
    assert shared.fill.count == 2 and 0 < shared.fill.mean < 60 and shared.compute is not None
    cache.close()
    shared = EmbeddingCache(store, "t", SQLiteQueue.beside(store, "t")).metrics().shared
    assert shared is not None and (shared.lookups, shared.keys, shared.hits, shared.enqueued) == (3, 8, 2, 3)


def test_str_keys(store: embkv.Store) -> None:
    store.create_table("s", dim=DIM, key_type="str", tags=True)
    q = SQLiteQueue.beside(store, "s")
    cache = EmbeddingCache(store, "s", q)
    assert lookup_sent(cache, ["ab", "xyz"])[1].tolist() == [OOV, OOV]
    Worker(store, "s", embed, q).run(until_idle=True)
    vecs, status = cache.lookup(["ab", "xyz"])
    assert status.tolist() == [HIT, HIT]
    np.testing.assert_array_equal(vecs, embed(["ab", "xyz"]))
    with pytest.raises(embkv.KeyTypeError):
        cache.lookup([1, 2])
    q.close()


def test_wrong_key_type_raises(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    with pytest.raises(embkv.KeyTypeError):
        cache.lookup(["a"])
    with pytest.raises(embkv.KeyTypeError):
        cache.lookup([1.5])
    assert queue.depth() == 0


def test_oov_policies(store: embkv.Store, table: embkv.Table, queue: SQLiteQueue) -> None:
    table.put([1, 2], np.array([[1, 2, 3, 4], [3, 4, 5, 6]], dtype=np.float32))
    vecs, _ = cache_of(store, queue).lookup([9])
    assert vecs.tolist() == [[0, 0, 0, 0]]
    vecs, _ = cache_of(store, queue, oov=[1, -1, 1, -1]).lookup([9])
    assert vecs.tolist() == [[1, -1, 1, -1]]
    cache = cache_of(store, queue, oov="mean")
    vecs, status = cache.lookup([9, 1])
    assert status.tolist() == [OOV, HIT]
    assert vecs.tolist() == [[2, 3, 4, 5], [1, 2, 3, 4]]
    for bad in ("median", [1, 2], [np.nan] * DIM, ["a"] * DIM):
        with pytest.raises(embkv.SchemaError):
            cache_of(store, queue, oov=bad)


@pytest.mark.parametrize("kwargs", [{"model_version": 0}, {"model_version": 2**31}, {"model_version": "3"},
                                    {"model_version": True}, {"stale_policy": "never"}, {"ttl": -5}])
def test_bad_cache_settings_are_schema_errors(store: embkv.Store, queue: SQLiteQueue, kwargs: Any) -> None:
    with pytest.raises(embkv.SchemaError):
        cache_of(store, queue, **kwargs)
    cache = cache_of(store, queue)
    with pytest.raises(embkv.SchemaError):
        cache.bump_model_version(0)
    assert cache.model_version == 1


class RefusingQueue(SQLiteQueue):
    """A real SQLite queue that refuses one key, as a queue that cannot encode a key would."""

    refused = 13

    def enqueue(self, keys: Any) -> int:
        keys = list(keys)
        if self.refused in keys:
            raise ValueError(f"cannot encode {self.refused}")
        return super().enqueue(keys)


class WriteFailingQueue(SQLiteQueue):
    """Reads work, every enqueue fails: a queue file this process may read but not write."""

    def enqueue(self, keys: Any) -> int:
        raise embkv.QueueUnavailableError("attempt to write a readonly database")


def test_a_refused_key_does_not_fail_the_misses_sent_with_it(store: embkv.Store, table: embkv.Table) -> None:
    q = RefusingQueue(os.path.join(store.path, "t.queue.sqlite"))
    cache = EmbeddingCache(store, "t", q)
    for k in range(40):  # one sender batch holds the refused key and many others
        cache.lookup([k])
    assert cache.flush(10)
    assert q.depth() == 39
    m = cache.metrics()
    assert m.queue_available and m.queue_errors == 0 and m.refused == 1 and m.enqueued == 39
    assert m.last_refused is not None and "ValueError for key 13: cannot encode 13" in m.last_refused
    cache.close()


def test_metrics_do_not_hide_a_failing_send(store: embkv.Store, table: embkv.Table) -> None:
    cache = EmbeddingCache(store, "t", WriteFailingQueue(os.path.join(store.path, "t.queue.sqlite")))
    cache.lookup([1])
    assert cache.flush(10)
    for _ in range(2):  # reading the depth works; the queue is still not taking keys
        m = cache.metrics()
        assert m.queue_depth == 0 and not m.queue_available and "readonly" in (m.last_queue_error or "")
    cache.close()


def test_close_while_other_threads_look_up(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(base: int) -> None:
        k = base
        while not stop.is_set():
            try:
                cache.lookup([k, k + 1])  # every call misses new keys
            except BaseException as exc:  # reported below
                errors.append(exc)
                return
            k += 2

    threads = [threading.Thread(target=hammer, args=(i * 10**9,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        sender = [t for t in threading.enumerate() if t.name == "embkv-cache-t"]
        t0 = time.monotonic()
        cache.close(timeout=2)
        took = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert took < 3, f"close() took {took:.1f} s"
    assert sender and not sender[0].is_alive(), "the sender outlived close()"
    local = cache.metrics()  # the queue is closed: local counters only
    again = SQLiteQueue.beside(store, "t")
    shared = EmbeddingCache(store, "t", again).metrics().shared
    assert shared is not None
    # lookups after close() still answer (and count) but were pushed by nobody: the shared
    # total holds everything counted up to close()
    assert 0 < shared.lookups <= local.lookups and shared.enqueued == local.enqueued == again.depth()


def test_str_keys_from_a_generator(store: embkv.Store) -> None:
    store.create_table("s", dim=DIM, key_type="str", tags=True)
    q = SQLiteQueue.beside(store, "s")
    cache = EmbeddingCache(store, "s", q)
    assert cache.lookup(k for k in ("a", "bb", "ccc"))[1].tolist() == [OOV] * 3
    assert cache.flush(10) and q.depth() == 3
    Worker(store, "s", embed, q).run(until_idle=True)
    _, status = cache.lookup((k for k in ("a", "bb", "dddd")), wait=0.05)
    assert status.tolist() == [HIT, HIT, OOV]
    cache.close()


def test_oov_mean_ignores_rows_that_are_not_finite(store: embkv.Store, table: embkv.Table,
                                                   queue: SQLiteQueue) -> None:
    table.put([1, 2, 3], np.array([[1, 1, 1, 1], [3, 3, 3, 3], [np.nan, 0, np.inf, 0]]))
    assert cache_of(store, queue, oov="mean").oov_vector().tolist() == [2, 2, 2, 2]


def test_model_versions_only_go_up(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue, model_version=5)
    for bad in (4, 2.9, True, "6"):
        with pytest.raises(embkv.SchemaError):
            cache.bump_model_version(bad)
    assert cache.bump_model_version(5) == 5 and cache.bump_model_version() == 6


def test_oov_mean_samples_a_large_table(store: embkv.Store, queue: SQLiteQueue) -> None:
    keys = np.arange(250_000)
    store.load_table("big", keys, np.stack([keys % 2, np.ones(len(keys))], axis=1).astype(np.float32), tags=True)
    q = SQLiteQueue.beside(store, "big")
    cache = EmbeddingCache(store, "big", q, oov="mean")
    mean = cache.oov_vector()
    assert abs(mean[0] - 0.5) < 0.01 and mean[1] == 1.0  # 100,000 sampled rows: within 1% of 0.5
    cache.close()


def test_lookup_never_waits_for_a_locked_queue(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    other = sqlite3.connect(queue.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the queue's write lock
    try:
        t0 = time.monotonic()
        for k in range(200):
            assert cache.lookup([k, k + 1000])[1].tolist() == [OOV, OOV]
        assert time.monotonic() - t0 < 1.0, "lookups waited for the queue"
    finally:
        other.execute("ROLLBACK")
        other.close()
    # the sender gave the keys back while the lock was held; later misses queue them
    poll(lambda: (cache.lookup(list(range(200)) + list(range(1000, 1200))), cache.flush(5),
                  queue.depth() == 400)[-1], 20, "every missed key to be queued once the lock is free")
    assert cache.metrics().queue_available


def test_forked_child_queues_its_own_misses(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, [1])

    def child() -> int:
        status = cache.lookup([2, 3])[1].tolist()
        assert status == [OOV, OOV]
        assert cache.flush(10)
        m = cache.metrics()
        assert (m.lookups, m.keys) == (1, 2), "the parent's counters were copied into the child"
        return queue.depth()

    status, text = fork_and_run(child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
    assert text == "3"
    assert cache.metrics().lookups == 1


def test_dropping_a_cache_ends_its_sender_thread(store: embkv.Store, queue: SQLiteQueue) -> None:
    before = {t.ident for t in threading.enumerate()}
    cache = cache_of(store, queue)
    lookup_sent(cache, [1])
    sender = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("embkv-cache")]
    assert len(sender) == 1
    del cache
    gc.collect()
    sender[0].join(5)
    assert not sender[0].is_alive()


def test_version_bump_retries_given_up_keys(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, [3, 4])
    w = Worker(store, "t", embed_fails_on_multiples_of_3, queue)
    poll(lambda: (w.run_once(), queue.failures().get(3) is not None and queue.failures()[3].gave_up)[-1],
         20, "key 3 to be given up")
    assert queue.depth() == 0
    cache.bump_model_version()
    assert queue.depth() == 1  # key 3 is queued again for the new model
    drain(store, queue, model_version=2)
    assert cache.lookup([3, 4])[1].tolist() == [HIT, STALE]


def test_wait_returns_fresh_values_from_a_running_worker(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    t = run_in_thread(Worker(store, "t", embed, queue, idle_sleep=0.01))
    try:
        vecs, status = cache.lookup([5, 6], wait=20)
        assert status.tolist() == [HIT, HIT]
        np.testing.assert_array_equal(vecs, embed([5, 6]))
    finally:
        t.stop()
    assert not t.is_alive()
    # without a worker, wait gives up at the deadline and serves OOV
    t0 = time.monotonic()
    assert cache.lookup([7], wait=0.05)[1].tolist() == [OOV]
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- invalidation

@pytest.mark.parametrize("policy", ["serve", "miss"])
def test_version_bump_makes_old_vectors_stale(store: embkv.Store, queue: SQLiteQueue, policy: str) -> None:
    cache = cache_of(store, queue, stale_policy=policy, model_version=1)
    lookup_sent(cache, [1, 2])
    drain(store, queue, model_version=1)
    assert cache.lookup([1, 2])[1].tolist() == [HIT, HIT]
    assert cache.bump_model_version() == 2
    vecs, status = lookup_sent(cache, [1, 2])
    if policy == "serve":
        assert status.tolist() == [STALE, STALE]
        np.testing.assert_array_equal(vecs, embed([1, 2]))  # the old vectors while recomputing
    else:
        assert status.tolist() == [OOV, OOV]
        assert not vecs.any()
    assert queue.depth() == 2
    drain(store, queue, lambda keys: embed(keys) * 10, model_version=2)
    vecs, status = cache.lookup([1, 2])
    assert status.tolist() == [HIT, HIT]
    np.testing.assert_array_equal(vecs, embed([1, 2]) * 10)
    m = cache.metrics()
    assert m.keys == m.hits + m.oov_served + m.stale_served
    assert m.stale_served == (2 if policy == "serve" else 0)


def test_ttl_expiry(store: embkv.Store, table: embkv.Table, queue: SQLiteQueue) -> None:
    now = time.time()
    # fill times written directly (no sleeping): key 1 filled 100 s ago, key 2 now, key 3 untagged
    table.put([1, 2, 3], embed([1, 2, 3]), tags=[make_tag(1, now - 100), make_tag(1, now), 0])
    cache = cache_of(store, queue, ttl=10)
    vecs, status = lookup_sent(cache, [1, 2, 3])
    assert status.tolist() == [STALE, HIT, HIT]
    np.testing.assert_array_equal(vecs, embed([1, 2, 3]))
    assert cache_of(store, queue, ttl=10, stale_policy="miss").lookup([1])[1].tolist() == [OOV]
    assert cache_of(store, queue).lookup([1])[1].tolist() == [HIT]  # no TTL
    assert queue.depth() == 1
    for bad in (0, 0.5, -1):
        with pytest.raises(embkv.SchemaError, match="ttl"):
            cache_of(store, queue, ttl=bad)


# ---------------------------------------------------------------- bad compute functions

def test_raising_keys_fail_and_retry_others_succeed(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, range(1, 10))
    w = Worker(store, "t", embed_fails_on_multiples_of_3, queue, batch=16)
    w.run(until_idle=True)
    status = cache.lookup(range(1, 10))[1]
    ok = [k for k in range(1, 10) if k % 3]
    assert [k for k, s in zip(range(1, 10), status, strict=True) if s == HIT] == ok
    failures = queue.failures()
    assert sorted(failures) == [3, 6, 9]
    assert "ValueError: cannot embed [3]" in failures[3].error and failures[3].attempts == 1
    assert not failures[3].gave_up
    # retried after the backoff until max_attempts=3, then given up
    def all_given_up() -> bool:
        w.run_once()
        return all(f.gave_up for f in queue.failures().values())
    poll(all_given_up, 20, "the failing keys to be given up")
    assert {k: f.attempts for k, f in queue.failures().items()} == {3: 3, 6: 3, 9: 3}
    m = w.metrics()
    assert m.computed == 6 and m.failed == 9 and m.gave_up == 3 and m.retried == 6
    assert queue.depth() == 0


@pytest.mark.parametrize(("compute", "error"), [
    (embed_wrong_shape, f"shape (2, {DIM + 1}) for 2 key(s), expected (2, {DIM})"),
    (embed_strings, "expected real numbers"),
])
def test_wrong_output_is_rejected(store: embkv.Store, queue: SQLiteQueue, compute: Any, error: str) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, [1, 2])
    w = drain(store, queue, compute)
    assert cache.lookup([1, 2])[1].tolist() == [OOV, OOV]
    assert len(store["t"]) == 0
    failures = queue.failures()
    assert sorted(failures) == [1, 2] and error in failures[1].error
    assert w.metrics().last_error is not None and error in w.metrics().last_error


def test_nan_rows_are_rejected_others_written(store: embkv.Store, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, [1, 2, 3, 4])
    drain(store, queue, embed_nan_on_odd)
    assert cache.lookup([1, 2, 3, 4])[1].tolist() == [OOV, HIT, OOV, HIT]
    failures = queue.failures()
    assert sorted(failures) == [1, 3] and "non-finite" in failures[1].error


def test_overflow_in_float16_is_rejected(store: embkv.Store) -> None:
    store.create_table("h", dim=DIM, dtype="float16", tags=True)
    q = SQLiteQueue.beside(store, "h")
    lookup_sent(EmbeddingCache(store, "h", q), [1])
    Worker(store, "h", embed_huge, q).run(until_idle=True)
    assert "non-finite" in q.failures()[1].error and len(store["h"]) == 0
    q.close()


# ---------------------------------------------------------------- processes

def test_worker_killed_mid_batch_loses_no_key(store: embkv.Store, store_path: str, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    lookup_sent(cache, range(8))
    marker = os.path.join(store_path, "marker")
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
               EMBKV_TEST_MARKER=marker)
    proc = subprocess.Popen([sys.executable, "-m", "embkv.cli", "worker", store_path, "t",
                             "--compute", "test_cache:embed_then_block", "--lease", "1", "--batch", "5"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        poll(lambda: os.path.exists(marker) and os.path.getsize(marker) > 0, 30, "the worker to start a batch")
        with open(marker) as f:
            held = [int(k) for k in f.read().split(",")]
        assert len(held) == 5
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert queue.depth() == 8 and len(store["t"]) == 0
    # another worker takes the killed one's keys once their lease runs out
    t = run_in_thread(Worker(store, "t", embed, queue, idle_sleep=0.01))
    try:
        vecs, status = cache.lookup(range(8), wait=30)
    finally:
        t.stop()
    assert status.tolist() == [HIT] * 8
    np.testing.assert_array_equal(vecs, embed(list(range(8))))
    assert queue.depth() == 0


def test_run_in_process(store: embkv.Store, store_path: str, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue)
    wp = run_in_process(store_path, "t", "test_cache:embed", idle_sleep=0.01, model_version=1)
    try:
        vecs, status = cache.lookup([11, 12], wait=30)
        assert status.tolist() == [HIT, HIT]
        np.testing.assert_array_equal(vecs, embed([11, 12]))
    finally:
        assert wp.stop(10) == 0


# ---------------------------------------------------------------- queue unreachable

def test_redis_down_lookups_still_answer(store: embkv.Store, table: embkv.Table) -> None:
    pytest.importorskip("redis", reason="redis-py is not installed")
    table.put([1], embed([1]))
    q = embkv.RedisStreamQueue(f"redis://127.0.0.1:{free_port()}/0", "t", socket_timeout=0.5)
    cache = EmbeddingCache(store, "t", q, oov=[7, 7, 7, 7])
    t0 = time.monotonic()
    vecs, status = cache.lookup([1, 2])  # no exception, and no waiting for the dead queue
    assert time.monotonic() - t0 < 0.2
    assert status.tolist() == [HIT, OOV]
    assert vecs.tolist() == [embed([1])[0].tolist(), [7, 7, 7, 7]]
    assert cache.flush(10)  # the sender tried, failed and gave the key back
    assert not cache.queue_available
    cache.lookup([3])
    m = cache.metrics()
    assert not m.queue_available and m.queue_errors >= 1 and m.queue_depth is None
    assert m.last_queue_error is not None and "QueueUnavailableError" in m.last_queue_error
    assert (m.keys, m.hits, m.oov_served) == (3, 1, 2)
    cache.close()


def test_redis_cache_end_to_end(store: embkv.Store, table: embkv.Table, redis_url: str) -> None:
    q = embkv.RedisStreamQueue(redis_url, "t", backoff=0.05)
    cache = EmbeddingCache(store, "t", q)
    assert lookup_sent(cache, [1, 2, 3])[1].tolist() == [OOV] * 3
    assert cache.metrics().queue_depth == 3
    t = run_in_thread(Worker(store, "t", embed, embkv.RedisStreamQueue(redis_url, "t"), idle_sleep=0.01))
    try:
        vecs, status = cache.lookup([1, 2, 3], wait=20)
    finally:
        t.stop()
    assert status.tolist() == [HIT] * 3
    np.testing.assert_array_equal(vecs, embed([1, 2, 3]))
    assert cache.metrics().queue_depth == 0
    cache.close()


def test_cli_worker_until_idle(store: embkv.Store, store_path: str, queue: SQLiteQueue) -> None:
    cache = cache_of(store, queue, model_version=3)
    lookup_sent(cache, [1, 2, 3])
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "embkv.cli", "worker", store_path, "t", "--compute",
                           "test_cache:embed", "--batch", "2", "--model-version", "3", "--until-idle"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "computed 3, failed 0" in done.stderr
    assert cache.lookup([1, 2, 3])[1].tolist() == [HIT] * 3
    bad = subprocess.run([sys.executable, "-m", "embkv.cli", "worker", store_path, "t", "--compute", "nonsense"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "compute must be 'module:function'" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "embkv.cli", "worker", store_path, "t", "--compute",
                              "no_such_module:embed"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot load compute 'no_such_module:embed'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_queue_shows_depth_failures_and_shared_metrics(store: embkv.Store, store_path: str,
                                                           queue: SQLiteQueue) -> None:
    import json

    cache = cache_of(store, queue)
    lookup_sent(cache, [1, 2, 3, 4])
    cache.close()  # pushes its counters
    Worker(store, "t", embed_fails_on_multiples_of_3, SQLiteQueue.beside(store, "t", max_attempts=1)).run(
        until_idle=True)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "embkv.cli", "queue", store_path, "t", *args],
                              capture_output=True, text=True, timeout=60)

    done = cli("--json", "--failures")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["depth"], report["gave_up"], report["computed"], report["failed"]) == (0, 1, 3, 1)
    assert (report["lookups"], report["keys"], report["oov_served"], report["enqueued"]) == (1, 4, 4, 4)
    assert report["fill_seconds"]["count"] == 3 and report["compute_seconds"]["count"] == 1
    assert "cannot embed [3]" in report["failures"]["3"]["error"]
    text = cli("--retry-failed")
    assert text.returncode == 0 and "retried: 1" in text.stdout and "depth: 1" in text.stdout
    assert cli("--queue", "bogus").returncode != 0
