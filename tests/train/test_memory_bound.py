"""A training table 4x ``cache_bytes``, cold on disk, trains in bounded memory (real processes).

What this proves: a trainer process that opens a disk training table whose rows and optimizer
state take 4x its ``cache_bytes``, with none of the table's file pages in the page cache, and
trains it (uniformly random batches over the whole table, so rows are missed, loaded, evicted
and written back all the time, with a checkpoint midway and another at close) keeps its
resident memory within ``cache_bytes + ALLOWANCE`` above what it held after opening the table
and one warm-up step. Resident memory is the kernel's peak RSS (``VmHWM``), which counts
anonymous memory *and* file pages mapped into the process: rows read through the table's
mapping, or written through it and never released, count against the bound just like copies.

How: one subprocess builds the table (``push_rows`` in chunks, checkpoint, close); the test
fsyncs every file of the store folder and drops it from the page cache
(``POSIX_FADV_DONTNEED``, checked with ``mincore``); a second, fresh subprocess trains and
reports its RSS. The peak is reset (``/proc/self/clear_refs``) once the baseline is taken, so
it covers training only, not the interpreter's start-up.

Why ``ALLOWANCE`` is 48 MiB: what the trainer maps or copies at once, none of it per row of
the table (embkv.train.stored explains each limit).
  * up to 32 MiB: a ``put`` of 256 rows into the spill or the checkpointed rows, whose pages
    are dropped after it: each row read there faults in up to 64 KiB of fault-around twice
    (the row it replaces, its index slot); about 18 MiB measured;
  * 8 MiB: a chunk of 8,192 rows as a checkpoint writes back or a merge reads it (4 MiB mapped,
    4 MiB copied), and 8 MiB of rows a key scan maps before it drops them;
  * the rest: one step's arrays (ids, ``np.unique``, pulled rows, gradients, cold rows read by
    ``pread``: 1-2 MiB each at 4,096 x 64 float32) and malloc keeping freed blocks.
Measured: the peak stays about 32 MiB above ``cache_bytes`` (64 MiB over the baseline here).
Everything the trainer would hold per row of the table (a copy of the spill at a merge, pages of
the rows or spill files left mapped, large folios mapped whole) grows with the table instead,
and with the table at 4x the cache it cannot fit: the bound is 80 MiB, under half of the rows
file (about 164 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import embkv
from embkv.train.cache import slot_bytes

MiB = 1 << 20
DIM = 64
WIDTH = 2 * DIM  # Adagrad: weights and one accumulator per weight
CACHE_BYTES = 32 * MiB
ROWS = 4 * CACHE_BYTES // (4 * WIDTH)  # rows + state = 4x cache_bytes: 262,144 rows, 128 MiB
BATCH = 4096
STEPS = 300
CHECKPOINT_AT = STEPS // 2
ALLOWANCE = 48 * MiB  # see the module docstring
CHILD_TIMEOUT = 120  # seconds; each child takes under 15 s on a 2-core VM

BUILD = textwrap.dedent("""
    import sys

    import numpy as np

    import embkv
    from embkv.train import Adagrad, TrainingTable

    folder, rows, dim, cache_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = embkv.open(folder)
    table = TrainingTable(store, "t", dim=dim, optimizer=Adagrad(lr=0.05), cache_bytes=cache_bytes)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 16384):
        ids = np.arange(start, min(rows, start + 16384), dtype=np.int64)
        table.push_rows(ids, rng.normal(0.0, 0.01, (len(ids), dim)).astype(np.float32))
    table.checkpoint()
    assert len(table) == rows, len(table)
    table.close()
    store.close()
""")

TRAIN = textwrap.dedent("""
    import json
    import sys

    import numpy as np

    import embkv
    from embkv.train import Adagrad, TrainingTable

    folder, rows, dim, cache_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    batch, steps, checkpoint_at = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])


    def memory():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        return out


    def reset_peak():
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False  # the peak then also covers start-up: only stricter


    rng = np.random.default_rng(1)
    store = embkv.open(folder)
    table = TrainingTable(store, "t", dim=dim, optimizer=Adagrad(lr=0.05), cache_bytes=cache_bytes)
    ids = rng.integers(0, rows, batch)
    table.pull(ids)  # warm-up step: the code paths run once, the first rows cached
    table.push(ids, np.zeros((batch, dim), np.float32))
    baseline = memory()
    peak_reset = reset_peak()
    phases = {}
    for step in range(steps):
        ids = rng.integers(0, rows, batch)  # uniform over the whole table: mostly misses
        pulled = table.pull(ids)
        assert pulled.shape == (batch, dim) and pulled.dtype == np.float32
        table.push(ids, rng.normal(0.0, 0.01, (batch, dim)).astype(np.float32))
        if step == checkpoint_at:
            phases["before_checkpoint"] = memory()
            table.checkpoint()
            phases["after_checkpoint"] = memory()
    phases["end_of_steps"] = memory()
    stats = table.stats()
    table.close()  # checkpoints again: part of training, inside the bound too
    phases["after_close"] = memory()
    store.close()
    print(json.dumps({"baseline": baseline, "peak_reset": peak_reset, "phases": phases, "stats": stats}))
