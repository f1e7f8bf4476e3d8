#!/usr/bin/env python
"""Core benchmark for embkv: lookup latency against the numpy gather limit, memory across
processes, bulk-load time, and a correctness check, all in one run with a fixed seed.

Run from the repository root::

    python benchmarks/bench_core.py            # N = 1,000,000 x 64, writes docs/benchmarks/core.md
    python benchmarks/bench_core.py --quick    # N = 100,000, fewer calls, under a minute, prints only

The markdown report goes to stdout (progress goes to stderr). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import embkv
from _common import (
    MB,
    REPO,
    BoolArray,
    FloatArray,
    IntArray,
    make_log,
    make_miss_pool,
    malloc_trim,
    mapped_pss,
    pct_us,
    pss,
    random_table,
    removed_at_end,
    str_key,
    zipf_cdf,
    zipf_ranks,
)
from _report import Target, command_item, fmt_2f, git_describe, machine_lines, report_head, thp, write_report

log = make_log("bench_core")
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "core.md"
TABLE_INT = "items"
TABLE_STR = "items_str"
ZIPF_EXPONENT = 1.05
MISS_RATE = 0.01
BLOCKS = 5  # calls are timed in blocks, alternating which contender runs first, to even out drift
WARMUP_CALLS = 200
TOUCH_CHUNK = 4096
LOAD_RUNS = 3  # the first creates the table, the others replace it (atomic publish)
CHECK_CALLS = 64  # batches per size whose answers are checked against the truth matrix

# calls per batch size: (full, quick)
CALLS: dict[int, tuple[int, int]] = {1: (20_000, 5_000), 16: (10_000, 2_000), 256: (5_000, 1_000),
                                     1024: (2_000, 300)}

# targets
GATHER_RATIO_MAX = {256: 2.0, 1: 2.5}  # embkv int p50 / numpy gather p50
STR_RATIO_MAX = 1.5  # embkv str p50 / embkv int p50 (batch 256 and 1)
MEMORY_RATIO_MAX = 1.15  # sum PSS(readers) - sum PSS(bare), over the table file's bytes
READERS_RAW_MAX = 1.15  # the same, over the raw vector bytes (issue 10: format 3 was at 1.27x)
LOAD_SECONDS_PER_MILLION = 2.0  # load_table of 1M x 64 float32 from numpy arrays


# ---------------------------------------------------------------------------- data


def seed_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for the table data, the miss keys and the batches.

    The data stream is used alone by :func:`make_data`, so child processes rebuild the exact table.
    """
    data, misses, batches = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(data), np.random.default_rng(misses), np.random.default_rng(batches))


def make_data(n: int, dim: int, seed: int) -> tuple[IntArray, FloatArray]:
    """N distinct random int64 keys in [0, 2**62) (random order) and their float32 vectors."""
    return random_table(seed_streams(seed)[0], n, dim)


@dataclasses.dataclass
class Workload:
    """The batches of one batch size: the same draws for every contender."""

    batch: int
    int_keys: list[IntArray]  # per call: int64 keys (1% not in the table)
    rows: list[IntArray]  # per call: truth-matrix rows for numpy (misses mapped to row 0)
    str_keys: list[list[str]]  # per call: the same keys as "item:{key}" strings
    miss: list[BoolArray]  # per call: which positions are misses (for the correctness check)

    @property
    def calls(self) -> int:
        return len(self.rows)


def make_workload(rng: np.random.Generator, batch: int, calls: int, cdf: NDArray[np.float64],
                  rank_to_row: IntArray, keys: IntArray, str_keys: Sequence[str],
                  miss_pool: IntArray) -> Workload:
    total = batch * calls
    true_rows = rank_to_row[zipf_ranks(rng, cdf, total)]
    miss = rng.random(total) < MISS_RATE
    miss_keys = rng.choice(miss_pool, int(miss.sum()))
    int_keys = keys[true_rows]
    int_keys[miss] = miss_keys
    rows = true_rows.copy()
    rows[miss] = 0  # numpy has no "miss": any row will do, the cost is the same
    strs = [str_keys[r] for r in true_rows.tolist()]
    for pos, mk in zip(np.flatnonzero(miss).tolist(), miss_keys.tolist(), strict=True):
        strs[pos] = str_key(mk)
    k2 = int_keys.reshape(calls, batch)
    r2 = rows.reshape(calls, batch)
    m2 = miss.reshape(calls, batch)
    return Workload(
        batch=batch,
        int_keys=[k2[i] for i in range(calls)],
        rows=[r2[i] for i in range(calls)],
        str_keys=[strs[i * batch : (i + 1) * batch] for i in range(calls)],
        miss=[m2[i] for i in range(calls)],
    )


