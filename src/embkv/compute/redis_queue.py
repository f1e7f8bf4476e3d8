"""The Redis Streams work queue: keys in a stream with a consumer group, for workers on many hosts.

The contract is :class:`~embkv.compute.queue.WorkQueue`'s; enqueue-once and retries are Lua
scripts, so every step is atomic in Redis. Needs ``embkv[redis]``.
"""

from __future__ import annotations

import contextlib
import json
import os
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

__all__ = ["RedisStreamQueue"]


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
