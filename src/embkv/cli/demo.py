"""`embkv demo`: one shared table served to several worker processes, next to a dict copy per worker.

The demo builds a table in /dev/shm, starts worker processes that answer Zipf-distributed
lookup batches from it, and reports latency per batch and memory (PSS) per worker. It then
runs the usual alternative, every worker holding its own dict copy of the table, and prints
both side by side. Everything it creates is removed when it ends, even on Ctrl-C.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import click
import numpy as np

import embkv

__all__ = ["DemoConfig", "demo", "run_demo", "zipf_batches"]


@dataclass
class DemoConfig:
    rows: int = 1_000_000
    dim: int = 64
    workers: int = 4
    batch: int = 256
    seconds: float = 3.0
    seed: int = 0
    compare_dict: bool = True


def zipf_batches(keys: np.ndarray, batch: int, count: int, seed: int, exponent: float = 1.05,
                 miss_rate: float = 0.01) -> np.ndarray:
    """``count`` batches of keys drawn Zipf(exponent) over ``keys`` (in a random rank order), with misses.

    Misses are keys absent from the table: negative numbers, as the table's keys are non-negative.
    """
    rng = np.random.default_rng(seed)
    n = len(keys)
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranked = keys[rng.permutation(n)]
    ranks = np.minimum(np.searchsorted(cdf, rng.random((count, batch))), n - 1)
    out = ranked[ranks]
    miss = rng.random((count, batch)) < miss_rate
    out[miss] = -1 - rng.integers(0, 2**62, int(miss.sum()))
    return out


def _pss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_full_info().pss)


def _shared_worker(store_path: str, table: str, batches: np.ndarray, seconds: float, ready: Any, go: Any,
                   results: Any) -> None:
    reader = embkv.open(store_path, readonly=True)[table]
    reader.get(batches[0])  # first call opens everything; not timed
    ready.put(os.getpid())
    go.wait()
    lat = _serve(lambda b: reader.get(b), batches, seconds)
    results.put(("embkv shared table", lat, _pss_bytes()))
    reader.close()


def _dict_worker(store_path: str, table: str, batches: np.ndarray, seconds: float, ready: Any, go: Any,
                 results: Any) -> None:
    keys, vectors = embkv.open(store_path, readonly=True)[table].export()
    copy = {int(k): vectors[i].copy() for i, k in enumerate(keys.tolist())}
    del keys, vectors
    zero = np.zeros(next(iter(copy.values())).shape, dtype=np.float32)

    def lookup(batch: np.ndarray) -> np.ndarray:
        return np.stack([copy.get(k, zero) for k in batch.tolist()])

    ready.put(os.getpid())
    go.wait()
    lat = _serve(lookup, batches, seconds)
    results.put(("dict copy per worker", lat, _pss_bytes()))


def _serve(lookup: Any, batches: np.ndarray, seconds: float) -> np.ndarray:
    lat = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        b = batches[i % len(batches)]
        t0 = time.perf_counter_ns()
        lookup(b)
        lat.append(time.perf_counter_ns() - t0)
        i += 1
    return np.asarray(lat, dtype=np.int64)


def _run_phase(target: Any, cfg: DemoConfig, store_path: str, table: str, all_batches: np.ndarray,
               echo: Any) -> tuple[str, np.ndarray, list[int]]:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    per = np.array_split(all_batches, cfg.workers)
    procs = [ctx.Process(target=target, args=(store_path, table, per[w], cfg.seconds, ready, go, results),
                         daemon=True) for w in range(cfg.workers)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        go.set()
        got = [results.get(timeout=cfg.seconds + 600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    name = got[0][0]
    lat = np.concatenate([g[1] for g in got])
    return name, lat, [g[2] for g in got]


def run_demo(cfg: DemoConfig, echo: Any = print) -> dict[str, dict[str, float]]:
    """Run the demo and print its report; returns the figures per approach."""
    folder = tempfile.mkdtemp(prefix="embkv-demo-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        return _demo(cfg, folder, echo)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _demo(cfg: DemoConfig, folder: str, echo: Any) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(cfg.seed)
    echo(f"building a {cfg.rows:,} x {cfg.dim} float32 table in {folder} ...")
    keys = rng.integers(0, 2**62, cfg.rows)
    vectors = rng.standard_normal((cfg.rows, cfg.dim), dtype=np.float32)
    store = embkv.open(folder)
    t0 = time.perf_counter()
    table = store.load_table("items", keys, vectors)
    build_s = time.perf_counter() - t0
    file_mb = table.info()["file_bytes"] / 2**20
    echo(f"  loaded in {build_s:.2f} s ({file_mb:.0f} MiB file, kernel: {embkv.KERNEL_BACKEND})")
    del vectors
    batches = zipf_batches(keys, cfg.batch, 4096, cfg.seed + 1)
    phases = [_shared_worker] + ([_dict_worker] if cfg.compare_dict else [])
    report: dict[str, dict[str, float]] = {}
    for target in phases:
        echo(f"running {cfg.workers} workers ({target.__name__.strip('_').replace('_', ' ')}), "
             f"batches of {cfg.batch} keys for {cfg.seconds:g} s ...")
        name, lat, pss = _run_phase(target, cfg, folder, "items", batches, echo)
        report[name] = {
            "p50_us": float(np.percentile(lat, 50)) / 1e3,
            "p99_us": float(np.percentile(lat, 99)) / 1e3,
            "batches_per_s": len(lat) / cfg.seconds,
            "pss_mib_per_worker": float(np.mean(pss)) / 2**20,
            "pss_mib_total": float(np.sum(pss)) / 2**20,
        }
    store.close()
    echo("")
    echo(f"{'approach':<24}{'p50/batch':>12}{'p99/batch':>12}{'batches/s':>12}{'PSS/worker':>14}{'PSS total':>12}")
    for name, r in report.items():
        echo(f"{name:<24}{r['p50_us']:>10.1f}us{r['p99_us']:>10.1f}us{r['batches_per_s']:>12,.0f}"
             f"{r['pss_mib_per_worker']:>11.0f}MiB{r['pss_mib_total']:>9.0f}MiB")
    if len(report) == 2:
        shared, copy = report["embkv shared table"], report["dict copy per worker"]
        echo("")
        echo(f"embkv: {copy['p50_us'] / shared['p50_us']:.1f}x lower p50 latency, "
             f"{copy['pss_mib_total'] / shared['pss_mib_total']:.1f}x less memory across {cfg.workers} workers")
    echo(f"removed {folder}")
    return report


@click.command()
@click.option("--rows", type=click.IntRange(1000), default=1_000_000, show_default=True)
@click.option("--dim", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=256, show_default=True, help="Keys per lookup.")
@click.option("--seconds", type=click.FloatRange(0.1), default=3.0, show_default=True,
              help="Serving time per approach.")
@click.option("--no-dict", is_flag=True, help="Skip the dict-copy-per-worker comparison.")
@click.option("--json", "as_json", is_flag=True, help="Also print the figures as JSON.")
def demo(rows: int, dim: int, workers: int, batch: int, seconds: float, no_dict: bool, as_json: bool) -> None:
    """Serve a shared table to worker processes; compare with a dict copy per worker.

    Builds a ROWS x DIM table in /dev/shm, runs WORKERS processes answering Zipf(1.05)
    batches with 1% misses, prints latency per batch and PSS per worker, and cleans up.
    """
    report = run_demo(DemoConfig(rows=rows, dim=dim, workers=workers, batch=batch, seconds=seconds,
                                 compare_dict=not no_dict), echo=click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))
