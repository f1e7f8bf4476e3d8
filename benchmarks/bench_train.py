#!/usr/bin/env python
"""Training throughput: a matrix-factorization model trained on embkv training tables, next to the
same model with its tables in process memory (the limit), in numpy.memmap, RocksDB, LMDB and Redis.

Every backend runs the same steps with the same float32 arithmetic (the Adagrad of embkv.train),
so every backend must produce the same loss curve, checked here: none can skip work. A step:
1,024 positive (user, item) pairs with ids drawn Zipf(1.05), 4 uniform negative items each,
logistic loss on dot products, Adagrad on the rows touched (duplicates summed).

    python benchmarks/bench_train.py            # 2M users, 500k items, dim 64: docs/benchmarks/train.md
    python benchmarks/bench_train.py --quick    # 100k users, 25k items: a smoke run, prints only

Parts: (1) every backend with the tables in the page cache; (2) embkv with a hot cache of a
quarter of the tables vs RocksDB, the rest cold (``posix_fadvise(DONTNEED)`` on every file
first); (3) embkv with prefetch on and off, and pipelined (pushes on a second thread) at
staleness 0, 4 and 16; trainer memory (RSS) beside each.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import embkv
from _common import REPO, make_log, scratch, zipf_cdf, zipf_ranks
from _report import Target, command_item, fmt_2f, git_describe, machine_lines, report_head, write_report
from embkv.train import Adagrad, TrainingTable, sum_duplicates
from embkv.train.cache import slot_bytes
from embkv.train.init import initial_vectors

DEFAULT_OUT = REPO / "docs" / "benchmarks" / "train.md"
POSITIVES, NEGATIVES = 1024, 4
log = make_log("bench_train")
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # user ids, item ids, labels (one per pair)


def make_batches(n_users: int, n_items: int, steps: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    ucdf, icdf = zipf_cdf(n_users, 1.05), zipf_cdf(n_items, 1.05)
    uperm, iperm = rng.permutation(n_users), rng.permutation(n_items)  # rank -> id
    out = []
    for _ in range(steps):
        u = uperm[zipf_ranks(rng, ucdf, POSITIVES)]
        pos = iperm[zipf_ranks(rng, icdf, POSITIVES)]
        neg = rng.integers(0, n_items, (POSITIVES, NEGATIVES))
        users = np.repeat(u, 1 + NEGATIVES).astype(np.int64)
        items = np.concatenate([pos[:, None], neg], axis=1).reshape(-1).astype(np.int64)
        labels = np.tile(np.r_[1.0, np.zeros(NEGATIVES)], POSITIVES).astype(np.float32)
        out.append((users, items, labels))
    return out


def model_step(pu: np.ndarray, qi: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Logistic loss of dot products; returns (loss, grad of user rows, grad of item rows)."""
    logits = np.einsum("ij,ij->i", pu, qi)
    p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    loss = float(np.mean(np.logaddexp(0, logits) - y * logits))
    g = ((p - y) / np.float32(len(y)))[:, None]
    return loss, (g * qi).astype(np.float32), (g * pu).astype(np.float32)


# ---------------------------------------------------------------------------- backends


class RowBackend:
    """A store of rows ``weights | Adagrad state`` by id; pull keeps the rows for the push."""

    name = ""

    def __init__(self, dim: int, opt: Adagrad) -> None:
        self.dim, self.opt, self.step_no = dim, opt, 0
        self._pulled: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, kind: str, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def write(self, kind: str, ids: np.ndarray, rows: np.ndarray) -> None:
        raise NotImplementedError

    def pull(self, kind: str, ids: np.ndarray, next_ids: np.ndarray | None = None) -> np.ndarray:
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = self.read(kind, uniq)
        self._pulled[kind] = (uniq, rows)
        result: np.ndarray = rows[inverse, : self.dim]
        return result

    def push(self, kind: str, ids: np.ndarray, grads: np.ndarray) -> None:
        uniq, summed = sum_duplicates(ids, grads)
        pulled, rows = self._pulled.pop(kind)
        assert np.array_equal(pulled, uniq)
        if kind == "users":
            self.step_no += 1
        w, s = rows[:, : self.dim].copy(), rows[:, self.dim :].copy()
        self.opt.update(w, s, summed, self.step_no)
        rows[:, : self.dim], rows[:, self.dim :] = w, s
        self.write(kind, uniq, rows)

    def close(self) -> None:
        pass