# ---------------------------------------------------------------------------- timing


def time_gather(matrix: FloatArray, batches: Sequence[IntArray], out: IntArray, start: int) -> None:
    pc = time.perf_counter_ns
    for i, rows in enumerate(batches):
        t0 = pc()
        matrix[rows]
        out[start + i] = pc() - t0


def time_get(table: embkv.Table, batches: Sequence[Any], out: IntArray, start: int) -> None:
    get = table.get
    pc = time.perf_counter_ns
    for i, keys in enumerate(batches):
        t0 = pc()
        get(keys)
        out[start + i] = pc() - t0


@dataclasses.dataclass
class Latency:
    batch: int
    calls: int
    gather: IntArray  # ns per call
    get_int: IntArray
    get_str: IntArray


def measure_latency(w: Workload, matrix: FloatArray, t_int: embkv.Table, t_str: embkv.Table) -> Latency:
    lat = Latency(w.batch, w.calls, *(np.zeros(w.calls, dtype=np.int64) for _ in range(3)))
    scratch = np.zeros(WARMUP_CALLS, dtype=np.int64)
    warm = min(WARMUP_CALLS, w.calls)
    time_gather(matrix, w.rows[:warm], scratch, 0)
    time_get(t_int, w.int_keys[:warm], scratch, 0)
    time_get(t_str, w.str_keys[:warm], scratch, 0)
    bounds = np.linspace(0, w.calls, BLOCKS + 1).astype(int)
    gc.collect()
    gc.disable()
    try:
        for b in range(BLOCKS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            runs = [
                functools.partial(time_gather, matrix, w.rows[lo:hi], lat.gather, lo),
                functools.partial(time_get, t_int, w.int_keys[lo:hi], lat.get_int, lo),
                functools.partial(time_get, t_str, w.str_keys[lo:hi], lat.get_str, lo),
            ]
            for timed in runs if b % 2 == 0 else reversed(runs):
                timed()
    finally:
        gc.enable()
    return lat


# ---------------------------------------------------------------------------- correctness


@dataclasses.dataclass
class Check:
    rows_checked: int = 0
    batch_keys_checked: int = 0
    misses_checked: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def expect(self, ok: bool, what: str) -> None:
        if not ok and len(self.failures) < 20:
            self.failures.append(what)


def check_all_rows(check: Check, table: embkv.Table, keys: Any, vectors: FloatArray, label: str) -> None:
    """Every key of the table answers its own row (this also maps every page a reader needs)."""
    n = len(vectors)
    for lo in range(0, n, 65536):
        got, found = table.get(keys[lo : lo + 65536])
        check.expect(bool(found.all()), f"{label}: keys {lo}..{lo + 65536} not all found")
        check.expect(np.array_equal(got, vectors[lo : lo + 65536]), f"{label}: rows {lo}.. differ from truth")
    check.rows_checked += n


def check_batches(check: Check, w: Workload, truth: FloatArray, t_int: embkv.Table, t_str: embkv.Table) -> None:
    for i in range(min(CHECK_CALLS, w.calls)):
        miss = w.miss[i]
        want = truth[w.rows[i]]
        want[miss] = 0.0
        for label, table, keys in (("int", t_int, w.int_keys[i]), ("str", t_str, w.str_keys[i])):
            got, found = table.get(keys)
            check.expect(np.array_equal(found, ~miss), f"batch {w.batch} call {i} {label}: found flags wrong")
            check.expect(np.array_equal(got, want), f"batch {w.batch} call {i} {label}: vectors differ")
        check.batch_keys_checked += 2 * len(miss)
        check.misses_checked += 2 * int(miss.sum())


# ---------------------------------------------------------------------------- memory


def child_main(kind: str, path: str, n: int, dim: int, seed: int) -> None:
    """A worker process for the memory test: build its state, say ready, hold it until stdin closes."""
    held: list[Any] = []
    if kind == "reader":
        table = embkv.open(path, readonly=True)[TABLE_INT]
        keys = table.keys()
        for lo in range(0, len(keys), TOUCH_CHUNK):
            table.get(keys[lo : lo + TOUCH_CHUNK])  # touches every row and the index
        del keys
        held.append(table)
    elif kind == "dict":
        keys, vectors = make_data(n, dim, seed)
        held.append({k: row.copy() for k, row in zip(keys.tolist(), vectors, strict=True)})
        del keys, vectors
    elif kind != "bare":
        raise SystemExit(f"unknown child kind {kind!r}")
    gc.collect()
    malloc_trim()
    print("ready", flush=True)
    sys.stdin.read()  # the parent measures us now; it closes stdin when done


@dataclasses.dataclass
class Memory:
    readers: int
    file_bytes: int
    file_alloc_bytes: int  # what tmpfs holds for the file (st_blocks)
    raw_bytes: int
    pss: dict[str, list[int]]  # kind -> PSS per process
    ekv_map_pss: list[int]  # per reader: PSS of the .ekv mapping alone
    parent_maps_table: bool

    def total(self, kind: str) -> int:
        return sum(self.pss[kind])

    def beyond_bare(self, kind: str) -> int:
        return self.total(kind) - self.total("bare")


def measure_memory(store_path: str, table_path: str, readers: int, n: int, dim: int, seed: int) -> Memory:
    """Start ``readers`` processes of each kind together (so shared libraries split evenly) and
    read their PSS once all are ready."""
    kinds = ["bare", "reader", "dict"]
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        for kind in kinds:
            for _ in range(readers):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-path",
                       store_path, "--n", str(n), "--dim", str(dim), "--seed", str(seed)]
                procs.append((kind, subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     text=True, cwd=REPO)))
        for kind, p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{kind} child {p.pid} failed (exit {p.poll()}, said {line!r})")
        held: dict[str, list[int]] = {k: [] for k in kinds}
        ekv: list[int] = []
        for kind, p in procs:
            held[kind].append(pss(p.pid))
            if kind == "reader":
                ekv.append(mapped_pss(p.pid, table_path))
        parent_maps = mapped_pss(os.getpid(), table_path) > 0
        for _, p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for _, p in procs:
            p.wait(timeout=60)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    st = os.stat(table_path)
    return Memory(readers, st.st_size, st.st_blocks * 512, n * dim * 4, held, ekv, parent_maps)


