"""Work queues of keys to compute: the interface and its SQLite and Redis Streams implementations.

A :class:`WorkQueue` holds keys whose vectors must be (re)computed. Its contract:

- **enqueue-once**: ``enqueue(keys)`` adds only keys that are not already pending (waiting, leased
  to a worker, or waiting for a retry); it returns how many were added.
- **leases**: ``claim(n, lease_seconds)`` hands out up to ``n`` ready keys as :class:`WorkItem`
  objects, leased to the caller. ``ack(items)`` removes them once their vectors are written. A
  lease that runs out (the worker died mid-batch) makes its key ready again: delivery is
  at-least-once, never at-most-once.
- **failures**: ``fail(item, error)`` records the error and schedules a retry after an
  exponential backoff (``backoff * 2**(attempts-1)``, capped at ``max_backoff``); after
  ``max_attempts`` failures the key is given up on: it stays recorded (``failures()``) and is not
  queued again until ``retry_failed()``.
- a queue that cannot be reached raises :class:`QueueUnavailableError` from every call.

Besides the work, a queue carries **shared counters**: ``add_counters({"hits": 3.0})`` adds to
named totals that every process and host using the queue sees with ``counters()``. They hold
metrics that no single process can know alone (lookups and hits served by every cache process,
fill-time histograms written by workers); they are not part of the work contract above, and
nothing in the queue reads them.

:class:`SQLiteQueue` is the embedded default (one file beside the store, WAL mode, safe across
processes, survives a restart); :class:`RedisStreamQueue` uses a Redis stream with a consumer
group. Another broker (Kafka) fits by implementing the abstract methods of :class:`WorkQueue`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import EmbkvError, KeyTypeError

__all__ = [
    "FailureInfo",
    "QueueUnavailableError",
    "RedisStreamQueue",
    "SQLiteQueue",
    "WorkItem",
    "WorkQueue",
]

Key = int | str | bytes


class QueueUnavailableError(EmbkvError, ConnectionError):
    """The work queue cannot be reached (Redis down, queue file unwritable).

    ``added``: keys an ``enqueue`` had queued before it failed (it commits in chunks), else 0.
    """

    added: int = 0


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One leased key. ``attempts``: failures so far; ``enqueued_at``: unix time of the first miss."""

    key: Key
    attempts: int
    enqueued_at: float
    token: str  # identifies the lease (SQLite) or the stream message (Redis)


@dataclasses.dataclass(frozen=True)
class FailureInfo:
    """The last error of a key whose computation failed; ``gave_up`` once ``max_attempts`` is reached."""

    attempts: int
    error: str
    gave_up: bool


def check_key_type(key_type: str) -> str:
    if key_type not in ("int64", "str"):
        raise KeyTypeError(f"key_type must be 'int64' or 'str', got {key_type!r}")
    return key_type


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def normalize_keys(keys: Iterable[Any], key_type: str) -> list[Key]:
    """Keys as plain Python ints (int64 queues) or str/bytes (str queues); KeyTypeError otherwise."""
    if type(keys) is list:  # the common case, checked without a Python loop per key
        types = set(map(type, keys))
        if key_type == "str" and types <= {str, bytes}:
            return keys
        if key_type == "int64" and types <= {int} and (not keys or (min(keys) >= _INT64_MIN
                                                                     and max(keys) <= _INT64_MAX)):
            return keys
    out: list[Key] = []
    for k in keys:
        if key_type == "int64":
            if isinstance(k, (bool, str, bytes)) or not hasattr(k, "__index__"):
                raise KeyTypeError(f"int64 queue: keys must be integers, got {type(k).__name__}")
            if not _INT64_MIN <= int(k) <= _INT64_MAX:
                raise KeyTypeError(f"int64 queue: key {int(k)} is outside the int64 range")
            out.append(int(k))
        else:
            if not isinstance(k, (str, bytes)):
                raise KeyTypeError(f"str queue: keys must be str or bytes, got {type(k).__name__}")
            out.append(k)
    return out


