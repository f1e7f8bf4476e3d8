"""The peers embkv is measured against, as a worker process queries them, and their bulk loaders:
Redis (redis-py with hiredis, ``MGET``), Memcached (pymemcache ``get_many``), LMDB (py-lmdb) and a
dict per worker process.

Values are the raw float32 bytes of a row (``ndarray.tobytes()``). Redis and Memcached hold the
keys by name: ``str(key)`` for int keys (:func:`decimal_names`) and ``"item:{key}"`` for the
str-keyed twin. LMDB holds int keys as 8-byte big-endian (so they sort like the numbers) and str
keys as UTF-8.

A peer answers a batch two ways:

- ``peer.fn(keys)`` (bench_lookup): ``(vectors [B, dim] float32, found [B])``, zeros at a miss.
  ``fn`` is a closure over the client's own method, so a timed call costs what the user's code would.
- ``peer.hits(names)`` (the service app): ``(vectors of the keys found [hits, dim], found [B])``,
  ``found`` None when every key was found.

Client libraries are imported where they are first used, so a process imports only what it queries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _common import MB, BenchError, BoolArray, FloatArray, IntArray, str_key

LookupFn = Callable[[Any], Any]
Names = Callable[[IntArray], list[str]]  # int64 keys -> the names a server holds them by


# ---------------------------------------------------------------------------- keys and values


def decimal_names(keys: IntArray) -> list[str]:
    """Int keys as the names Redis and Memcached hold them by: ``str(key)``."""
    return [str(k) for k in keys.tolist()]


def twin_names(keys: IntArray) -> list[str]:
    """Int keys as their str-keyed twins: ``"item:{key}"``."""
    return [str_key(k) for k in keys.tolist()]


def be8_names(keys: IntArray) -> list[bytes]:
    """Int keys (>= 0) as 8-byte big-endian names: LMDB's int keys, sorted as the numbers are."""
    raw = keys.astype(">i8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def row_bytes(vectors: FloatArray, lo: int, hi: int) -> list[bytes]:
    """Rows ``lo:hi`` as one ``bytes`` value each."""
    raw, rb = vectors[lo:hi].tobytes(), vectors.shape[1] * 4
    return [raw[i : i + rb] for i in range(0, len(raw), rb)]


def decode(vals: list[Any], dim: int, zero: bytes) -> tuple[FloatArray, BoolArray]:
    """Values (bytes, buffers or None) -> ([B, dim] float32, zeros at a miss; found): the fastest decode we found."""
    n = len(vals)
    if None in vals:
        found = np.array([v is not None for v in vals], dtype=np.bool_)
        buf = b"".join([zero if v is None else v for v in vals])
    else:
        found = np.ones(n, dtype=np.bool_)
        buf = b"".join(vals)
    return np.frombuffer(buf, dtype=np.float32).reshape(n, dim), found


def decode_hits(vals: list[bytes | None], dim: int) -> tuple[FloatArray, BoolArray | None]:
    """Values (bytes or None) -> ([hits, dim] float32 of the found ones, found; None when all were)."""
    hits = [v for v in vals if v is not None]
    found = None if len(hits) == len(vals) else np.array([v is not None for v in vals], dtype=np.bool_)
    return np.frombuffer(b"".join(hits), dtype=np.float32).reshape(len(hits), dim), found


def host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``":port"``: loopback) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


# ---------------------------------------------------------------------------- clients


class Peer:
    """One system as seen from a worker process: ``fn(keys)`` answers one batch.

    ``fn`` takes the batch the way a user holds it (an int64 array, or a list of str) and returns
    ``(vectors [B, dim], found [B])``; a system without misses (the numpy limit) sets ``has_found``
    False and returns the vectors alone.
    """

    has_found = True

    def __init__(self) -> None:
        self.fn: LookupFn = lambda keys: None
        self._closers: list[Callable[[], Any]] = []

    def warm(self) -> None:
        """Read every row once where the answer depends on it (mmap: page cache and PSS)."""

    def close(self) -> None:
        for c in reversed(self._closers):
            with contextlib.suppress(Exception):
                c()
        self.fn = lambda keys: None


