"""Work queues of compute on miss: SQLite (embedded, shared by processes) and Redis Streams (real redis-server)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import embkv
from embkv import QueueUnavailableError, RedisStreamQueue, SQLiteQueue, WorkItem, WorkQueue
from embkv.compute.sqlite_queue import _CLAIM_EXPIRED_SQL, _CLAIM_READY_SQL, _DEPTH_SQL, _LEASE_SQL
from helpers import results_of


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


def another_handle(q: WorkQueue) -> WorkQueue:
    """A second queue object on the same file or stream (another process would open the same)."""
    if isinstance(q, SQLiteQueue):
        return SQLiteQueue(q.path, q.key_type)
    assert isinstance(q, RedisStreamQueue)
    return RedisStreamQueue(q.url, q.name, q.key_type)


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


@pytest.mark.parametrize("key_type", ["int64", "str"])
def test_keys_come_back_exactly_as_queued(store_path: str, key_type: str) -> None:
    os.makedirs(store_path)
    q = SQLiteQueue(os.path.join(store_path, "k.queue.sqlite"), key_type)
    if key_type == "int64":
        keys: list[Any] = [0, -1, 2**63 - 1, -(2**63), 12345678901234]
        more: list[Any] = [np.int64(7), 8]  # not all plain ints: the checked path
    else:
        keys = ["plain", 'with "quotes"', "back\\slash", "ключ", "🔑" * 3, "tab\tnewline\n", "\x00nul", ""]
        more = [b"raw \xff bytes", "text"]  # bytes keys take the bound-parameter path
    assert q.enqueue(keys + keys[:2]) == len(keys)
    assert q.enqueue(keys) == 0  # the same keys, however they were sent, are pending already
    assert q.enqueue(more) == 2
    got = [it.key for it in q.claim(100)]
    assert sorted(got, key=repr) == sorted(keys + [k if not isinstance(k, np.integer) else int(k) for k in more],
                                           key=repr)
    assert q.enqueue(got) == 0
    q.close()


def test_enqueue_that_fails_midway_says_how_many_went_in(sqlite_queue: SQLiteQueue,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import embkv.compute.sqlite_queue

    monkeypatch.setattr(embkv.compute.sqlite_queue, "_ENQUEUE_CHUNK", 3)  # commits every 3 keys
    db = sqlite3.connect(sqlite_queue.path)
    db.execute("CREATE TRIGGER refuse_13 BEFORE INSERT ON items WHEN NEW.key = 13 "
               "BEGIN SELECT RAISE(ABORT, 'key 13 refused'); END")
    db.commit()
    db.close()
    with pytest.raises(QueueUnavailableError, match="key 13 refused") as info:
        sqlite_queue.enqueue([10, 11, 12, 13, 14])
    assert info.value.added == 3 and sqlite_queue.depth() == 3  # the first chunk is queued


def test_int64_queue_refuses_keys_outside_int64(sqlite_queue: SQLiteQueue) -> None:
    for bad in ([2**63], [-(2**63) - 1], [1, 2**64]):
        with pytest.raises(embkv.KeyTypeError, match="int64"):
            sqlite_queue.enqueue(bad)
    assert sqlite_queue.depth() == 0


def test_redis_keeps_bytes_keys_that_are_not_utf8(redis_url: str) -> None:
    q = RedisStreamQueue(redis_url, "b", "str")
    assert q.enqueue([b"\xff\xfe raw", "text", b"utf8 bytes"]) == 3
    assert q.enqueue([b"\xff\xfe raw"]) == 0
    got = q.claim(10)
    assert sorted((it.key for it in got), key=repr) == sorted([b"\xff\xfe raw", "text", "utf8 bytes"], key=repr)
    q.ack(got)
    assert q.depth() == 0
    q.close()


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
    results = results_of(procs, out)
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
    with pytest.raises(QueueUnavailableError):
        q.add_counters({"hits": 1})
    with pytest.raises(QueueUnavailableError):
        q.counters()
    q.add_counters({})  # nothing to add: Redis is not even asked
    q.close()


def test_sqlite_unwritable_raises_queue_unavailable(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.enqueue([1])
    # a read-only connection stands in for a file this process may not write (root ignores chmod)
    assert sqlite_queue._db is not None
    sqlite_queue._db.close()
    sqlite_queue._db = sqlite3.connect(f"file:{sqlite_queue.path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
    sqlite_queue._conn_pid = os.getpid()
    assert sqlite_queue.depth() == 1  # reads still work
    assert sqlite_queue.counters() == {}
    with pytest.raises(QueueUnavailableError, match="readonly"):
        sqlite_queue.add_counters({"hits": 1})
    with pytest.raises(QueueUnavailableError, match="readonly"):
        sqlite_queue.enqueue([2])
    with pytest.raises(QueueUnavailableError, match="readonly"):
        sqlite_queue.claim(1)


def test_sqlite_closed_queue_raises_queue_unavailable(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.enqueue([1])
    sqlite_queue.close()
    for call in (lambda: sqlite_queue.enqueue([2]), sqlite_queue.depth, lambda: sqlite_queue.claim(1)):
        with pytest.raises(QueueUnavailableError, match="closed"):
            call()
    sqlite_queue.close()  # twice is fine


# ---------------------------------------------------------------- claim stays cheap with a big backlog

def _plan(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> str:
    return " | ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))


def test_sqlite_claim_and_depth_use_indexes(sqlite_queue: SQLiteQueue) -> None:
    """claim holds the write lock: it must walk an index to LIMIT rows, not sort the backlog."""
    sqlite_queue.enqueue(range(2000))
    db = sqlite3.connect(sqlite_queue.path)
    db.execute("ANALYZE")  # the plans must hold with statistics too, not only with the defaults
    now = time.time()
    plans = {
        "expired": _plan(db, _CLAIM_EXPIRED_SQL, (now, 64)),
        "ready": _plan(db, _CLAIM_READY_SQL, (now, 64)),
        "lease": _plan(db, _LEASE_SQL, (now, "t", 1)),
        "depth": _plan(db, _DEPTH_SQL, ()),
    }
    db.close()
    assert "USING INDEX items_leased (state=? AND lease_until<?)" in plans["expired"], plans
    assert "USING INDEX items_ready (state=? AND ready_at<?)" in plans["ready"], plans
    assert "USING INTEGER PRIMARY KEY (rowid=?)" in plans["lease"], plans
    assert "SEARCH" in plans["depth"] and "COVERING INDEX" in plans["depth"], plans
    for name, plan in plans.items():
        assert "TEMP B-TREE" not in plan and "SCAN" not in plan, (name, plan)


def test_sqlite_claim_takes_expired_leases_first(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.enqueue(range(10))
    dead = sqlite_queue.claim(3, lease_seconds=0.05)  # a worker that dies with keys 0, 1, 2
    assert keys_of(dead) == [0, 1, 2]
    live = sqlite_queue.claim(2, lease_seconds=60)
    assert keys_of(live) == [3, 4]
    time.sleep(0.1)
    got = sqlite_queue.claim(4, lease_seconds=60)
    assert keys_of(got) == [0, 1, 2, 5]  # the dead worker's keys, then the oldest ready one
    assert sqlite_queue.claim(100, lease_seconds=60) != []  # 6..9 remain
    assert sqlite_queue.claim(100, lease_seconds=60) == []  # live leases are not handed out twice
    assert sqlite_queue.depth() == 10


def test_sqlite_old_queue_file_is_upgraded(store_path: str) -> None:
    """A file written before the items_leased index and the counters table opens, and gets both."""
    os.makedirs(store_path)
    path = os.path.join(store_path, "old.queue.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("""
        CREATE TABLE items (key PRIMARY KEY, state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                            ready_at REAL NOT NULL, lease_until REAL, token TEXT, enqueued_at REAL NOT NULL,
                            error TEXT);
        CREATE INDEX items_ready ON items(state, ready_at);
    """)
    now = time.time()
    db.executemany("INSERT INTO items VALUES (?, ?, 0, ?, ?, ?, ?, NULL)",
                   [(1, 1, now - 10, now - 5, "deadworker", now - 10), (2, 0, now, None, None, now)])
    db.close()
    q = SQLiteQueue(path, "int64")
    db = sqlite3.connect(path)
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert {"items_leased", "counters"} <= names
    assert q.depth() == 2
    assert [it.key for it in q.claim(5)] == [1, 2]  # the expired lease first
    q.add_counters({"hits": 2})
    assert q.counters() == {"hits": 2.0}
    q.close()


# ---------------------------------------------------------------- shared counters

def test_counters_add_up_across_queue_objects(queue: WorkQueue) -> None:
    other = another_handle(queue)
    assert queue.counters() == {}
    queue.add_counters({"lookups": 3, "hits": 2.5})
    other.add_counters({"hits": 0.25, "fill_ms_le_10": 1})
    queue.add_counters({"lookups": 1})
    want = {"lookups": 4.0, "hits": 2.75, "fill_ms_le_10": 1.0}
    assert queue.counters() == want
    assert other.counters() == want
    other.add_counters({"hits": -0.75})  # a delta may be negative (a gauge moved down)
    assert queue.counters()["hits"] == 2.0
    other.close()


def test_counters_empty_deltas_do_nothing(queue: WorkQueue) -> None:
    queue.add_counters({})
    assert queue.counters() == {}
    queue.add_counters({"a": 1})
    queue.add_counters({})
    assert queue.counters() == {"a": 1.0}


def test_counters_reject_bad_input(queue: WorkQueue) -> None:
    queue.add_counters({"a": 1})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            queue.add_counters({"b": 1, "a": bad})  # all or nothing: "b" is not added either
    with pytest.raises(TypeError):
        queue.add_counters({"": 1})
    with pytest.raises(TypeError):
        queue.add_counters({3: 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        queue.add_counters({"b": "1"})  # type: ignore[dict-item]
    assert queue.counters() == {"a": 1.0}


def test_counters_are_not_queue_work(queue: WorkQueue) -> None:
    queue.add_counters({"hits": 5})
    assert queue.depth() == 0 and queue.claim(10) == [] and queue.failures() == {}


def test_sqlite_counters_survive_reopen(sqlite_queue: SQLiteQueue) -> None:
    sqlite_queue.add_counters({"lookups": 7, "hits": 0.5})
    sqlite_queue.close()
    again = SQLiteQueue(sqlite_queue.path, "int64")
    assert again.counters() == {"lookups": 7.0, "hits": 0.5}
    again.add_counters({"lookups": 1})
    assert again.counters() == {"lookups": 8.0, "hits": 0.5}
    again.close()


def _count(path: str, worker: int, rounds: int, barrier: Any, out: Any) -> None:
    q = SQLiteQueue(path, "int64")
    barrier.wait()
    for _ in range(rounds):  # both processes hit the same names at the same time
        q.add_counters({"lookups": 1, "hits": 0.5, f"only_{worker}": 2})
    out.put(worker)
    q.close()


def test_sqlite_counters_shared_by_two_processes(sqlite_queue: SQLiteQueue) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    rounds = 200
    procs = [ctx.Process(target=_count, args=(sqlite_queue.path, w, rounds, barrier, out)) for w in range(2)]
    for p in procs:
        p.start()
    assert sorted(out.get(timeout=60) for _ in procs) == [0, 1]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    # no update lost to a read-modify-write race between the processes
    assert sqlite_queue.counters() == {"lookups": 2.0 * rounds, "hits": 1.0 * rounds,
                                       "only_0": 2.0 * rounds, "only_1": 2.0 * rounds}
