"""Work queues of compute on miss: SQLite (embedded, shared by processes) and Redis Streams (real redis-server).

Both run the shipped contract suite (``embkv.testing.WorkQueueTests``); what is specific to
one backend (SQLite's indexes and file, Redis's bytes keys) is tested below it.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embkv import QueueUnavailableError, RedisStreamQueue, SQLiteQueue, WorkQueue
from embkv.compute.sqlite_queue import _CLAIM_EXPIRED_SQL, _CLAIM_READY_SQL, _DEPTH_SQL, _LEASE_SQL
from embkv.testing import WorkQueueTests
from embkv.testing.queue import keys_of
from helpers import free_port, results_of


class TestSQLiteQueue(WorkQueueTests):
    @pytest.fixture
    def make_queue(self, store_path: str) -> Iterator[Callable[..., WorkQueue]]:
        os.makedirs(store_path)
        opened: list[WorkQueue] = []

        def make(key_type: str = "int64", *, name: str = "q", **kwargs: Any) -> WorkQueue:
            q = SQLiteQueue(os.path.join(store_path, f"{name}.queue.sqlite"), key_type, **kwargs)
            opened.append(q)
            return q

        yield make
        for q in opened:
            q.close()


class TestRedisStreamQueue(WorkQueueTests):
    @pytest.fixture
    def make_queue(self, redis_url: str) -> Iterator[Callable[..., WorkQueue]]:
        opened: list[WorkQueue] = []

        def make(key_type: str = "int64", *, name: str = "q", **kwargs: Any) -> WorkQueue:
            q = RedisStreamQueue(redis_url, name, key_type, **kwargs)
            opened.append(q)
            return q

        yield make
        for q in opened:
            q.close()


@pytest.fixture
def sqlite_queue(store_path: str) -> Iterator[SQLiteQueue]:
    os.makedirs(store_path)
    q = SQLiteQueue(os.path.join(store_path, "t.queue.sqlite"), "int64", backoff=0.05, max_attempts=3)
    yield q
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


def test_redis_keeps_bytes_keys_that_are_not_utf8(redis_url: str) -> None:
    q = RedisStreamQueue(redis_url, "b", "str")
    assert q.enqueue([b"\xff\xfe raw", "text", b"utf8 bytes"]) == 3
    assert q.enqueue([b"\xff\xfe raw"]) == 0
    got = q.claim(10)
    assert sorted((it.key for it in got), key=repr) == sorted([b"\xff\xfe raw", "text", "utf8 bytes"], key=repr)
    q.ack(got)
    assert q.depth() == 0
    q.close()


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