# ---------------------------------------------------------------------------- report


@dataclasses.dataclass
class Loads:
    """Seconds per load_table call: the first creates the table, the others replace it."""

    int_s: list[float]
    str_s: list[float]


def timed_loads(store: embkv.Store, name: str, keys: Any, vectors: FloatArray) -> list[float]:
    times = []
    for _ in range(LOAD_RUNS):
        gc.collect()
        t0 = time.perf_counter()
        store.load_table(name, keys, vectors)
        times.append(time.perf_counter() - t0)
    return times


def huge_pages() -> tuple[int, int]:
    """This process's (AnonHugePages, ShmemPmdMapped) bytes: huge pages under numpy arrays and mappings."""
    got = {"AnonHugePages:": 0, "ShmemPmdMapped:": 0}
    with contextlib.suppress(OSError), open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0] in got:
                got[parts[0]] = int(parts[1]) * 1024
    return got["AnonHugePages:"], got["ShmemPmdMapped:"]


def report(args: argparse.Namespace, lats: list[Latency], mem: Memory | None, loads: Loads,
           check: Check, file_bytes: int, str_file_bytes: int, pages: tuple[int, int],
           wall_s: float) -> tuple[str, bool]:
    by_batch = {lat.batch: lat for lat in lats}
    targets: list[Target] = []
    for b in (256, 1):
        if b in by_batch:
            lat = by_batch[b]
            targets.append(Target(f"int get p50 / numpy gather p50, batch {b}",
                                  pct_us(lat.get_int, 50) / pct_us(lat.gather, 50), GATHER_RATIO_MAX[b],
                                  fmt=fmt_2f("x")))
    for b in (256, 1):
        if b in by_batch:
            lat = by_batch[b]
            targets.append(Target(f"str get p50 / int get p50, batch {b}",
                                  pct_us(lat.get_str, 50) / pct_us(lat.get_int, 50), STR_RATIO_MAX,
                                  fmt=fmt_2f("x")))
    if mem is not None:
        targets.append(Target(f"memory of {mem.readers} readers beyond {mem.readers} bare / table file bytes",
                              mem.beyond_bare("reader") / mem.file_alloc_bytes, MEMORY_RATIO_MAX, fmt=fmt_2f("x")))
        targets.append(Target(f"memory of {mem.readers} readers beyond {mem.readers} bare / raw vector bytes",
                              mem.beyond_bare("reader") / mem.raw_bytes, READERS_RAW_MAX, fmt=fmt_2f("x")))
    load_limit = LOAD_SECONDS_PER_MILLION * args.n / 1e6
    targets.append(Target(f"load_table {args.n:,} x {args.dim} float32, int keys: slowest of {LOAD_RUNS} runs",
                          max(loads.int_s), load_limit, fmt=fmt_2f(" s")))

    raw = args.n * args.dim * 4
    out: list[str] = []
    add = out.append
    out.extend(report_head("embkv core benchmark", "bench_core.py", args.quick, wall_s))
    add("## Setup")
    add("")
    add(command_item())
    out.extend(machine_lines(os_extra=f"; transparent huge pages: anon `{thp('enabled')}`, "
                                      f"shmem `{thp('shmem_enabled')}`"))
    add(f"- Table: N = {args.n:,} distinct random int64 keys drawn from [0, 2^62), dim {args.dim} float32: "
        f"raw vectors {raw / MB:.1f} MiB; `.ekv` file {file_bytes / MB:.1f} MiB allocated "
        f"({file_bytes / raw:.2f}x raw); the str-keyed twin (`\"item:{{key}}\"`) {str_file_bytes / MB:.1f} MiB. "
        f"Store in `/dev/shm`.")
    add(f"- Batches: ranks drawn Zipf({ZIPF_EXPONENT}) over the N keys (inverse CDF of 1/k^{ZIPF_EXPONENT}; "
        f"rank -> random permutation of keys), {MISS_RATE:.0%} misses (keys not in the table), seed {args.seed}. "
        "numpy gather, int get and str get run the same batches, the same number of calls, in "
        f"{BLOCKS} interleaved blocks after {WARMUP_CALLS} warm-up calls; each call timed with "
        "`time.perf_counter_ns`, GC off.")
    add("- The limit: `matrix[rows]` on an in-process numpy array with rows precomputed (misses mapped "
        "to row 0). embkv: `reader.get(int64 array)` and `reader.get(list of str)` on a table opened "
        "`readonly=True`.")
    add(f"- Huge pages in the benchmark process while timing: {pages[0] / MB:.0f} MiB anonymous (the numpy "
        f"matrix is {raw / MB:.0f} MiB), {pages[1] / MB:.0f} MiB of shared-memory mappings (embkv's tables): "
        "when the first covers the matrix, the numpy side takes far fewer TLB misses than embkv's 4 KiB pages.")
    add("")
    add("## Targets")
    add("")
    add("| target | measured | target | result |")
    add("|---|---:|---:|---|")
    out.extend(t.row() for t in targets)
    bad = check.failures
    add(f"| correctness: all {check.rows_checked:,} rows (int and str tables) + "
        f"{check.batch_keys_checked:,} batch keys ({check.misses_checked:,} misses) equal the truth | "
        f"{len(bad)} failures | 0 | {'PASS' if not bad else '**FAIL**'} |")
    add("")
    add("## Lookup latency per call (µs)")
    add("")
    add("| batch | calls | numpy gather p50 | p99 | embkv int p50 | p99 | int/gather p50 | int/gather p99 "
        "| embkv str p50 | p99 | str/int p50 | str/gather p50 | int ns/key p50 |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lat in lats:
        g50, g99 = pct_us(lat.gather, 50), pct_us(lat.gather, 99)
        i50, i99 = pct_us(lat.get_int, 50), pct_us(lat.get_int, 99)
        s50, s99 = pct_us(lat.get_str, 50), pct_us(lat.get_str, 99)
        add(f"| {lat.batch} | {lat.calls:,} | {g50:.2f} | {g99:.2f} | {i50:.2f} | {i99:.2f} | {i50 / g50:.2f}x "
            f"| {i99 / g99:.2f}x | {s50:.2f} | {s99:.2f} | {s50 / i50:.2f}x | {s50 / g50:.2f}x "
            f"| {1000 * i50 / lat.batch:.0f} |")
    add("")
    if mem is not None:
        add(f"## Memory: {mem.readers} processes of each kind, alive together")
        add("")
        add("PSS from `psutil.Process(pid).memory_full_info().pss`, read by the parent once every process "
            "is ready. *bare*: imports numpy, psutil and embkv, opens nothing. *embkv reader*: opens the "
            "int table `readonly=True` and `get`s every key in chunks of "
            f"{TOUCH_CHUNK} (every row and index page mapped). *dict copy*: holds "
            "`{key: np.ndarray row}` (row copies, as unpickling gives), the usual alternative. The "
            "parent holds no mapping of the table while measuring"
            + (" (**it did: figures are off**)." if mem.parent_maps_table else "."))
        add("")
        add(f"| processes | sum PSS (MiB) | beyond {mem.readers} bare (MiB) | / table file bytes "
            "| / raw vector bytes |")
        add("|---|---:|---:|---:|---:|")
        for kind, label in (("bare", "bare interpreter"), ("reader", "embkv reader"), ("dict", "dict copy")):
            total = mem.total(kind)
            if kind == "bare":
                add(f"| {mem.readers} x {label} | {total / MB:.1f} | - | - | - |")
                continue
            extra = mem.beyond_bare(kind)
            add(f"| {mem.readers} x {label} | {total / MB:.1f} | {extra / MB:.1f} | "
                f"{extra / mem.file_alloc_bytes:.3f}x | {extra / raw:.3f}x |")
        ekv = sum(mem.ekv_map_pss)
        private = mem.beyond_bare("reader") - ekv
        host = mem.file_alloc_bytes + private
        add("")
        add(f"- Of the readers' {mem.beyond_bare('reader') / MB:.1f} MiB, the `.ekv` mapping is "
            f"{ekv / MB:.1f} MiB ({ekv / mem.file_alloc_bytes:.1%} of the file's allocated bytes: the "
            f"free list is never touched by reads) and {private / MB:.1f} MiB is per-process growth outside it.")
        add(f"- Host total for embkv, counting the whole tmpfs file once ({mem.file_alloc_bytes / MB:.1f} MiB "
            f"allocated) plus the readers' private growth: {host / MB:.1f} MiB = {host / raw:.2f}x raw, "
            f"against {mem.beyond_bare('dict') / MB:.1f} MiB = {mem.beyond_bare('dict') / raw:.2f}x raw for "
            f"{mem.readers} dict copies.")
        add("")
    add("## Bulk load (`store.load_table` from numpy arrays into `/dev/shm`, build + atomic publish)")
    add("")
    runs = " | ".join(f"run {i + 1}{' (new table)' if i == 0 else ' (replace)'} s" for i in range(LOAD_RUNS))
    add(f"| keys | {runs} | median rows/s | median MiB/s of raw vectors | median vs int keys |")
    add("|---|" + "---:|" * (LOAD_RUNS + 3))
    int_med = float(np.median(loads.int_s))
    for label, times in (("int64 array", loads.int_s),
                         ("list of str (`\"item:{key}\"`)", loads.str_s)):
        med = float(np.median(times))
        cells = " | ".join(f"{t:.2f}" for t in times)
        add(f"| {label} | {cells} | {args.n / med:,.0f} | {raw / MB / med:,.0f} | {med / int_med:.2f}x |")
    if bad:
        add("")
        add("## Correctness failures")
        add("")
        out.extend(f"- {f}" for f in bad)
    add("")
    return "\n".join(out), not bad


# ---------------------------------------------------------------------------- main


@contextlib.contextmanager
def scratch_store(path: str) -> Iterator[str]:
    """A fresh folder for the store, removed at the end whatever happens (SIGTERM included)."""
    os.makedirs(path, exist_ok=False)  # never take over (and later delete) someone else's folder
    with removed_at_end([path]):
        yield path


def run(args: argparse.Namespace) -> int:
    git_describe()  # pinned before this run writes its report and plots into the tree
    start = time.perf_counter()
    n, dim = args.n, args.dim
    calls = {b: c[1 if args.quick else 0] for b, c in CALLS.items()}
    log(f"data: {n:,} x {dim} float32, seed {args.seed}")
    keys, vectors = make_data(n, dim, args.seed)
    str_keys = [str_key(k) for k in keys.tolist()]
    _, miss_rng, batch_rng = seed_streams(args.seed)
    miss_pool = make_miss_pool(miss_rng, keys, max(1024, n // 100))
    cdf = zipf_cdf(n, ZIPF_EXPONENT)
    rank_to_row = batch_rng.permutation(n).astype(np.int64)
    workloads = [make_workload(batch_rng, b, c, cdf, rank_to_row, keys, str_keys, miss_pool)
                 for b, c in calls.items()]

    with scratch_store(args.shm_dir) as path:
        store = embkv.open(path)
        log(f"load_table x {LOAD_RUNS}: int keys, then str keys")
        loads = Loads(timed_loads(store, TABLE_INT, keys, vectors), timed_loads(store, TABLE_STR, str_keys, vectors))
        store.close()
        table_path = os.path.join(path, TABLE_INT + ".ekv")
        # allocated bytes: the files are sparse beyond the index, so their size overstates them
        file_bytes = os.stat(table_path).st_blocks * 512
        str_file_bytes = os.stat(os.path.join(path, TABLE_STR + ".ekv")).st_blocks * 512

        ro = embkv.open(path, readonly=True)
        t_int, t_str = ro[TABLE_INT], ro[TABLE_STR]
        log("correctness: every row, then sampled batches")
        check = Check()
        check_all_rows(check, t_int, keys, vectors, "int")
        check_all_rows(check, t_str, str_keys, vectors, "str")
        for w in workloads:
            check_batches(check, w, vectors, t_int, t_str)
        for f in check.failures:
            log(f"FAILED: {f}")

        lats = []
        for w in workloads:
            log(f"latency: batch {w.batch}, {w.calls:,} calls")
            lats.append(measure_latency(w, vectors, t_int, t_str))
        pages = huge_pages()
        ro.close()
        del t_int, t_str, ro
        gc.collect()

        mem = None
        if args.readers > 0:
            log(f"memory: {args.readers} bare + {args.readers} embkv readers + {args.readers} dict copies")
            mem = measure_memory(path, table_path, args.readers, n, dim, args.seed)

    text, ok = report(args, lats, mem, loads, check, file_bytes, str_file_bytes, pages,
                      time.perf_counter() - start)
    write_report(text, args.out, args.quick, DEFAULT_OUT, log)
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="embkv core benchmark: get() latency vs the numpy gather limit (int and str keys), "
        "memory of reader processes, bulk load time, correctness. Prints a markdown report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=None, help="rows (default 1,000,000; 100,000 with --quick)")
    p.add_argument("--dim", type=int, default=64, help="vector width (float32)")
    p.add_argument("--quick", action="store_true",
                   help="N=100,000 and about 4x fewer calls: a smoke run under a minute; writes no file "
                   "unless --out is given")
    p.add_argument("--seed", type=int, default=0, help="seed for keys, vectors, misses and batches")
    p.add_argument("--readers", type=int, default=4,
                   help="processes of each kind in the memory test (0 skips it)")
    p.add_argument("--shm-dir", default=f"/dev/shm/embkv-bench-{os.getpid()}",
                   help="store folder; must not exist; removed at the end")
    p.add_argument("--out", default=None,
                   help=f"markdown output file ('-' for none; default {DEFAULT_OUT.relative_to(REPO)}, "
                   "none with --quick)")
    p.add_argument("--child", choices=["bare", "reader", "dict"], help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 100_000 if args.quick else 1_000_000
    if args.n < 1000 or args.dim < 1:
        p.error("--n must be >= 1000 and --dim >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_path, args.n, args.dim, args.seed)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
