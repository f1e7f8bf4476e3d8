"""Work queues of compute on miss: SQLite (embedded, shared by processes) and Redis Streams (real redis-server)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import embkv
from embkv.queue import QueueUnavailableError, RedisStreamQueue, SQLiteQueue, WorkItem, WorkQueue


def poll(fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server on a free local port, without persistence; stopped after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH: the Redis Streams queue tests need a real server")
    pytest.importorskip("redis", reason="redis-py is not installed (pip install embkv[redis])")
    import redis

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                return False

        poll(up, 10, "redis-server to answer")
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def sqlite_queue(store_path: str) -> Iterator[SQLiteQueue]:
    os.makedirs(store_path)
    q = SQLiteQueue(os.path.join(store_path, "t.queue.sqlite"), "int64", backoff=0.05, max_attempts=3)
    yield q
    q.close()


@pytest.fixture(params=["sqlite", "redis"])
def queue(request: pytest.FixtureRequest, store_path: str) -> Iterator[WorkQueue]:
    q: WorkQueue
    if request.param == "sqlite":
        os.makedirs(store_path)
        q = SQLiteQueue(os.path.join(store_path, "t.queue.sqlite"), "int64", backoff=0.05, max_attempts=3)
    else:
        url = request.getfixturevalue("redis_url")
        q = RedisStreamQueue(url, "t", "int64", backoff=0.05, max_attempts=3)
    yield q
    q.close()


def keys_of(items: list[WorkItem]) -> list[Any]:
    return sorted(it.key for it in items)


def test_enqueue_once(queue: WorkQueue) -> None:
    assert queue.enqueue([1, 2, 3]) == 3
    assert queue.enqueue([2, 3, 4, 4]) == 1  # pending keys are not queued again
    assert queue.depth() == 4
    items = queue.claim(2, lease_seconds=30)
    assert len(items) == 2
    assert queue.enqueue([it.key for it in items]) == 0  # nor are keys being computed
    assert queue.depth() == 4
    queue.ack(items)
    assert queue.depth() == 2
    assert queue.enqueue([it.key for it in items]) == 2  # done keys may be queued again
    rest = queue.claim(10)
    assert keys_of(rest) == sorted({1, 2, 3, 4})
    assert all(it.enqueued_at <= time.time() and it.attempts == 0 for it in rest)


def test_expired_lease_is_claimed_again(queue: WorkQueue) -> None:
    queue.enqueue(np.arange(5))
    first = queue.claim(5, lease_seconds=0.1)
    assert keys_of(first) == [0, 1, 2, 3, 4]
    assert queue.claim(5, lease_seconds=30) == []  # leased
    # (Redis: a message is taken over once idle longer than the *claimer's* lease_seconds)
    again = poll(lambda: queue.claim(5, lease_seconds=0.1), 10, "the lease to run out")
    assert keys_of(again) == [0, 1, 2, 3, 4]
    queue.ack(again)
    assert queue.depth() == 0


def test_fail_retries_with_backoff_then_gives_up(queue: WorkQueue) -> None:
    queue.enqueue([10, 11])
    items = {it.key: it for it in queue.claim(2)}
    t0 = time.monotonic()
    assert queue.fail(items[10], "ValueError: bad key 10") is True
    queue.ack([items[11]])
    assert queue.claim(2) == []  # waiting for its backoff
    assert queue.failures()[10] == embkv.FailureInfo(1, "ValueError: bad key 10", False)
    assert queue.enqueue([10]) == 0  # still pending
    retry = poll(lambda: queue.claim(2), 10, "the retry")
    assert time.monotonic() - t0 >= 0.05 - 0.01
    assert [(it.key, it.attempts) for it in retry] == [(10, 1)]
    assert queue.fail(retry[0], "ValueError: again") is True
    retry = poll(lambda: queue.claim(2), 10, "the second retry")
    assert retry[0].attempts == 2
    assert queue.fail(retry[0], "ValueError: third") is False  # max_attempts=3
    info = queue.failures()[10]
    assert info.gave_up and info.attempts == 3 and "third" in info.error
    assert queue.depth() == 0
    assert queue.enqueue([10]) == 0  # given up: not queued again by lookups
    assert queue.retry_failed() == 1
    assert [it.key for it in poll(lambda: queue.claim(5), 10, "the revived key")] == [10]


def test_retry_delay_is_exponential_and_capped(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.max_backoff = 0.3
    assert [sqlite_queue.retry_delay(a) for a in (1, 2, 3, 4, 5)] == [0.05, 0.1, 0.2, 0.3, 0.3]


def test_key_types_are_checked(sqlite_queue: SQLiteQueue, store_path: str) -> None:
    with pytest.raises(embkv.KeyTypeError):
        sqlite_queue.enqueue(["a"])
    with pytest.raises(embkv.KeyTypeError):
        sqlite_queue.enqueue([1.5])
    sq = SQLiteQueue(os.path.join(store_path, "s.queue.sqlite"), "str")
    with pytest.raises(embkv.KeyTypeError):
        sq.enqueue([1])
    assert sq.enqueue(["a", "b", "a"]) == 2
    assert keys_of(sq.claim(5)) == ["a", "b"]
    sq.close()


def test_sqlite_queue_survives_reopen(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.enqueue([1, 2])
    sqlite_queue.close()
    again = SQLiteQueue(sqlite_queue.path, "int64")
    assert again.depth() == 2
    assert keys_of(again.claim(5)) == [1, 2]
    again.close()


def _share(path: str, barrier: Any, out: Any) -> None:
    q = SQLiteQueue(path, "int64")
    barrier.wait()
    added = q.enqueue(range(300))  # both processes queue the same keys at the same time
    barrier.wait()
    claimed: list[int] = []
    while True:
        items = q.claim(7, lease_seconds=60)
        if not items:
            break
        claimed += [int(it.key) for it in items]
        q.ack(items)
    out.put((added, claimed))
    q.close()


def test_sqlite_queue_shared_by_two_processes(sqlite_queue: SQLiteQueue) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_share, args=(sqlite_queue.path, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(added for added, _ in results) == 300  # enqueue-once across processes
    claimed = results[0][1] + results[1][1]
    assert sorted(claimed) == list(range(300))  # every key once, none twice
    assert sqlite_queue.depth() == 0


def test_redis_unreachable_raises_queue_unavailable() -> None:
    pytest.importorskip("redis", reason="redis-py is not installed")
    q = RedisStreamQueue(f"redis://127.0.0.1:{free_port()}/0", "t", socket_timeout=0.5)
    with pytest.raises(QueueUnavailableError):
        q.enqueue([1])
    with pytest.raises(ConnectionError):  # also a built-in ConnectionError
        q.depth()
    q.close()


def test_redis_two_consumers_share_the_stream(redis_url: str) -> None:
    a = RedisStreamQueue(redis_url, "t", consumer="a")
    b = RedisStreamQueue(redis_url, "t", consumer="b")
    assert a.enqueue(range(20)) == 20
    assert b.enqueue(range(20)) == 0
    got_a, got_b = a.claim(12), b.claim(12)
    assert len(got_a) == 12 and len(got_b) == 8
    assert sorted(keys_of(got_a) + keys_of(got_b)) == list(range(20))
    a.ack(got_a)
    b.ack(got_b)
    assert a.depth() == 0
    a.close()
    b.close()
