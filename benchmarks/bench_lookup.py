#!/usr/bin/env python
"""Side-by-side lookup benchmark: embkv against what users pick instead.

Systems: embkv in memory (/dev/shm) and on disk (page cache, after warm-up), Memcached
(pymemcache ``get_many``), Redis (redis-py + hiredis ``MGET``, over TCP and a unix socket),
LMDB (py-lmdb), a ``{key: np.ndarray}`` dict copy in every worker, and the limit: an
in-process numpy ``matrix[rows]`` with the rows precomputed.

Run from the repository root::

    python benchmarks/bench_lookup.py                     # full run, ~10 min; writes docs/benchmarks/lookup*
    python benchmarks/bench_lookup.py --quick --no-write  # smoke run, < 1 min, prints only

The markdown report goes to stdout, progress to stderr. Redis and Memcached servers are
started on loopback by the benchmark and stopped at the end; every temporary folder (on
disk and in /dev/shm) is removed, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

import embkv
from _common import (
    MB,
    REPO,
    BenchError,
    BoolArray,
    FloatArray,
    IntArray,
    make_log,
    make_miss_pool,
    malloc_trim,
    pct_us,
    pss,
    random_table,
    scratch,
    str_key,
    zipf_cdf,
    zipf_ranks,
)
from _peers import (
    LmdbPeer,
    LookupFn,
    MemcachedPeer,
    Peer,
    RedisPeer,
    RowDict,
    decimal_names,
    load_lmdb,
    load_memcached,
    load_redis,
    twin_names,
)
from _report import (
    Target,
    command_item,
    cores,
    cpu_model,
    dist_version,
    first_line,
    fmt_rate,
    fmt_us,
    fmt_x,
    git_describe,
    plots_section,
    pyplot,
    ram_gib,
    report_head,
    save_figure,
    stack,
)
from _servers import Server, memcached_cmd, start_memcached, start_redis

log = make_log("bench_lookup")
DEFAULT_OUT_DIR = REPO / "docs" / "benchmarks"
TABLE = "items"
ZIPF_EXPONENT = 1.05
MISS_RATE = 0.01
BATCHES = (1, 16, 256, 1024)
KINDS = ("int", "str")
POOL_KEYS = 131_072  # keys drawn per client and batch size; calls cycle through them
CHECK_CALLS = 4  # batches per client and cell whose answers are checked against the truth
MIN_CALLS = 30  # a cell runs at least this many calls per client, whatever its time budget
WARM_S = 0.05  # untimed calls per client before each cell
BUILD_CHUNK = 10_000  # keys per MSET / set_many call when loading the servers
REDIS_FLUSH_EVERY = 8  # MSET commands per pipeline round trip when loading Redis
MEMCACHED_OPTIONS = ("-m", "4096", "-I", "2m", "-U", "0")
REPLY_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class System:
    name: str  # short id used on the command line
    label: str  # shown in the report
    how: str  # how it is queried, for the report


SYSTEMS: tuple[System, ...] = (
    System("embkv-mem", "embkv memory", "`embkv.open(/dev/shm/..., readonly=True)[name].get(keys)`"),
    System("embkv-disk", "embkv disk", "the same, store in a temp folder on the ext4 root disk; "
           "every row read once before timing (page cache)"),
    System("memcached", "Memcached", "pymemcache `Client.get_many(str keys)` over TCP, values are "
           "`ndarray.tobytes()`; int keys sent as `str(key)`"),
    System("redis-tcp", "Redis TCP", "redis-py (hiredis parser) `MGET` over TCP loopback; same keys and "
           "values as Memcached"),
    System("redis-unix", "Redis unix", "the same server and client over a unix socket"),
    System("lmdb", "LMDB", "py-lmdb, one read transaction per batch, `txn.get` per key with "
           "`buffers=True` (`getmulti` was 2x slower in a probe); int keys as 8-byte big-endian, str as UTF-8"),
    System("dict", "dict per worker", "every worker holds `{key: np.ndarray row}` (row copies, as unpickling "
           "gives); `np.frombuffer(b''.join(rows))`"),
    System("numpy", "numpy limit", "`matrix[rows]` on an in-process array, rows precomputed (misses -> row 0)"),
)
SYSTEM_BY_NAME = {s.name: s for s in SYSTEMS}
PEERS = ("memcached", "redis-tcp", "redis-unix", "lmdb", "dict")


# ---------------------------------------------------------------------------- data


def make_data(n: int, dim: int, seed: int) -> tuple[IntArray, FloatArray]:
    """N distinct random int64 keys in [0, 2**62) (random order) and their float32 vectors."""
    return random_table(np.random.default_rng(np.random.SeedSequence([seed, dim, 0])), n, dim)


def save_dataset(folder: Path, keys: IntArray, vectors: FloatArray, seed: int, dim: int) -> None:
    """What the client processes read: keys, the truth matrix, rank -> row and the miss keys."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, dim, 1]))
    np.save(folder / "keys.npy", keys)
    np.save(folder / "vectors.npy", vectors)
    np.save(folder / "rank_to_row.npy", rng.permutation(len(keys)).astype(np.int64))
    np.save(folder / "miss_pool.npy", make_miss_pool(rng, keys, max(1024, len(keys) // 100)))


@dataclasses.dataclass
class Pool:
    """One client's draws for one batch size: ``calls`` batches, cycled through while timing."""

    keys: IntArray  # [calls, batch] int64 keys (1% not in the table)
    rows: IntArray  # [calls, batch] truth rows (misses -> row 0)
    miss: BoolArray  # [calls, batch]


def make_pools(data_dir: Path, seed: int, dim: int, client: int, batches: Sequence[int],
               pool_keys: int) -> dict[int, Pool]:
    """Zipf(1.05) batches by inverse CDF, ranks mapped through a random permutation of the keys.

    Seeded by (seed, dim, client, batch): every system sees exactly the same batches.
    """
    keys = np.load(data_dir / "keys.npy", mmap_mode="r")
    rank_to_row = np.load(data_dir / "rank_to_row.npy", mmap_mode="r")
    miss_pool = np.load(data_dir / "miss_pool.npy", mmap_mode="r")
    cdf = zipf_cdf(len(keys), ZIPF_EXPONENT)
    pools = {}
    for b in batches:
        rng = np.random.default_rng(np.random.SeedSequence([seed, dim, 2, client, b]))
        calls = min(32_768, max(64, pool_keys // b))
        rows = np.asarray(rank_to_row[zipf_ranks(rng, cdf, calls * b)], dtype=np.int64)
        miss = rng.random(calls * b) < MISS_RATE
        ikeys = np.asarray(keys[rows], dtype=np.int64)
        ikeys[miss] = rng.choice(np.asarray(miss_pool), int(miss.sum()))
        rows[miss] = 0
        pools[b] = Pool(ikeys.reshape(calls, b), rows.reshape(calls, b), miss.reshape(calls, b))
    return pools


# ---------------------------------------------------------------------------- client side


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """Everything a client process needs (picklable: it crosses the spawn boundary)."""

    system: str
    kind: str  # "int" or "str"
    dim: int
    seed: int
    data_dir: str
    location: str  # store path, LMDB path, "host:port" or a unix socket path
    batches: tuple[int, ...]
    pool_keys: int


class EmbkvClient(Peer):
    def __init__(self, location: str) -> None:
        super().__init__()
        store = embkv.open(location, readonly=True)
        self.table = store[TABLE]
        self.fn = self.table.get
        self._closers.append(store.close)

    def warm(self) -> None:
        keys = self.table.keys()
        for lo in range(0, len(keys), 65_536):
            self.table.get(keys[lo : lo + 65_536])


class NumpyClient(Peer):
    has_found = False

    def __init__(self, data_dir: str) -> None:
        super().__init__()
        self.matrix = np.load(Path(data_dir) / "vectors.npy")
        self.fn = self.matrix.__getitem__


def open_client(spec: ClientSpec) -> Peer:
    """The client of ``spec.system``, connected: what a worker does at startup (timed as the open)."""
    system, names = spec.system, decimal_names if spec.kind == "int" else None
    if system in ("embkv-mem", "embkv-disk"):
        return EmbkvClient(spec.location)
    if system == "memcached":
        return MemcachedPeer(spec.location, spec.dim, names)
    if system in ("redis-tcp", "redis-unix"):
        return RedisPeer(spec.location, spec.dim, names)
    if system == "lmdb":
        return LmdbPeer(spec.location, spec.dim, spec.kind)
    if system == "dict":
        return RowDict(Path(spec.data_dir), spec.dim, spec.kind)
    if system == "numpy":
        return NumpyClient(spec.data_dir)
    raise BenchError(f"unknown system {system!r}")


# client libraries, imported before the open is timed (embkv and numpy are imported at the top)
PRELOAD = {"memcached": "pymemcache.client.base", "redis-tcp": "redis", "redis-unix": "redis", "lmdb": "lmdb"}


def cell_items(spec: ClientSpec, pool: Pool) -> list[Any]:
    """The batches as the user holds them: int64 arrays, lists of str, or rows for numpy."""
    if spec.system == "numpy":
        return list(pool.rows)
    if spec.kind == "int":
        return list(pool.keys)
    return [[str_key(k) for k in row] for row in pool.keys.tolist()]


def check_cell(client: Peer, spec: ClientSpec, items: list[Any], pool: Pool, index: int) -> int:
    """Compare the first batches' answers with the truth matrix; raise BenchError on any difference."""
    truth = np.load(Path(spec.data_dir) / "vectors.npy", mmap_mode="r")
    checked = 0
    try:
        for i in range(min(CHECK_CALLS, len(items))):
            want = np.asarray(truth[pool.rows[i]])
            where = f"{spec.system} {spec.kind} dim {spec.dim} batch {pool.rows.shape[1]} client {index} call {i}"
            res = client.fn(items[i])
            if not client.has_found:
                if not np.array_equal(res, want):
                    raise BenchError(f"{where}: gathered rows differ from the truth")
                checked += len(want)
                continue
            got, found = res
            if got.shape != want.shape or got.dtype != np.float32:
                raise BenchError(f"{where}: got {got.dtype} {got.shape}, want float32 {want.shape}")
            if not np.array_equal(found, ~pool.miss[i]):
                raise BenchError(f"{where}: found flags wrong at positions "
                                 f"{np.flatnonzero(found != ~pool.miss[i])[:8].tolist()}")
            if not np.array_equal(got[found], want[found]):
                raise BenchError(f"{where}: found vectors differ from the truth")
            checked += len(found)
    finally:
        del truth
    return checked


def timed_calls(fn: LookupFn, items: list[Any], start_ns: int, budget_ns: int) -> tuple[IntArray, int, int]:
    """Call ``fn`` on ``items`` (cycling) from ``start_ns`` for ``budget_ns``; per-call latencies in ns."""
    pc = time.perf_counter_ns
    wait = (start_ns - pc()) / 1e9 - 0.002
    if wait > 0:
        time.sleep(wait)
    while pc() < start_ns:
        pass
    deadline = start_ns + budget_ns
    lat: list[int] = []
    app = lat.append
    gc.disable()
    try:
        t_begin = t1 = pc()
        done = False
        while not done:
            for keys in items:
                t0 = pc()
                fn(keys)
                t1 = pc()
                app(t1 - t0)
                if t1 >= deadline and len(lat) >= MIN_CALLS:
                    done = True
                    break
    finally:
        gc.enable()
    return np.array(lat, dtype=np.int64), t_begin, t1


def client_main(conn: Connection, spec: ClientSpec, index: int) -> None:
    """A worker process: answers the parent's commands over ``conn`` until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    client: Peer | None = None
    items: list[Any] = []
    try:
        if spec.system in PRELOAD:
            importlib.import_module(PRELOAD[spec.system])
        pools = make_pools(Path(spec.data_dir), spec.seed, spec.dim, index, spec.batches, spec.pool_keys)
        gc.collect()
        malloc_trim()
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            op = msg[0]
            if op == "open":
                t0 = time.perf_counter()
                client = open_client(spec)
                open_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                client.warm()
                conn.send(("opened", open_s, time.perf_counter() - t0))
            elif op == "prepare":
                assert client is not None
                pool = pools[msg[1]]
                items = cell_items(spec, pool)
                checked = check_cell(client, spec, items, pool, index)
                fn, t_end = client.fn, time.perf_counter() + WARM_S
                for keys in items:
                    fn(keys)
                    if time.perf_counter() > t_end:
                        break
                conn.send(("prepared", checked))
            elif op == "run":
                assert client is not None
                lat, t_begin, t_end_ns = timed_calls(client.fn, items, msg[1], msg[2])
                conn.send(("done", lat, t_begin, t_end_ns))
            elif op == "trim":
                items = []
                gc.collect()
                malloc_trim()
                conn.send(("trimmed",))
            elif op == "close":
                if client is not None:
                    client.close()
                conn.send(("closed",))
                return
            else:
                raise BenchError(f"unknown command {op!r}")
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"client {index} ({spec.system}, {spec.kind}, dim {spec.dim}): "
                                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


# ---------------------------------------------------------------------------- parent side: clients


class ClientPool:
    """``count`` spawned client processes for one (system, key kind, dim)."""

    def __init__(self, spec: ClientSpec, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for i in range(count):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(target=client_main, args=(child_end, spec, i), daemon=True,
                                name=f"bench-lookup-{spec.system}-{i}")
                p.start()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(p)
            self.ask(range(count), None)  # wait for every "ready"
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs]

    def ask(self, which: Iterator[int] | Sequence[int] | range, msg: tuple[Any, ...] | None) -> list[tuple[Any, ...]]:
        """Send ``msg`` to the clients in ``which`` (all at once), then collect their replies."""
        idx = list(which)
        if msg is not None:
            for i in idx:
                self.conns[i].send(msg)
        replies = []
        for i in idx:
            conn = self.conns[i]
            if not conn.poll(REPLY_TIMEOUT_S):
                raise BenchError(f"client {i} gave no answer in {REPLY_TIMEOUT_S:.0f} s")
            try:
                reply = conn.recv()
            except EOFError:
                raise BenchError(f"client {i} died (exit code {self.procs[i].exitcode})") from None
            if reply[0] == "error":
                raise BenchError(reply[1])
            replies.append(reply)
        return replies

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("close",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()


@dataclasses.dataclass
class Cell:
    system: str
    kind: str  # "int", "str" ("any" for numpy)
    dim: int
    batch: int
    clients: int
    lat_ns: IntArray  # per call, pooled over clients
    vectors_per_s: float

    @property
    def p50_us(self) -> float:
        return pct_us(self.lat_ns, 50)

    @property
    def p99_us(self) -> float:
        return pct_us(self.lat_ns, 99)


@dataclasses.dataclass
class Group:
    """One (system, key kind, dim): its cells plus build, open and memory figures."""

    system: str
    kind: str
    dim: int
    n: int
    build_s: float | None
    open_s: list[float]  # per fresh client process, opened one after the other
    warm_s: list[float]
    workers: int
    baseline_pss: list[int]  # per client, after imports and drawing its batches, before opening
    client_pss: list[int]  # per client, after all cells, the system still open
    server_pss: int
    keys_checked: int
    cells: list[Cell]

    @property
    def total_pss(self) -> int:
        return sum(self.client_pss) + self.server_pss

    @property
    def beyond_baseline(self) -> int:
        """What holding the system costs: total PSS less the clients' PSS before opening it."""
        return max(1, self.total_pss - sum(self.baseline_pss))


def run_group(spec: ClientSpec, clients: Sequence[int], budget_s: float, server_pids: Sequence[int],
              build_s: float | None, n: int) -> Group:
    workers = max(clients)
    kind = "any" if spec.system == "numpy" else spec.kind
    log(f"  {spec.system:<10} {kind:<3} dim {spec.dim}: {workers} client(s)")
    pool = ClientPool(spec, workers)
    try:
        baseline = [pss(pid) for pid in pool.pids]
        opened = [pool.ask([i], ("open",))[0] for i in range(workers)]  # one at a time: a fair open time
        cells: list[Cell] = []
        checked = 0
        for c in clients:
            for b in spec.batches:
                who = range(c)
                checked += sum(int(r[1]) for r in pool.ask(who, ("prepare", b)))
                start = time.perf_counter_ns() + 20_000_000
                done = pool.ask(who, ("run", start, int(budget_s * 1e9)))
                lat = np.concatenate([r[1] for r in done])
                span = max(int(r[3]) for r in done) - min(int(r[2]) for r in done)
                cells.append(Cell(spec.system, kind, spec.dim, b, c, lat, lat.size * b / (span / 1e9)))
        pool.ask(range(workers), ("trim",))
        time.sleep(0.1)
        client_pss = [pss(pid) for pid in pool.pids]
        server_pss = sum(pss(pid) for pid in server_pids)
    finally:
        pool.close()
    return Group(spec.system, kind, spec.dim, n, build_s, [float(r[1]) for r in opened],
                 [float(r[2]) for r in opened], workers, baseline, client_pss, server_pss, checked, cells)


# ---------------------------------------------------------------------------- servers and builds


def build_embkv(path: Path, keys: IntArray, vectors: FloatArray, kind: str) -> float:
    """``store.load_table`` (int64 array or list of str keys); returns seconds."""
    store = embkv.open(path)
    names: Any = keys if kind == "int" else twin_names(keys)
    t0 = time.perf_counter()
    store.load_table(TABLE, names, vectors)
    secs = time.perf_counter() - t0
    store.close()
    return secs


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Results:
    groups: list[Group]
    dims: dict[int, int]  # dim -> N
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    file_bytes: dict[tuple[int, str], int]  # (dim, kind) -> embkv table file size

    def cell(self, system: str, kind: str, dim: int, batch: int, clients: int) -> Cell | None:
        want = "any" if system == "numpy" else kind
        for g in self.groups:
            if g.system == system and g.kind == want and g.dim == dim:
                for c in g.cells:
                    if c.batch == batch and c.clients == clients:
                        return c
        return None

    def group(self, system: str, kind: str, dim: int) -> Group | None:
        want = "any" if system == "numpy" else kind
        return next((g for g in self.groups if g.system == system and g.kind == want and g.dim == dim), None)


def run(args: argparse.Namespace) -> Results:
    git_describe()  # pinned before this run writes its report and plots into the tree
    start = time.perf_counter()
    load_before = os.getloadavg()
    groups: list[Group] = []
    file_bytes: dict[tuple[int, str], int] = {}
    systems = [s for s in SYSTEMS if s.name in args.systems]
    budget = args.budget
    # a temp folder on disk and one in /dev/shm, removed at the end whatever happens (SIGTERM too)
    with scratch("embkv-bench-lookup-", None, "/dev/shm") as (disk, shm):
        for dim in args.dims:
            n = args.n if dim <= 64 else args.n_wide
            log(f"dim {dim}: generating {n:,} keys and vectors (seed {args.seed})")
            keys, vectors = make_data(n, dim, args.seed)
            data_dir = disk / f"data-{dim}"
            save_dataset(data_dir, keys, vectors, args.seed, dim)

            def spec(system: str, kind: str, location: str, dim: int = dim, data_dir: Path = data_dir) -> ClientSpec:
                return ClientSpec(system, kind, dim, args.seed, str(data_dir), location, tuple(args.batches),
                                  args.pool_keys)

            if "numpy" in args.systems:
                groups.append(run_group(spec("numpy", "int", ""), args.clients, budget, [], None, n))
            for kind in KINDS:
                servers: list[Server] = []
                try:
                    builds: dict[str, float] = {}
                    locations: dict[str, str] = {}
                    server_of: dict[str, list[int]] = {}
                    if "embkv-mem" in args.systems:
                        path = shm / f"d{dim}-{kind}"
                        builds["embkv-mem"] = build_embkv(path, keys, vectors, kind)
                        locations["embkv-mem"] = str(path)
                        file_bytes[(dim, kind)] = (path / f"{TABLE}.ekv").stat().st_size
                    if "embkv-disk" in args.systems:
                        path = disk / f"embkv-d{dim}-{kind}"
                        builds["embkv-disk"] = build_embkv(path, keys, vectors, kind)
                        locations["embkv-disk"] = str(path)
                        file_bytes.setdefault((dim, kind), (path / f"{TABLE}.ekv").stat().st_size)
                    if "lmdb" in args.systems:
                        path = disk / f"lmdb-d{dim}-{kind}"
                        builds["lmdb"] = load_lmdb(path, keys, vectors, kind)
                        locations["lmdb"] = str(path)
                    names = decimal_names if kind == "int" else twin_names  # what the servers hold
                    if "memcached" in args.systems:
                        mc = start_memcached(disk, MEMCACHED_OPTIONS)
                        servers.append(mc)
                        builds["memcached"] = load_memcached(mc.address, keys, vectors, names, BUILD_CHUNK)
                        locations["memcached"] = mc.address
                        server_of["memcached"] = [mc.pid]
                    if {"redis-tcp", "redis-unix"} & set(args.systems):
                        folder = disk / f"redis-d{dim}-{kind}"
                        folder.mkdir()
                        rs = start_redis(folder, unix_socket=True)
                        servers.append(rs)
                        builds["redis-tcp"] = builds["redis-unix"] = load_redis(
                            str(rs.unix_socket), keys, vectors, names, BUILD_CHUNK, REDIS_FLUSH_EVERY)
                        locations["redis-tcp"] = rs.address
                        locations["redis-unix"] = str(rs.unix_socket)
                        server_of["redis-tcp"] = server_of["redis-unix"] = [rs.pid]
                    log(f"dim {dim} {kind} keys: built " + ", ".join(f"{k} {v:.1f} s" for k, v in builds.items()))
                    gc.collect()
                    for system in systems:
                        if system.name == "numpy":
                            continue
                        groups.append(run_group(spec(system.name, kind, locations.get(system.name, "")),
                                                args.clients, budget, server_of.get(system.name, []),
                                                builds.get(system.name), n))
                finally:
                    for s in servers:
                        s.stop()
                for name in ("embkv-mem", "embkv-disk", "lmdb"):
                    if name in locations:
                        shutil.rmtree(locations[name], ignore_errors=True)
            del keys, vectors
            shutil.rmtree(data_dir, ignore_errors=True)
            gc.collect()
    return Results(groups, {d: (args.n if d <= 64 else args.n_wide) for d in args.dims},
                   time.perf_counter() - start, load_before, os.getloadavg(), file_bytes)


# ---------------------------------------------------------------------------- report


def machine_and_versions() -> list[str]:
    import lmdb

    redis_v = first_line(["redis-server", "--version"], missing="not found")
    redis_v = next((p[2:] for p in redis_v.split() if p.startswith("v=")), redis_v)
    return [
        f"- Machine: {cpu_model()}; {cores()}; RAM {ram_gib()}; {platform.platform()}",
        f"- Versions: {stack()} (kernel `{embkv.KERNEL_BACKEND}`, git `{git_describe()}`), redis-server {redis_v}, "
        f"{first_line(['memcached', '-V'], missing='not found')}, redis-py {dist_version('redis')} "
        f"(hiredis {dist_version('hiredis')}), pymemcache {dist_version('pymemcache')}, py-lmdb "
        f"{dist_version('lmdb')} (LMDB {'.'.join(map(str, lmdb.version()))})",
    ]


def p50_ratio(res: Results, num: str, den: str, kind: str, dim: int, batch: int) -> float | None:
    a, b = res.cell(num, kind, dim, batch, 1), res.cell(den, kind, dim, batch, 1)
    return None if a is None or b is None else a.p50_us / b.p50_us


def targets(res: Results, dim: int, kind: str) -> list[Target]:
    at = f"dim {dim}, {kind} keys, 1 client"
    out = [
        Target(f"embkv memory vs Memcached, batch 256, p50 speedup ({at})",
               p50_ratio(res, "memcached", "embkv-mem", kind, dim, 256), 30, True),
        Target(f"embkv memory vs Redis TCP, batch 256, p50 speedup ({at})",
               p50_ratio(res, "redis-tcp", "embkv-mem", kind, dim, 256), 15, True),
        Target(f"embkv memory vs LMDB, batch 256, p50 speedup ({at})",
               p50_ratio(res, "lmdb", "embkv-mem", kind, dim, 256), 10, True),
        Target(f"embkv memory / numpy limit, batch 256, p50 ({at})",
               p50_ratio(res, "embkv-mem", "numpy", kind, dim, 256), 2, False),
        Target(f"embkv memory vs Memcached, batch 1, p50 speedup ({at})",
               p50_ratio(res, "memcached", "embkv-mem", kind, dim, 1), 5, True),
        Target(f"embkv memory / numpy limit, batch 1, p50 ({at})",
               p50_ratio(res, "embkv-mem", "numpy", kind, dim, 1), 2.5, False),
    ]
    ge, gd = res.group("embkv-mem", kind, dim), res.group("dict", kind, dim)
    mem = None if ge is None or gd is None else ge.total_pss / gd.total_pss
    workers = ge.workers if ge is not None else 0
    out.append(Target(f"memory, {workers} worker{'s' if workers != 1 else ''}: embkv memory / dict per worker, "
                      f"sum of PSS, clients + server (dim {dim}, {kind} keys)", mem, 1 / 3, False))
    return out


def speedup_lines(res: Results, dim: int, kind: str) -> list[str]:
    """'embkv memory is 35x faster than Memcached at batch 256' sentences, 1 client."""
    out = []
    for b in (1, 256):
        parts = []
        for peer in PEERS:
            r = p50_ratio(res, peer, "embkv-mem", kind, dim, b)
            if r is not None:
                word = "faster" if r >= 1 else "slower"
                parts.append(f"{fmt_x(r if r >= 1 else 1 / r)} {word} than {SYSTEM_BY_NAME[peer].label}")
        lim = p50_ratio(res, "embkv-mem", "numpy", kind, dim, b)
        if lim is not None:
            parts.append(f"{fmt_x(lim)} the numpy limit's time")
        if parts:
            out.append(f"- dim {dim}, {kind} keys, batch {b}, 1 client: embkv memory is " + "; ".join(parts) + ".")
    return out


def report(args: argparse.Namespace, res: Results, plots: list[str]) -> str:
    out: list[str] = []
    add = out.append
    dims = list(res.dims)
    clients = list(args.clients)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    out.extend(report_head("embkv lookup benchmark: embkv vs Memcached, Redis, LMDB, a dict per worker, and the "
                           "numpy limit", "bench_lookup.py", args.quick, res.wall_s))
    add("## Summary: targets")
    add("")
    head_dim = 64 if 64 in dims else dims[0]
    add(f"Measured at dim {head_dim}, N = {res.dims[head_dim]:,}, one client process (p50 latency per batch), "
        "for both key kinds. A speedup is the peer's p50 over embkv memory's p50.")
    add("")
    add("| target | measured | target | result |")
    add("|---|---:|---:|---|")
    for kind in KINDS:
        out.extend(t.row() for t in targets(res, head_dim, kind))
    checked = sum(g.keys_checked for g in res.groups)
    add(f"| correctness: every system's answers on sampled batches equal the truth | {checked:,} keys checked, "
        "0 differences | 0 | PASS |")
    add("")
    for dim in dims:
        for kind in KINDS:
            out.extend(speedup_lines(res, dim, kind))
    add("")
    add("## Setup")
    add("")
    add(command_item())
    out.extend(machine_and_versions())
    add(f"- Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in res.load_before)}; at end "
        f"{', '.join(f'{x:.2f}' for x in res.load_after)}. All clients and servers share the "
        f"{os.cpu_count()} cores: with 4 clients plus a server process the CPUs are oversubscribed, so the "
        "multi-client figures show contention as much as scaling."
        + (" **The machine was not idle at the start (1-min load above 0.5): other work shared the CPUs, "
           "so figures are noisier than on an idle machine.**" if res.load_before[0] > 0.5 else ""))
    sizes = "; ".join(f"dim {d}: N = {n:,} ({n * d * 4 / MB:.0f} MiB of float32 vectors)" for d, n in res.dims.items())
    add(f"- Data: N distinct random int64 keys from [0, 2^62), standard-normal float32 vectors, seed {args.seed}. "
        f"{sizes}." + (" dim 256 uses a smaller N to keep the run within ~10 minutes and a few GB of RAM."
                       if any(d > 64 for d in dims) and args.n_wide < args.n else ""))
    add("- Key kinds: *int* (the user holds an int64 numpy array) and *str* (`f\"item:{key}\"`, a Python list "
        "of str). Each system gets the keys that way; converting them to what it needs (e.g. `str(key)` for "
        "Memcached and Redis, 8-byte big-endian for LMDB) is part of the timed call, and so is decoding the "
        "answer into a `[B, dim]` float32 array plus a found mask.")
    add(f"- Batches: {', '.join(map(str, args.batches))} keys; ranks drawn Zipf({ZIPF_EXPONENT}) over the N keys "
        f"by inverse CDF (searchsorted of uniform draws on the normalised cumsum of 1/k^{ZIPF_EXPONENT}), rank -> "
        f"random permutation of the keys, {MISS_RATE:.0%} of positions replaced by keys not in the data. Each "
        f"client draws its own batches ({args.pool_keys:,} keys per batch size, cycled), seeded by "
        "(seed, dim, client, batch): every system answers the same batches.")
    add(f"- Clients: {', '.join(map(str, clients))} processes (`multiprocessing` spawn). Per cell "
        f"(system, key kind, dim, batch, clients) each active client checks {CHECK_CALLS} batches against the "
        f"truth matrix, warms up for {WARM_S * 1000:.0f} ms, then all start together and call for "
        f"{args.budget:.2f} s (at least {MIN_CALLS} calls), each call timed with `time.perf_counter_ns`, GC "
        "off. p50/p99: per-call latency pooled over the clients. vectors/s: all vectors returned by all "
        "clients over the wall time from the first start to the last finish.")
    add("- Servers: started by the benchmark on 127.0.0.1, a fresh one per (dim, key kind): "
        f"`redis-server --port P --unixsocket S --save '' --appendonly no`; "
        f"`{shlex.join(memcached_cmd(0, MEMCACHED_OPTIONS))}` (P = a free port).")
    add("- Build: loading the N vectors from numpy arrays into the system (keys converted inside the timing). "
        f"embkv: `store.load_table`; Redis: pipelined `MSET` of {BUILD_CHUNK:,} keys per command over the unix "
        f"socket; Memcached: `set_many` of {BUILD_CHUNK:,} keys, waiting for the replies; LMDB: sort, "
        "`putmulti(append=True)` in one transaction, `sync`. The dict and numpy are built in each worker: see "
        "open time.")
    add("- Open: a fresh client process opening the store / connecting (Redis: connect + PING; Memcached: "
        "first `get`; LMDB: `lmdb.open` + a first transaction; dict: load keys and vectors from `.npy` "
        "and build the dict; numpy: `np.load` of the matrix), median over the client processes, "
        "opened one after the other.")
    add("- Memory: sum of PSS (`psutil.Process.memory_full_info().pss`) over the client processes (all of "
        "them alive, after every cell, the system still open) plus the server process. embkv and LMDB "
        "clients read every row once after opening, so their mappings are fully resident and counted. "
        "*baseline* is the clients' PSS before opening anything (interpreter, numpy, the drawn batches).")
    add("")
    add("### Systems")
    add("")
    add("| system | how it is queried |")
    add("|---|---|")
    out.extend(f"| {s.label} | {s.how} |" for s in systems)
    add("")
    add("## Speedup of embkv memory over each system (peer p50 / embkv memory p50, 1 client)")
    add("")
    add("Values above 1 mean embkv memory is faster; the numpy row is below 1 by how far embkv is from the limit.")
    add("")
    for dim in dims:
        for kind in KINDS:
            add(f"**dim {dim}, {kind} keys**")
            add("")
            add("| system | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
            add("|---|" + "---:|" * len(args.batches))
            for s in systems:
                if s.name == "embkv-mem":
                    continue
                cells = [p50_ratio(res, s.name, "embkv-mem", kind, dim, b) for b in args.batches]
                add(f"| {s.label} | " + " | ".join("-" if c is None else fmt_x(c) for c in cells) + " |")
            add("")
    add("## Latency (µs per batch) and throughput (vectors/s, all clients)")
    add("")
    for dim in dims:
        for kind in KINDS:
            add(f"### dim {dim}, {kind} keys (N = {res.dims[dim]:,})")
            add("")
            hdr = "| system | batch |"
            for c in clients:
                hdr += f" p50 {c}c | p99 {c}c | vec/s {c}c |"
            add(hdr + " p50 / numpy (1c) |")
            add("|---|---:|" + "---:|---:|---:|" * len(clients) + "---:|")
            for s in systems:
                for b in args.batches:
                    row = f"| {s.label} | {b} |"
                    for c in clients:
                        cell = res.cell(s.name, kind, dim, b, c)
                        row += (" - | - | - |" if cell is None else
                                f" {fmt_us(cell.p50_us)} | {fmt_us(cell.p99_us)} | {fmt_rate(cell.vectors_per_s)} |")
                    lim = p50_ratio(res, s.name, "numpy", kind, dim, b)
                    add(row + (" - |" if lim is None else f" {fmt_x(lim)} |"))
            add("")
    workers = max(clients)
    add(f"## Memory ({workers} worker{'s' if workers > 1 else ''}), build and open")
    add("")
    for dim in dims:
        for kind in KINDS:
            fb = res.file_bytes.get((dim, kind))
            raw = res.dims[dim] * dim * 4
            add(f"**dim {dim}, {kind} keys**: raw vectors {raw / MB:.0f} MiB"
                + (f"; embkv table file {fb / MB:.0f} MiB" if fb else ""))
            add("")
            add("| system | build (s) | open (ms, median) | clients PSS (MiB) | of which baseline | server PSS (MiB) "
                "| total PSS (MiB) | total / embkv memory | beyond baseline (MiB) | beyond baseline / embkv memory |")
            add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            ref = res.group("embkv-mem", kind, dim)
            for s in systems:
                g = res.group(s.name, kind, dim)
                if g is None:
                    continue
                build = "in each worker" if g.build_s is None else f"{g.build_s:.2f}"
                rel = "-" if ref is None else fmt_x(g.total_pss / ref.total_pss)
                rel_extra = "-" if ref is None else fmt_x(g.beyond_baseline / ref.beyond_baseline)
                add(f"| {s.label} | {build} | {1000 * float(np.median(g.open_s)):.1f} | {sum(g.client_pss) / MB:.0f} "
                    f"| {sum(g.baseline_pss) / MB:.0f} | {g.server_pss / MB:.0f} | {g.total_pss / MB:.0f} | {rel} "
                    f"| {g.beyond_baseline / MB:.0f} | {rel_extra} |")
            add("")
    add("## Correctness")
    add("")
    add(f"Every cell's first {CHECK_CALLS} batches per client were compared with the truth matrix: found flags "
        "exactly equal to the expected hits and misses, found vectors bit-identical (the numpy gather against "
        "the truth rows). A difference aborts the run, so a report exists only if all matched.")
    add("")
    add("| system | " + " | ".join(f"dim {d} {k}" for d in dims for k in KINDS) + " |")
    add("|---|" + "---:|" * (len(dims) * len(KINDS)))
    for s in systems:
        vals = []
        for d in dims:
            for k in KINDS:
                g = res.group(s.name, k, d)
                vals.append("-" if g is None else f"{g.keys_checked:,} keys")
        add(f"| {s.label} | " + " | ".join(vals) + " |")
    add("")
    out.extend(plots_section(plots))
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots


def write_plots(args: argparse.Namespace, res: Results, out_dir: Path) -> list[str]:
    plt = pyplot()
    systems = [s for s in SYSTEMS if s.name in args.systems]
    panels = [(d, k) for d in res.dims for k in KINDS]
    ncols = len(KINDS)
    nrows = len(res.dims)
    names: list[str] = []
    markers = "os^vD<>x"

    def panel_grid(title: str) -> tuple[Any, list[Any]]:
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.5 * nrows + 0.8), squeeze=False)
        fig.suptitle(title)
        return fig, [ax for row in axes for ax in row]

    def finish(fig: Any, axes: list[Any], name: str) -> None:
        """One legend for all panels, below them; save as ``name``."""
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
        save_figure(fig, out_dir / name, rect=(0, 0.8 / (4.5 * nrows + 0.8), 1, 1))
        names.append(name)

    fig, axes = panel_grid("p50 latency per batch vs batch size (1 client)")
    for ax, (dim, kind) in zip(axes, panels, strict=True):
        for i, s in enumerate(systems):
            pts = [(b, c.p50_us) for b in args.batches if (c := res.cell(s.name, kind, dim, b, 1)) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers[i % len(markers)], label=s.label)
        ax.set(xscale="log", yscale="log", xlabel="keys per batch", ylabel="p50 µs per batch",
               title=f"dim {dim}, {kind} keys, N = {res.dims[dim]:,}")
        ax.grid(True, which="both", alpha=0.3)
    finish(fig, axes, "lookup_latency.png")

    tb = 256 if 256 in args.batches else args.batches[-1]
    fig, axes = panel_grid(f"throughput vs client processes (batch {tb})")
    for ax, (dim, kind) in zip(axes, panels, strict=True):
        for i, s in enumerate(systems):
            pts = [(c, cell.vectors_per_s) for c in args.clients
                   if (cell := res.cell(s.name, kind, dim, tb, c)) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers[i % len(markers)], label=s.label)
        ax.set(yscale="log", xlabel="client processes", ylabel="vectors/s (all clients)",
               title=f"dim {dim}, {kind} keys", xticks=list(args.clients))
        ax.grid(True, which="both", alpha=0.3)
    finish(fig, axes, "lookup_throughput.png")

    workers = max(args.clients)
    fig, axes = panel_grid(f"memory: sum of PSS over {workers} client process(es) + server")
    for ax, (dim, kind) in zip(axes, panels, strict=True):
        labels, base_mb, client_mb, server_mb = [], [], [], []
        for s in systems:
            g = res.group(s.name, kind, dim)
            if g is not None:
                labels.append(s.label)
                base_mb.append(sum(g.baseline_pss) / MB)
                client_mb.append(max(0, sum(g.client_pss) - sum(g.baseline_pss)) / MB)
                server_mb.append(g.server_pss / MB)
        x = np.arange(len(labels))
        ax.bar(x, base_mb, color="lightgray", label="clients: baseline (interpreter, numpy, batches)")
        ax.bar(x, client_mb, bottom=base_mb, label="clients: beyond baseline")
        ax.bar(x, server_mb, bottom=np.add(base_mb, client_mb), label="server")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="MiB", title=f"dim {dim}, {kind} keys, N = {res.dims[dim]:,}")
        ax.grid(True, axis="y", alpha=0.3)
    finish(fig, axes, "lookup_memory.png")
    return names


# ---------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="embkv side-by-side lookup benchmark: embkv (memory and disk) against Memcached, Redis "
        "(TCP and unix socket), LMDB, a dict copy per worker and the numpy gather limit. Int and str keys, "
        "Zipf(1.05) batches with 1% misses, 1-4 client processes; p50/p99 latency, vectors/s, memory (PSS), "
        "build and open time; every answer sample-checked against the truth. Prints a markdown report and "
        "writes it with PNG plots to docs/benchmarks/ (lookup.md, lookup_*.png) unless --no-write.",
        epilog="Needs redis-server and memcached on PATH (apt-get install redis-server memcached) and the "
        "Python packages redis, hiredis, pymemcache, lmdb, matplotlib, psutil.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N=20,000, dim 64 only, 1 client, short cells; under a minute")
    p.add_argument("--no-write", action="store_true", help="print the report, write no file")
    p.add_argument("--n", type=int, default=None, help="rows for dim 64 (default 1,000,000; 20,000 with --quick)")
    p.add_argument("--n-wide", type=int, default=None,
                   help="rows for dim 256 (default 250,000, to fit the run in ~10 minutes; min(--n, ...) with --quick)")
    p.add_argument("--dims", type=_int_list, default=None, help="vector widths, comma-separated (default 64,256; "
                   "64 with --quick); widths above 64 use --n-wide rows")
    p.add_argument("--clients", type=_int_list, default=None,
                   help="client process counts, comma-separated (default 1,2,4; 1 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per cell and client (default 0.4; 0.1 with --quick)")
    p.add_argument("--pool-keys", type=int, default=None,
                   help="keys drawn per client and batch size, cycled while timing (default 131072; 32768 quick)")
    p.add_argument("--systems", default=",".join(s.name for s in SYSTEMS),
                   help="systems to run, comma-separated (targets they need show n/a when left out)")
    p.add_argument("--seed", type=int, default=0, help="seed for keys, vectors, misses and batches")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where lookup.md and lookup_*.png go")
    args = p.parse_args(argv)
    args.n = args.n if args.n is not None else (20_000 if args.quick else 1_000_000)
    args.n_wide = args.n_wide if args.n_wide is not None else (min(args.n, 20_000) if args.quick else 250_000)
    args.dims = args.dims if args.dims is not None else ([64] if args.quick else [64, 256])
    args.clients = sorted(set(args.clients if args.clients is not None else ([1] if args.quick else [1, 2, 4])))
    args.budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.4)
    args.pool_keys = args.pool_keys if args.pool_keys is not None else (32_768 if args.quick else POOL_KEYS)
    args.batches = list(BATCHES)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEM_BY_NAME))
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {[s.name for s in SYSTEMS]}")
    if min(args.n, args.n_wide) < 1000:
        p.error("--n and --n-wide must be >= 1000")
    if args.budget <= 0:
        p.error("--budget must be positive")
    if 1 not in args.clients:
        p.error("--clients must include 1 (latencies and targets are read at 1 client)")
    needs = {"redis-tcp": "redis-server", "redis-unix": "redis-server", "memcached": "memcached"}
    missing = sorted({b for s, b in needs.items() if s in args.systems and shutil.which(b) is None})
    if missing:
        p.error(f"{', '.join(missing)} not found on PATH: apt-get install -y redis-server memcached "
                "(or leave those systems out with --systems)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
    except BenchError as exc:
        log(f"ABORTED: {exc}")
        return 2
    plots: list[str] = []
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(args, res, args.out_dir)
    text = report(args, res, plots)
    print(text)
    if not args.no_write:
        (args.out_dir / "lookup.md").write_text(text + "\n")
        log(f"wrote {args.out_dir / 'lookup.md'} and {', '.join(plots)}")
    log(f"done in {time.perf_counter() - START:.0f} s")
    return 0


START = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
