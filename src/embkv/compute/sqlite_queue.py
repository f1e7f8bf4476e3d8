"""The embedded work queue: one SQLite file beside the store, shared by every process on the host.

The contract is :class:`~embkv.compute.queue.WorkQueue`'s; this file holds how SQLite keeps it
(one row per pending key, leases as a state and a deadline, two indexes that keep ``claim``
cheap with a large backlog).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .queue import (
    FailureInfo,
    Key,
    QueueUnavailableError,
    WorkItem,
    WorkQueue,
    check_deltas,
    check_key_type,
    normalize_keys,
)

__all__ = ["SQLiteQueue"]


_READY, _LEASED, _DEAD = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key            PRIMARY KEY,
    state          INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    ready_at       REAL NOT NULL,
    lease_until    REAL,
    token          TEXT,
    enqueued_at    REAL NOT NULL,
    error          TEXT
);
CREATE INDEX IF NOT EXISTS items_ready ON items(state, ready_at);
CREATE INDEX IF NOT EXISTS items_leased ON items(state, lease_until);
CREATE TABLE IF NOT EXISTS counters (
    name           TEXT PRIMARY KEY,
    value          REAL NOT NULL
);
"""

# claim takes expired leases first, then ready keys: two queries that each walk one index in
# order and stop after LIMIT rows. One query with "(ready) OR (expired)" cannot: SQLite unions
# two index searches and sorts every match in a temp b-tree, the whole backlog, while holding
# the write lock that other processes' enqueues wait for.
_CLAIM_EXPIRED_SQL = ("SELECT rowid, key, attempts, enqueued_at FROM items "
                      "WHERE state = 1 AND lease_until < ? ORDER BY lease_until LIMIT ?")
_CLAIM_READY_SQL = ("SELECT rowid, key, attempts, enqueued_at FROM items "
                    "WHERE state = 0 AND ready_at <= ? ORDER BY ready_at LIMIT ?")
# by rowid: the row directly, without a lookup in the key's index first
_LEASE_SQL = "UPDATE items SET state = 1, lease_until = ?, token = ? WHERE rowid = ?"
# state leads both indexes: the count walks index entries of pending keys, not the table's rows
# nor the given-up keys (which pile up until retry_failed)
_DEPTH_SQL = "SELECT COUNT(*) FROM items WHERE state IN (0, 1)"
# guards the per-process reset of SQLiteQueue connections; fresh in every child (never inherited held)
_FORK_LOCK = threading.Lock()


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_lock)