def check_deltas(deltas: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(name, delta)`` pairs of a counter update; TypeError/ValueError for a bad name or a non-finite delta."""
    out: list[tuple[str, float]] = []
    for name, delta in deltas.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"counter names must be non-empty str, got {name!r}")
        if isinstance(delta, (str, bytes)):  # float() would parse "3": a caller's mistake, not a number
            raise TypeError(f"counter {name!r}: delta must be a number, got {delta!r}")
        value = float(delta)
        # a NaN or inf would poison the shared total for every process, for good
        if not math.isfinite(value):
            raise ValueError(f"counter {name!r}: delta must be finite, got {value}")
        out.append((name, value))
    return out


class WorkQueue(ABC):
    """Interface of a queue of keys to compute (see the module docstring for the contract)."""

    key_type: str
    max_attempts: int
    backoff: float
    max_backoff: float

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the retry that follows failure number ``attempts`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2.0 ** max(0, attempts - 1)))

    @abstractmethod
    def enqueue(self, keys: Iterable[Any]) -> int:
        """Queue the keys not already pending or given up on; returns how many were added."""

    @abstractmethod
    def claim(self, n: int, lease_seconds: float = 30.0) -> list[WorkItem]:
        """Lease up to ``n`` ready keys (expired leases of dead workers count as ready)."""

    @abstractmethod
    def ack(self, items: Iterable[WorkItem]) -> None:
        """The items' vectors are written: remove them from the queue."""

    @abstractmethod
    def fail(self, item: WorkItem, error: str) -> bool:
        """Record a failed computation; returns True if a retry was scheduled, False if given up."""

    @abstractmethod
    def depth(self) -> int:
        """Keys pending: waiting, leased or waiting for a retry (given-up keys not counted)."""

    @abstractmethod
    def failures(self) -> dict[Key, FailureInfo]:
        """Keys whose last computation failed (retrying or given up), with the error."""

    @abstractmethod
    def retry_failed(self) -> int:
        """Queue the given-up keys again with a fresh attempt count; returns how many."""

    @abstractmethod
    def add_counters(self, deltas: Mapping[str, float]) -> None:
        """Add each delta to its named counter shared by every user of the queue, all in one
        atomic update; a name not seen before starts at 0. An empty mapping does nothing (and
        does not reach the backend). Raises ValueError for a non-finite delta."""

    @abstractmethod
    def counters(self) -> dict[str, float]:
        """The current totals of the shared counters (a name never added to is absent)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> WorkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------- SQLite

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


# -------------------------------------------------------------------- Redis Streams

# KEYS: stream, pending set; ARGV: now, key...  -> number added
_ENQUEUE_LUA = """
local added = 0
for i = 2, #ARGV do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'k', ARGV[i], 'e', ARGV[1], 'a', '0')
    added = added + 1
  end
end
return added
"""

# KEYS: stream, delayed zset; ARGV: now -> moves due retries into the stream
_PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, m in ipairs(due) do
  local v = cjson.decode(m)
  redis.call('XADD', KEYS[1], '*', 'k', v[1], 'e', v[2], 'a', v[3])
  redis.call('ZREM', KEYS[2], m)
end
return #due
"""


class RedisStreamQueue(WorkQueue):
    """A queue on a Redis stream with a consumer group (XADD / XREADGROUP / XACK / XAUTOCLAIM).

    Keys live in the stream ``embkv:<name>:stream``; the set ``embkv:<name>:pending`` makes
    enqueue-once atomic (a Lua script adds a key to the stream only if the set did not hold it);
    retries wait in the sorted set ``embkv:<name>:delayed``; errors are kept in the hash
    ``embkv:<name>:errors`` and given-up keys in ``embkv:<name>:dead``; the shared counters are
    the hash ``embkv:<name>:counters``. A message leased longer than ``lease_seconds`` is taken
    over by the next ``claim`` (XAUTOCLAIM): at-least-once. Unlike SQLite, where the claimer sets
    its lease's length, here the lease that counts is the ``lease_seconds`` of the worker taking
    over (XAUTOCLAIM's min-idle): give workers one value.
    Needs ``redis`` (``pip install embkv[redis]``).
    """

    def __init__(self, url: str, name: str, key_type: str = "int64", *, consumer: str | None = None,
                 max_attempts: int = 5, backoff: float = 1.0, max_backoff: float = 300.0,
                 socket_timeout: float = 1.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.name = name
        self.key_type = check_key_type(key_type)
        self.max_attempts = int(max_attempts)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.consumer = consumer or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._errors_mod: Any = redis.exceptions
        # fail fast: a lookup must not wait out retries with backoff while Redis is down
        self._r: Any = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                            retry=Retry(NoBackoff(), 1))
        base = f"embkv:{name}"
        self._stream, self._pending, self._delayed = f"{base}:stream", f"{base}:pending", f"{base}:delayed"
        self._errors, self._dead, self._group = f"{base}:errors", f"{base}:dead", "workers"
        self._counters = f"{base}:counters"
        self._group_ready = False
        with contextlib.suppress(QueueUnavailableError):
            self._ensure_group()

    def __repr__(self) -> str:
        return f"<embkv.RedisStreamQueue {self.url!r} {self.name!r} keys={self.key_type}>"

    @contextlib.contextmanager
    def _calls(self) -> Iterator[Any]:
        try:
            yield self._r
        except (self._errors_mod.ConnectionError, self._errors_mod.TimeoutError) as exc:
            raise QueueUnavailableError(f"redis queue {self.url}: {exc}") from exc

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._calls() as r:
            try:
                r.xgroup_create(self._stream, self._group, id="0", mkstream=True)
            except self._errors_mod.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    def _encode(self, key: Key) -> str | bytes:
        # bytes go as they are (Redis strings are binary): a key that is not UTF-8 stays a key
        return key if isinstance(key, bytes) else str(key)

    def _decode(self, raw: bytes | str) -> Key:
        if self.key_type == "int64":
            return int(raw)
        if isinstance(raw, bytes):
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return raw  # as it was queued: embkv tables take such keys as bytes
        return raw

    def enqueue(self, keys: Iterable[Any]) -> int:
        ks = [self._encode(k) for k in normalize_keys(keys, self.key_type)]
        if not ks:
            return 0
        self._ensure_group()
        with self._calls() as r:
            return int(r.eval(_ENQUEUE_LUA, 2, self._stream, self._pending, repr(time.time()), *ks))

    def claim(self, n: int, lease_seconds: float = 30.0) -> list[WorkItem]:
        if n <= 0:
            return []
        self._ensure_group()
        messages: list[tuple[Any, dict[Any, Any]]] = []
        with self._calls() as r:
            r.eval(_PROMOTE_LUA, 2, self._stream, self._delayed, repr(time.time()))
            reclaimed = r.xautoclaim(self._stream, self._group, self.consumer, int(lease_seconds * 1000),
                                     start_id="0-0", count=n)
            messages.extend(m for m in reclaimed[1] if m[1])  # entries deleted meanwhile come back empty
            if len(messages) < n:
                got = r.xreadgroup(self._group, self.consumer, {self._stream: ">"}, count=n - len(messages))
                for _stream, entries in got or []:
                    messages.extend(entries)
        items = []
        for msg_id, fields in messages:
            f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
            mid = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
            items.append(WorkItem(self._decode(f["k"]), int(f["a"]), float(f["e"]), mid))
        return items

    def ack(self, items: Iterable[WorkItem]) -> None:
        its = list(items)
        if not its:
            return
        with self._calls() as r:
            pipe = r.pipeline(transaction=True)
            ids = [it.token for it in its]
            pipe.xack(self._stream, self._group, *ids)
            pipe.xdel(self._stream, *ids)
            keys = [self._encode(it.key) for it in its]
            pipe.srem(self._pending, *keys)
            pipe.hdel(self._errors, *keys)
            pipe.execute()

    def fail(self, item: WorkItem, error: str) -> bool:
        attempts = item.attempts + 1
        retry = attempts < self.max_attempts
        key = self._encode(item.key)
        with self._calls() as r:
            pipe = r.pipeline(transaction=True)
            pipe.xack(self._stream, self._group, item.token)
            pipe.xdel(self._stream, item.token)
            pipe.hset(self._errors, key, json.dumps([attempts, str(error)]))
            if retry:
                member = json.dumps([key, repr(item.enqueued_at), str(attempts)])
                pipe.zadd(self._delayed, {member: time.time() + self.retry_delay(attempts)})
            else:
                pipe.hset(self._dead, key, "1")  # stays in the pending set: not queued again
            pipe.execute()
        return retry

    def depth(self) -> int:
        with self._calls() as r:
            pipe = r.pipeline(transaction=False)
            pipe.scard(self._pending)
            pipe.hlen(self._dead)
            pending, dead = pipe.execute()
        return int(pending) - int(dead)

    def failures(self) -> dict[Key, FailureInfo]:
        with self._calls() as r:
            errors = r.hgetall(self._errors)
            dead = {self._decode(k) for k in r.hkeys(self._dead)}
        out: dict[Key, FailureInfo] = {}
        for k, v in errors.items():
            key = self._decode(k)
            attempts, error = json.loads(v)
            out[key] = FailureInfo(int(attempts), str(error), key in dead)
        return out

    def retry_failed(self) -> int:
        with self._calls() as r:
            dead = r.hkeys(self._dead)
            if not dead:
                return 0
            now = repr(time.time())
            pipe = r.pipeline(transaction=True)
            for k in dead:
                pipe.xadd(self._stream, {"k": k, "e": now, "a": "0"})
            pipe.hdel(self._dead, *dead)
            pipe.hdel(self._errors, *dead)
            pipe.execute()
        return len(dead)

    def add_counters(self, deltas: Mapping[str, float]) -> None:
        pairs = check_deltas(deltas)
        if not pairs:
            return
        with self._calls() as r:
            pipe = r.pipeline(transaction=True)  # MULTI/EXEC: no reader sees half of one update
            for name, delta in pairs:
                pipe.hincrbyfloat(self._counters, name, delta)
            pipe.execute()

    def counters(self) -> dict[str, float]:
        with self._calls() as r:
            raw = r.hgetall(self._counters)
        return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()