class RedisPeer(Peer):
    """redis-py (hiredis parser) ``MGET``, over TCP (``address`` "host:port") or a unix socket (a path).

    ``names`` converts an int64 batch to the names the server holds (None: the batch is the names).
    """

    def __init__(self, address: str, dim: int, names: Names | None = None, **options: Any) -> None:
        super().__init__()
        import redis

        if address.startswith("/"):
            r = redis.Redis(unix_socket_path=address, **options)
        else:
            host, port = host_port(address)
            r = redis.Redis(host=host, port=port, **options)
        r.ping()
        self.client = r
        self.dim = dim
        self._closers.append(r.close)
        mget = r.mget
        zero = bytes(4 * dim)
        if names is None:

            def fn(keys: Any) -> tuple[FloatArray, BoolArray]:
                return decode(mget(keys), dim, zero)
        else:

            def fn(keys: Any) -> tuple[FloatArray, BoolArray]:
                return decode(mget(names(keys)), dim, zero)

        self.fn = fn

    def hits(self, names: Sequence[bytes | str]) -> tuple[FloatArray, BoolArray | None]:
        values: list[bytes | None] = list(self.client.mget(names)) if names else []
        return decode_hits(values, self.dim)


class MemcachedPeer(Peer):
    """pymemcache ``get_many`` over TCP, Nagle off; ``names`` as for :class:`RedisPeer`.

    Connecting is lazy: the first ``get`` is made here, so an open that is timed includes the first
    round trip.
    """

    def __init__(self, address: str, dim: int, names: Names | None = None) -> None:
        super().__init__()
        from pymemcache.client.base import Client

        client = Client(host_port(address), no_delay=True, connect_timeout=10, timeout=60)
        client.get("connect")
        self.client = client
        self.dim = dim
        self._closers.append(client.close)
        get_many = client.get_many
        zero = bytes(4 * dim)
        to_names = names

        def fn(keys: Any) -> tuple[FloatArray, BoolArray]:
            names = to_names(keys) if to_names is not None else keys
            res = get_many(names)
            return decode([res.get(k) for k in names], dim, zero)

        self.fn = fn

    def hits(self, names: Sequence[bytes | str]) -> tuple[FloatArray, BoolArray | None]:
        got: dict[Any, bytes] = self.client.get_many(names) if names else {}
        return decode_hits([got.get(k) for k in names], self.dim)


class LmdbPeer(Peer):
    """py-lmdb, one read transaction per batch, ``txn.get`` per key with ``buffers=True`` (the values
    are decoded inside the transaction). ``kind`` "int": int64 batches; "str": lists of str."""

    def __init__(self, path: str, dim: int, kind: str) -> None:
        super().__init__()
        import lmdb

        env = lmdb.open(path, readonly=True, lock=True, max_readers=256)
        with env.begin() as txn:
            txn.stat(env.open_db())  # touch the environment: open time covers a first transaction
        self.env = env
        self._closers.append(env.close)
        begin = env.begin
        zero = bytes(4 * dim)

        def fn_int(keys: IntArray) -> tuple[FloatArray, BoolArray]:
            raw = keys.astype(">i8").tobytes()  # be8_names, inline: no extra call in the timed path
            names = [raw[i : i + 8] for i in range(0, len(raw), 8)]
            with begin(buffers=True) as txn:
                get = txn.get
                return decode([get(k) for k in names], dim, zero)

        def fn_str(keys: list[str]) -> tuple[FloatArray, BoolArray]:
            names = [k.encode() for k in keys]
            with begin(buffers=True) as txn:
                get = txn.get
                return decode([get(k) for k in names], dim, zero)

        self.fn = fn_int if kind == "int" else fn_str

    def warm(self) -> None:
        with self.env.begin(buffers=True) as txn:
            for _ in txn.cursor().iternext(keys=False, values=True):
                pass


class RowDict(Peer):
    """A dict per worker: ``{key: np.ndarray row}`` with row copies (what unpickling a dict of vectors
    gives), built from ``data_dir``/keys.npy and vectors.npy; int keys, or their str twins."""

    def __init__(self, data_dir: Path, dim: int, kind: str) -> None:
        super().__init__()
        keys = np.load(data_dir / "keys.npy")
        vectors = np.load(data_dir / "vectors.npy", mmap_mode="r")
        names: list[Any] = keys.tolist() if kind == "int" else twin_names(keys)
        self.d: dict[Any, FloatArray] = {k: np.array(row) for k, row in zip(names, vectors, strict=True)}
        del keys, vectors, names
        zero = np.zeros(dim, dtype=np.float32)
        get = self.d.get

        def fn_int(keys: IntArray) -> tuple[FloatArray, BoolArray]:
            vals = [get(k, zero) for k in keys.tolist()]
            found = np.array([v is not zero for v in vals], dtype=np.bool_)
            return np.frombuffer(b"".join(vals), dtype=np.float32).reshape(len(vals), dim), found

        def fn_str(keys: list[str]) -> tuple[FloatArray, BoolArray]:
            vals = [get(k, zero) for k in keys]
            found = np.array([v is not zero for v in vals], dtype=np.bool_)
            return np.frombuffer(b"".join(vals), dtype=np.float32).reshape(len(vals), dim), found

        self.fn = fn_int if kind == "int" else fn_str