""")


def _child_env() -> dict[str, str]:
    """This interpreter's environment, with the embkv the tests import first on the path."""
    env = dict(os.environ)
    src = str(Path(embkv.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def _run(script: str, *args: object) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=_child_env(), timeout=CHILD_TIMEOUT, check=False)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _drop_page_cache(folder: Path) -> None:
    """Write back and evict every file of ``folder`` from the page cache."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _resident_fraction(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (``mincore`` on a mapping that touches none)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), f"mmap failed: errno {ctypes.get_errno()}"
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, size, vec) == 0, f"mincore failed: errno {ctypes.get_errno()}"
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _rows_files(folder: Path) -> list[Path]:
    """The rows table's file(s) of training table ``t`` (not its spill table, lock or log)."""
    return [Path(p) for p in sorted(glob.glob(str(folder / "t.train.ekv*")))
            if not p.endswith((".lock", ".wal"))]


def _report(result: dict[str, Any], table_bytes: int, listing: dict[str, int]) -> str:
    base = result["baseline"]["VmRSS"]
    lines = [f"cache_bytes {CACHE_BYTES / MiB:.1f} MiB, allowance {ALLOWANCE / MiB:.1f} MiB, "
             f"rows file {table_bytes / MiB:.1f} MiB, baseline RSS {base / MiB:.1f} MiB "
             f"(anon {result['baseline']['RssAnon'] / MiB:.1f}, file {result['baseline']['RssFile'] / MiB:.1f} MiB), "
             f"peak reset there: {result['peak_reset']}"]
    for name, m in result["phases"].items():
        lines.append(f"  {name}: peak {(m['VmHWM'] - base) / MiB:+.1f} MiB, RSS {(m['VmRSS'] - base) / MiB:+.1f} MiB "
                     f"(anon {m['RssAnon'] / MiB:.1f}, file {m['RssFile'] / MiB:.1f} MiB)")
    lines.append(f"  stats: {result['stats']}")
    lines.append(f"  files: {listing}")
    return "\n".join(lines)


def test_cold_table_4x_cache_trains_within_cache_bytes_plus_fixed(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    try:
        started = time.perf_counter()
        _run(BUILD, folder, ROWS, DIM, CACHE_BYTES)
        rows_files = _rows_files(folder)
        assert rows_files, sorted(os.listdir(folder))
        table_bytes = sum(p.stat().st_size for p in rows_files)
        assert table_bytes >= ROWS * 4 * WIDTH >= 4 * CACHE_BYTES  # the table really is 4x the cache

        _drop_page_cache(folder)
        cached = {p.name: _resident_fraction(p) for p in rows_files}
        assert max(cached.values()) < 0.05, f"could not drop the table from the page cache: {cached}"

        out = _run(TRAIN, folder, ROWS, DIM, CACHE_BYTES, BATCH, STEPS, CHECKPOINT_AT)
        result = json.loads(out.strip().splitlines()[-1])
        listing = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
        report = _report(result, table_bytes, listing)
        print(f"{report}\n  took {time.perf_counter() - started:.1f} s")

        stats = result["stats"]
        assert stats["evictions"] > CACHE_BYTES // slot_bytes(WIDTH), report  # the cache turned over, more than once
        assert stats["written_back"] > 0 and stats["checkpoints"] >= 1, report
        assert stats["loaded"] > ROWS // 2, report  # cold rows came from the files
        assert stats["loaded"] == stats["misses"], report  # every row exists: each miss was read, none made up

        baseline = result["baseline"]["VmRSS"]
        peak = max(m["VmHWM"] for m in result["phases"].values())
        grown = peak - baseline
        assert grown <= CACHE_BYTES + ALLOWANCE, (
            f"trainer RSS grew {grown / MiB:.1f} MiB over its baseline, more than cache_bytes "
            f"{CACHE_BYTES / MiB:.0f} MiB + {ALLOWANCE / MiB:.0f} MiB\n{report}")
        assert grown < table_bytes / 2, f"trainer RSS grew by more than half the table\n{report}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~0.4 GB: not left for pytest's kept tmp folders