def initial_rows(ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    rows = np.zeros((len(ids), 2 * dim), dtype=np.float32)
    rows[:, :dim] = initial_vectors(ids, dim, 0.01, seed)
    return rows


class NumpyBackend(RowBackend):
    name = "numpy in memory (the limit)"

    def __init__(self, dim: int, opt: Adagrad, sizes: dict[str, int], seed: int) -> None:
        super().__init__(dim, opt)
        self.rows = {k: initial_rows(np.arange(n), dim, seed + j) for j, (k, n) in enumerate(sizes.items())}

    def read(self, kind: str, ids: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.rows[kind][ids]
        return result

    def write(self, kind: str, ids: np.ndarray, rows: np.ndarray) -> None:
        self.rows[kind][ids] = rows


class MemmapBackend(NumpyBackend):
    name = "numpy.memmap"

    def __init__(self, dim: int, opt: Adagrad, sizes: dict[str, int], seed: int, folder: Path) -> None:
        RowBackend.__init__(self, dim, opt)
        self.rows = {}
        for j, (k, n) in enumerate(sizes.items()):
            mm = np.memmap(folder / f"{k}.f32", dtype=np.float32, mode="w+", shape=(n, 2 * dim))
            for lo in range(0, n, 1 << 18):
                hi = min(n, lo + (1 << 18))
                mm[lo:hi] = initial_rows(np.arange(lo, hi), dim, seed + j)
            mm.flush()
            self.rows[k] = mm


class KVBackend(RowBackend):
    """Rows as 8-byte big-endian keys -> raw float32 bytes, through a multi-get and a write batch."""

    def keys(self, ids: np.ndarray) -> list[bytes]:
        raw = ids.astype(">i8").tobytes()
        return [raw[i : i + 8] for i in range(0, len(raw), 8)]

    def decode(self, values: Sequence[bytes | None]) -> np.ndarray:
        return np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(values), 2 * self.dim).copy()  # type: ignore[arg-type]

    def load(self, sizes: dict[str, int], seed: int) -> None:
        for j, (k, n) in enumerate(sizes.items()):
            for lo in range(0, n, 1 << 16):
                ids = np.arange(lo, min(n, lo + (1 << 16)))
                self.write(k, ids, initial_rows(ids, self.dim, seed + j))


class RocksBackend(KVBackend):
    name = "RocksDB (rocksdict)"

    def __init__(self, dim: int, opt: Adagrad, folder: Path, cache_bytes: int) -> None:
        super().__init__(dim, opt)
        import rocksdict

        options = rocksdict.Options(raw_mode=True)
        table_options = rocksdict.BlockBasedOptions()
        table_options.set_block_cache(rocksdict.Cache(cache_bytes))
        options.set_block_based_table_factory(table_options)
        self.rd = rocksdict
        self.db = {k: rocksdict.Rdict(str(folder / k), options=options) for k in ("users", "items")}
        self.folder = folder

    def read(self, kind: str, ids: np.ndarray) -> np.ndarray:
        return self.decode(self.db[kind][self.keys(ids)])

    def write(self, kind: str, ids: np.ndarray, rows: np.ndarray) -> None:
        wb = self.rd.WriteBatch(raw_mode=True)
        for key, row in zip(self.keys(ids), rows, strict=True):
            wb.put(key, row.tobytes())
        self.db[kind].write(wb)

    def close(self) -> None:
        for db in self.db.values():
            db.close()


class LmdbBackend(KVBackend):
    name = "LMDB"

    def __init__(self, dim: int, opt: Adagrad, folder: Path, map_size: int) -> None:
        super().__init__(dim, opt)
        import lmdb

        self.env = lmdb.open(str(folder / "lmdb"), map_size=map_size, max_dbs=2, writemap=True, sync=False,
                             metasync=False)
        self.db = {k: self.env.open_db(k.encode()) for k in ("users", "items")}

    def read(self, kind: str, ids: np.ndarray) -> np.ndarray:
        with self.env.begin(db=self.db[kind]) as txn:
            return self.decode([txn.get(k) for k in self.keys(ids)])

    def write(self, kind: str, ids: np.ndarray, rows: np.ndarray) -> None:
        with self.env.begin(db=self.db[kind], write=True) as txn:
            for key, row in zip(self.keys(ids), rows, strict=True):
                txn.put(key, row.tobytes())

    def close(self) -> None:
        self.env.close()


class RedisBackend(KVBackend):
    name = "Redis (pipelined MGET/MSET)"

    def __init__(self, dim: int, opt: Adagrad, url: str) -> None:
        super().__init__(dim, opt)
        import redis

        self.r = redis.Redis.from_url(url)

    def read(self, kind: str, ids: np.ndarray) -> np.ndarray:
        prefix = kind[0].encode()
        return self.decode(self.r.mget([prefix + k for k in self.keys(ids)]))

    def write(self, kind: str, ids: np.ndarray, rows: np.ndarray) -> None:
        prefix = kind[0].encode()
        self.r.mset({prefix + k: row.tobytes() for k, row in zip(self.keys(ids), rows, strict=True)})


class EmbkvBackend:
    """TrainingTables on a disk store; the rows loaded up front as the other backends' are."""

    def __init__(self, dim: int, opt: Adagrad, sizes: dict[str, int], seed: int, folder: Path, cache_bytes: int,
                 prefetch: bool = True, staleness: int = 0) -> None:
        self.name = "embkv TrainingTable"
        self.prefetch = prefetch
        self.store = embkv.open(folder / "embkv")
        self.tables = {}
        for j, (k, n) in enumerate(sizes.items()):
            if f"{k}.train" not in self.store:
                ids = np.arange(n)
                self.store.load_table(f"{k}.train", ids, initial_rows(ids, dim, seed + j), tags=True)
            share = int(cache_bytes * n / sum(sizes.values()))
            self.tables[k] = TrainingTable(self.store, k, dim, opt, cache_bytes=share, staleness=staleness,
                                           init_std=0.01, seed=seed + j)

    def pull(self, kind: str, ids: np.ndarray, next_ids: np.ndarray | None = None) -> np.ndarray:
        return self.tables[kind].pull(ids, next_ids=next_ids if self.prefetch else None)

    def push(self, kind: str, ids: np.ndarray, grads: np.ndarray) -> None:
        self.tables[kind].push(ids, grads)

    def stats(self) -> dict[str, Any]:
        return {k: t.stats() for k, t in self.tables.items()}

    def close(self) -> None:
        for t in self.tables.values():
            t.close(checkpoint=False)
        self.store.close()


# ---------------------------------------------------------------------------- running


def run(backend: Any, batches: list[Batch], warmup: int, pipelined: bool = False) -> tuple[float, list[float]]:
    """Steps per second over ``batches[warmup:]``, and the loss of every step."""
    losses: list[float] = []
    pushes: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def pusher() -> None:
        while (job := pushes.get()) is not None:
            try:
                job()
            except BaseException as exc:  # reported after the run
                errors.append(exc)

    worker = threading.Thread(target=pusher, daemon=True) if pipelined else None
    if worker:
        worker.start()
    t0 = time.perf_counter()
    for n, (u, i, y) in enumerate(batches):
        if n == warmup:
            t0 = time.perf_counter()
        nxt = batches[n + 1] if n + 1 < len(batches) else None
        pu = backend.pull("users", u, None if nxt is None else nxt[0])
        qi = backend.pull("items", i, None if nxt is None else nxt[1])
        loss, gu, gi = model_step(pu, qi, y)
        losses.append(loss)

        def job(u: np.ndarray = u, i: np.ndarray = i, gu: np.ndarray = gu, gi: np.ndarray = gi) -> None:
            backend.push("users", u, gu)
            backend.push("items", i, gi)

        if worker:
            pushes.put(job)
        else:
            job()
    if worker:
        pushes.put(None)
        worker.join()
    if errors:
        raise errors[0]
    return (len(batches) - warmup) / (time.perf_counter() - t0), losses


def drop_page_cache(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k users, 25k items, fewer steps; writes no file")
    p.add_argument("--users", type=int, default=None, help="default 2,000,000")
    p.add_argument("--items", type=int, default=None, help="default 500,000")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 150)")
    p.add_argument("--no-peers", action="store_true", help="skip RocksDB, LMDB and Redis")
    p.add_argument("--redis-url", default=None, help="a Redis to use (default: start one on a free port)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"markdown report ('-': none; default {DEFAULT_OUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    args.users = args.users or (100_000 if args.quick else 2_000_000)
    args.items = args.items or (25_000 if args.quick else 500_000)
    args.steps = args.steps or (30 if args.quick else 150)
    git_describe()
    t_start = time.perf_counter()
    warmup = 10
    batches = make_batches(args.users, args.items, args.steps + warmup, args.seed)
    sizes = {"users": args.users, "items": args.items}
    opt = Adagrad(lr=0.05)
    table_bytes = sum(sizes.values()) * 2 * args.dim * 4
    results: dict[str, tuple[float, int]] = {}
    curves: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    with scratch("embkv-bench-train-", None) as (tmp,):
        def measure(label: str, backend: Any, pipelined: bool = False, cold: bool = False) -> None:
            if cold:
                drop_page_cache(tmp)
            gc.collect()
            log(f"{label}: {args.steps} steps")
            rate, losses = run(backend, batches, warmup, pipelined)
            results[label] = (rate, rss())
            curves[label] = losses
            if isinstance(backend, EmbkvBackend):
                extra[label] = backend.stats()
            backend.close()

        measure("numpy in memory (the limit)", NumpyBackend(args.dim, opt, sizes, args.seed))
        log("loading numpy.memmap")
        measure("numpy.memmap", MemmapBackend(args.dim, opt, sizes, args.seed, tmp))
        log("loading embkv")
        full_cache = sum(sizes.values()) * slot_bytes(2 * args.dim)
        measure("embkv, cache holds the tables", EmbkvBackend(args.dim, opt, sizes, args.seed, tmp, full_cache))
        import shutil

        for label, kw in (("embkv, cache 1/4, prefetch off", {"prefetch": False}), ("embkv, cache 1/4", {}),
                          ("embkv, cache 1/4, pipelined, staleness 0", {"staleness": 0}),
                          ("embkv, cache 1/4, pipelined, staleness 4", {"staleness": 4}),
                          ("embkv, cache 1/4, pipelined, staleness 16", {"staleness": 16})):
            shutil.rmtree(tmp / "embkv", ignore_errors=True)
            backend = EmbkvBackend(args.dim, opt, sizes, args.seed, tmp, full_cache // 4, **kw)
            measure(label, backend, pipelined="pipelined" in label, cold=True)
        if args.no_peers:
            return finish(args, results, curves, extra, table_bytes, t_start)
        log("loading RocksDB")
        rocks = RocksBackend(args.dim, opt, tmp, cache_bytes=table_bytes // 4)
        rocks.load(sizes, args.seed)
        measure("RocksDB, block cache 1/4", rocks, cold=True)
        log("loading LMDB")
        lm = LmdbBackend(args.dim, opt, tmp, map_size=4 * table_bytes + (1 << 30))
        lm.load(sizes, args.seed)
        measure("LMDB", lm)
        from _servers import start_redis

        server = None if args.redis_url else start_redis(tmp)
        try:
            rb = RedisBackend(args.dim, opt, args.redis_url or f"redis://{server.address}")  # type: ignore[union-attr]
            log("loading Redis")
            rb.load(sizes, args.seed)
            measure("Redis", rb)
        finally:
            if server is not None:
                server.stop()
    return finish(args, results, curves, extra, table_bytes, t_start)


def finish(args: argparse.Namespace, results: dict[str, tuple[float, int]], curves: dict[str, list[float]],
           extra: dict[str, Any], table_bytes: int, t_start: float) -> int:
    text = report(args, results, curves, extra, table_bytes, time.perf_counter() - t_start)
    write_report(text, args.out, args.quick, DEFAULT_OUT, log)
    return 0


def report(args: argparse.Namespace, results: dict[str, tuple[float, int]], curves: dict[str, list[float]],
           extra: dict[str, Any], table_bytes: int, wall: float) -> str:
    limit = results["numpy in memory (the limit)"][0]
    reference = curves["numpy in memory (the limit)"]
    synchronous = [k for k in curves if "staleness 4" not in k and "staleness 16" not in k]
    same = {k: curves[k] == reference for k in synchronous}
    lines = report_head("embkv training throughput", "bench_train.py", args.quick, wall)
    rocks = results.get("RocksDB, block cache 1/4")
    targets = [
        Target("embkv (cache holds the tables, in the page cache) / numpy in memory, steps/s",
               results["embkv, cache holds the tables"][0] / limit, 0.7, at_least=True, fmt=fmt_2f("x")),
        Target("embkv (cache 1/4, rest cold) / RocksDB (block cache 1/4, rest cold), steps/s",
               None if rocks is None else results["embkv, cache 1/4"][0] / rocks[0], 3.0, at_least=True,
               fmt=fmt_2f("x")),
        Target("backends at staleness 0 with a loss curve different from the limit's", float(sum(not v for v in
               same.values())), 0.0, fmt=lambda v: f"{v:.0f}"),
    ]
    lines += ["## Targets", "", "| target | measured | target | result |", "|---|---:|---:|---|",
              *[t.row() for t in targets], ""]
    lines += ["## Setup", "", command_item(), *machine_lines(), "",
              f"- Model: matrix factorization, {args.users:,} users and {args.items:,} items, dim {args.dim}, "
              f"Adagrad(lr=0.05): rows of weights and state take {table_bytes / 2**30:.2f} GiB. A step: "
              f"{POSITIVES:,} positive pairs, ids Zipf(1.05), {NEGATIVES} uniform negatives each, logistic loss. "
              f"{args.steps} timed steps after 10 warm-up steps, one process, 2 cores.",
              "- Every backend starts with all rows stored (initial vectors, zero state) and runs the same float32 "
              "arithmetic; the loss of every step is compared with the limit's.",
              "- *cold*: `fsync` and `posix_fadvise(DONTNEED)` on every file before the run, so rows come from "
              "disk; RocksDB gets a block cache of a quarter of the tables' bytes, embkv a hot cache of a quarter "
              "of their rows. *pipelined*: pushes run on a second thread, so the next pull can start first "
              "(at staleness 0 it waits for the pushes of the rows it shares).", ""]
    lines += ["## Steps per second", "", "| backend | steps/s | / limit | trainer RSS (MiB) | same loss curve |",
              "|---|---:|---:|---:|---|"]
    for label, (rate, mem) in results.items():
        lines.append(f"| {label} | {rate:.1f} | {rate / limit:.2f}x | {mem / 2**20:,.0f} | "
                     f"{'yes' if same.get(label) else ('-' if label not in same else 'NO')} |")
    lines.append("")
    for label, stats in extra.items():
        users = stats["users"]
        lines.append(f"- {label}: users table {users['hits']:,} hits, {users['misses']:,} misses, "
                     f"{users['evictions']:,} evictions, {users['prefetched']:,} rows prefetched, "
                     f"{users['seconds_stalled']:.2f} s stalled.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