class IndexDict:
    """A dict per worker: ``{key: row}`` plus a private numpy matrix of the rows, loaded from
    ``data_dir``/keys.npy and vectors.npy (int keys)."""

    def __init__(self, data_dir: Path) -> None:
        keys = np.load(data_dir / "keys.npy")
        self.matrix: FloatArray = np.load(data_dir / "vectors.npy")  # private copy
        self.index: dict[int, int] = dict(zip(keys.tolist(), range(len(keys)), strict=True))
        del keys

    def hits(self, keys: IntArray) -> tuple[FloatArray, BoolArray | None]:
        get = self.index.get
        rows = np.array([get(k, -1) for k in keys.tolist()], dtype=np.intp)
        found = rows >= 0
        if found.all():
            return self.matrix[rows], None
        return self.matrix[rows[found]], found


# ---------------------------------------------------------------------------- bulk loaders


def load_redis(address: str, keys: IntArray, vectors: FloatArray, names: Names, chunk: int,
               flush_every: int) -> float:
    """Pipelined ``MSET`` of ``chunk`` keys per command, the pipeline sent every ``flush_every``
    commands; ``address`` as for :class:`RedisPeer`. Returns seconds (names converted inside)."""
    import redis

    if address.startswith("/"):
        r = redis.Redis(unix_socket_path=address)
    else:
        host, port = host_port(address)
        r = redis.Redis(host=host, port=port)
    try:
        n = len(keys)
        t0 = time.perf_counter()
        key_names = names(keys)
        pipe = r.pipeline(transaction=False)
        for j, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            pipe.mset(dict(zip(key_names[lo:hi], row_bytes(vectors, lo, hi), strict=True)))
            if j % flush_every == flush_every - 1:
                pipe.execute()
        pipe.execute()
        secs = time.perf_counter() - t0
        if r.dbsize() != n:
            raise BenchError(f"redis holds {r.dbsize()} keys after loading {n}")
    finally:
        r.close()
    return secs


def load_memcached(address: str, keys: IntArray, vectors: FloatArray, names: Names, chunk: int) -> float:
    """``set_many`` of ``chunk`` keys at a time, waiting for the replies; returns seconds (names
    converted inside). Every key must be held afterwards, none evicted."""
    from pymemcache.client.base import Client

    c = Client(host_port(address), no_delay=True, timeout=120)
    try:
        n = len(keys)
        t0 = time.perf_counter()
        key_names = names(keys)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            failed = c.set_many(dict(zip(key_names[lo:hi], row_bytes(vectors, lo, hi), strict=True)), noreply=False)
            if failed:
                raise BenchError(f"memcached refused {len(failed)} keys, e.g. {failed[:3]}")
        secs = time.perf_counter() - t0
        stats = c.stats()
        items, evicted = int(stats[b"curr_items"]), int(stats[b"evictions"])
        if items != n or evicted:
            raise BenchError(f"memcached holds {items} items ({evicted} evicted) after loading {n}")
    finally:
        c.close()
    return secs


def load_lmdb(path: Path, keys: IntArray, vectors: FloatArray, kind: str) -> float:
    """Sort the keys, ``putmulti(append=True)`` in one write transaction, sync; returns seconds."""
    import lmdb

    n, rb = len(keys), vectors.shape[1] * 4
    t0 = time.perf_counter()
    if kind == "int":  # keys are >= 0, so big-endian bytes sort like the numbers
        order = np.argsort(keys, kind="stable")
        names = be8_names(keys[order])
    else:
        encoded = [str_key(k).encode() for k in keys.tolist()]
        order = np.argsort(np.array(encoded), kind="stable")
        names = [encoded[i] for i in order.tolist()]
    env = lmdb.open(str(path), map_size=2 * n * (rb + 96) + 64 * MB, subdir=True, writemap=True,
                    max_readers=256)
    try:
        with env.begin(write=True) as txn:
            sorted_vectors = vectors[order]
            added = txn.cursor().putmulti(zip(names, row_bytes(sorted_vectors, 0, n), strict=True), append=True)
        env.sync(True)
        secs = time.perf_counter() - t0
        if added != (n, n):
            raise BenchError(f"lmdb putmulti added {added} of {n}")
    finally:
        env.close()
    return secs