@functools.lru_cache(maxsize=1)
def _sqlite_has_json() -> bool:
    """Whether the SQLite linked into Python has json_each (built in since 3.38, often before)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        try:
            db.execute("SELECT count(*) FROM json_each('[1]')").fetchone()
        except sqlite3.Error:
            return False
    return True


_ENQUEUE_CHUNK = 4096  # keys per INSERT statement (the bound-parameter path stays under SQLite's 32766)
_ENQUEUE_JSON_SQL = ("INSERT OR IGNORE INTO items(key, state, attempts, ready_at, enqueued_at) "
                     "SELECT value, 0, 0, ?1, ?1 FROM json_each(?2)")


@functools.lru_cache(maxsize=64)
def _enqueue_sql(n: int) -> str:
    """One INSERT of ``n`` keys (parameters: now, key_1 .. key_n); existing keys are left as they are."""
    return ("INSERT OR IGNORE INTO items(key, state, attempts, ready_at, enqueued_at) "
            "SELECT column1, 0, 0, ?1, ?1 FROM (VALUES " + ", ".join(f"(?{i + 2})" for i in range(n)) + ")")


class SQLiteQueue(WorkQueue):
    """The embedded queue: one SQLite file (WAL mode), shared by any number of processes.

    Needs no server and survives restarts: pending keys, leases and failures are rows of the
    file. ``SQLiteQueue.beside(store, "items")`` puts it at ``<store>/items.queue.sqlite``.
    """

    def __init__(self, path: str | os.PathLike[str], key_type: str = "int64", *, max_attempts: int = 5,
                 backoff: float = 1.0, max_backoff: float = 300.0, busy_timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.key_type = check_key_type(key_type)
        self.max_attempts = int(max_attempts)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.Lock()
        self._conn_pid = -1
        self._db: sqlite3.Connection | None = None
        self._closed = False
        try:
            with self._locked() as db:
                db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc
        self._has_json = _sqlite_has_json()

    @classmethod
    def beside(cls, store: Any, table: str, **kwargs: Any) -> SQLiteQueue:
        """The queue file of ``table`` in ``store`` (a :class:`~embkv.Store`), keyed like the table."""
        key_type = store[table].key_type
        return cls(os.path.join(store.path, f"{table}.queue.sqlite"), key_type, **kwargs)

    def __repr__(self) -> str:
        return f"<embkv.SQLiteQueue {self.path!r} keys={self.key_type}>"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, used by one thread at a time.

        The lock covers opening and closing too: sqlite3 crashes (not raises) when a
        connection is closed while another thread is inside a call on it.
        """
        if self._conn_pid != os.getpid():
            with _FORK_LOCK:  # two threads of a forked child: one of them starts afresh
                if self._conn_pid != os.getpid():
                    # a connection must not cross a fork, and a lock copied by fork may be held
                    # by a thread that does not exist here (the parent's stay the parent's)
                    self._lock, self._db, self._conn_pid = threading.Lock(), None, os.getpid()
        with self._lock:
            if self._closed:
                raise QueueUnavailableError(f"queue {self.path}: closed")
            if self._db is None:
                try:
                    db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                         check_same_thread=False)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                except sqlite3.Error as exc:
                    raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc
                self._db = db
            yield self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc
            try:
                yield db
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # I/O error, disk full, read-only file
                    raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """For a single SELECT: no write lock (WAL readers do not block writers, nor wait for them)."""
        with self._locked() as db:
            try:
                yield db
            except sqlite3.OperationalError as exc:
                raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc

    def enqueue(self, keys: Iterable[Any]) -> int:
        ks = normalize_keys(keys, self.key_type)
        if not ks:
            return 0
        now = time.time()
        added = 0
        # ints and str travel as one JSON array per chunk (one parameter, one fixed statement:
        # little work with the GIL held); a call with a bytes key binds its keys one by one, as
        # does a SQLite built without JSON functions
        as_json = self._has_json and set(map(type, ks)) <= {int, str}
        with self._locked() as db:
            # one statement per chunk, in its own implicit transaction: SQLite holds the write
            # lock only while it runs, with the GIL released. A BEGIN ... COMMIT of several calls
            # also needs the GIL between them, and in a process whose other threads keep the GIL
            # busy (a service doing lookups) each hand-back can take a switch interval (5 ms):
            # the write lock stayed held for most of the time and starved the workers' claims.
            # Small chunks keep each stretch of this thread holding the GIL short too.
            for lo in range(0, len(ks), _ENQUEUE_CHUNK):
                chunk = ks[lo : lo + _ENQUEUE_CHUNK]
                before = db.total_changes
                try:
                    payload = json.dumps(chunk) if as_json else ""
                    # SQLite's JSON text ends at a NUL character: such keys are bound one by one
                    if as_json and "\\u0000" not in payload:
                        db.execute(_ENQUEUE_JSON_SQL, (now, payload))
                    else:
                        db.execute(_enqueue_sql(len(chunk)), (now, *chunk))
                except sqlite3.Error as exc:
                    err = QueueUnavailableError(f"queue {self.path}: {exc}")
                    err.added = added  # the chunks before this one are queued
                    raise err from exc
                added += db.total_changes - before
        return added

    def claim(self, n: int, lease_seconds: float = 30.0) -> list[WorkItem]:
        if n <= 0:
            return []
        now = time.time()
        token = uuid.uuid4().hex
        with self._tx() as db:
            # keys of dead workers first: they have waited longest
            rows = db.execute(_CLAIM_EXPIRED_SQL, (now, int(n))).fetchall()
            if len(rows) < n:
                rows += db.execute(_CLAIM_READY_SQL, (now, int(n) - len(rows))).fetchall()
            db.executemany(_LEASE_SQL, [(now + lease_seconds, token, r[0]) for r in rows])
        return [WorkItem(r[1], int(r[2]), float(r[3]), token) for r in rows]

    def ack(self, items: Iterable[WorkItem]) -> None:
        pairs = [(it.key, it.token) for it in items]
        if not pairs:
            return
        with self._tx() as db:  # only our own lease: a key re-leased to another worker stays
            db.executemany("DELETE FROM items WHERE key = ? AND token = ?", pairs)

    def fail(self, item: WorkItem, error: str) -> bool:
        attempts = item.attempts + 1
        retry = attempts < self.max_attempts
        with self._tx() as db:
            db.execute("UPDATE items SET state = ?, attempts = ?, ready_at = ?, lease_until = NULL, token = NULL, "
                       "error = ? WHERE key = ? AND token = ?",
                       (_READY if retry else _DEAD, attempts, time.time() + self.retry_delay(attempts),
                        str(error), item.key, item.token))
        return retry

    def depth(self) -> int:
        with self._read() as db:
            # fetchall: the statement is done, its read snapshot does not hold back checkpoints
            ((count,),) = db.execute(_DEPTH_SQL).fetchall()
        return int(count)

    def failures(self) -> dict[Key, FailureInfo]:
        with self._read() as db:
            rows = db.execute("SELECT key, attempts, error, state FROM items WHERE error IS NOT NULL").fetchall()
        return {r[0]: FailureInfo(int(r[1]), str(r[2]), r[3] == _DEAD) for r in rows}

    def retry_failed(self) -> int:
        with self._tx() as db:
            cur = db.execute("UPDATE items SET state = 0, attempts = 0, ready_at = ?, error = NULL WHERE state = 2",
                             (time.time(),))
            return int(cur.rowcount)

    def add_counters(self, deltas: Mapping[str, float]) -> None:
        pairs = check_deltas(deltas)
        if not pairs:
            return
        # one statement, atomic by itself (see enqueue for why not BEGIN ... COMMIT)
        sql = ("INSERT INTO counters(name, value) VALUES " + ", ".join(["(?, ?)"] * len(pairs))
               + " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value")
        with self._locked() as db:
            try:
                db.execute(sql, [x for pair in pairs for x in pair])
            except sqlite3.Error as exc:
                raise QueueUnavailableError(f"queue {self.path}: {exc}") from exc

    def counters(self) -> dict[str, float]:
        with self._read() as db:
            rows = db.execute("SELECT name, value FROM counters").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    def close(self) -> None:
        """Close this process's connection; later calls raise QueueUnavailableError."""
        if self._conn_pid != os.getpid():
            self._closed = True  # the parent's connection is the parent's to close
            return
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            self._db = None
            self._closed = True


