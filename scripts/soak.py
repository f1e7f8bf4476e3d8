#!/usr/bin/env python
"""Soak test: the crash and torn-read checks of the test suite, for as long as you like.

Alternates, until the time is up:

- SIGKILL crash trials (tests/reliability.py, the same as tests/file/test_crash.py) on a /dev/shm
  store and on disk stores in the temp folder (sync="always", and sync="never", which must lose
  nothing to a process crash either);
- a torn-read round: 4 reader processes (2 on the C kernel, 2 on the numpy fallback) verify
  every vector while this process rewrites rows in place as fast as it can (int and str keys
  in turn).

Prints running totals after every round and exits 1 on any bad outcome or bad read (0 when
all is well). False misses of readers on the numpy kernel (a known bug: a present key reported
missing under heavy rewriting, see tests/file/test_torn_reads.py) are counted and printed apart, and
fail the run only with --strict. Everything it creates (two store folders, named embkv-soak-*) is removed at
the end, also on Ctrl-C or SIGTERM.

    python scripts/soak.py --minutes 2 --seed 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402

import embkv  # noqa: E402
from helpers import encode  # noqa: E402
from reliability import (  # noqa: E402
    CrashCampaign,
    CrashStats,
    rewrite_as_fast_as_possible,
    stop_processes,
    torn_reader,
)

FORK = mp.get_context("fork")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Figures: docs/reliability.md. The test suite runs a short version of each check.")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--seed", type=int, default=None, help="seed of the crash trials (default: random, printed)")
    p.add_argument("--torn-seconds", type=float, default=5.0, help="length of one torn-read round (default 5)")
    p.add_argument("--trials-per-round", type=int, default=50, help="crash trials per store per round (default 50)")
    p.add_argument("--json", action="store_true", help="print the final totals as JSON too")
    p.add_argument("--strict", action="store_true",
                   help="also fail on the known false misses of the numpy kernel's readers (reported either way)")
    return p.parse_args(argv)


class Torn:
    def __init__(self) -> None:
        self.rounds = 0
        self.reads = 0
        self.vectors = 0
        self.rows_written = 0
        self.bad = 0
        self.numpy_misses = 0  # known bug, see tests/file/test_torn_reads.py::test_numpy_kernel_lookup_is_not_fooled...
        self.errors: list[str] = []


def torn_round(folder: str, key_type: str, seconds: float, seed: int, totals: Torn, strict: bool) -> None:
    path = os.path.join(folder, f"torn-{key_type}")
    key_space, dim = 256, 64
    store = embkv.open(path)
    try:
        table = store.create_table("t", dim, key_type=key_type, capacity=key_space + 64)
        idx = np.arange(key_space)
        table.put(idx if key_type == "int64" else [f"k{i}" for i in idx], encode(idx, 0, dim))
        ready = [FORK.Event() for _ in range(4)]
        go, stop, q = FORK.Event(), FORK.Event(), FORK.Queue()
        readers = [FORK.Process(target=torn_reader, args=(path, "t", key_type, key_space, seed + i, i >= 2,
                                                           ready[i], go, stop, q)) for i in range(4)]
        for p in readers:
            p.start()
        try:
            deadline = time.monotonic() + 60
            while not all(e.is_set() for e in ready):
                if not q.empty() or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            go.set()
            totals.rows_written += rewrite_as_fast_as_possible(table, key_type, key_space, dim, seconds, seed)
            stop.set()
            for _ in readers:
                status, value = q.get(timeout=60)
                if status != "ok":
                    totals.errors.append(value)
                    continue
                totals.reads += value["reads"]
                totals.vectors += value["vectors"]
                misses = value["missing"]
                if value["numpy"] and not strict:
                    totals.numpy_misses += misses
                    misses = 0
                bad = value["torn"] + misses + value["backwards"]
                totals.bad += bad
                if bad:
                    totals.errors.append(f"{key_type} reader: {value}")
        finally:
            stop_processes(readers, q, stop, go)
        totals.rounds += 1
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"soak: {args.minutes:g} min, seed {seed}, kernel {embkv.KERNEL_BACKEND}", flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    mem_root = tempfile.mkdtemp(prefix="embkv-soak-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    disk_root = tempfile.mkdtemp(prefix="embkv-soak-")
    campaigns = {
        "memory": CrashCampaign(os.path.join(mem_root, "crash"), "never", seed, max_delay=0.020),
        "disk/always": CrashCampaign(os.path.join(disk_root, "crash-always"), "always", seed + 1, max_delay=0.050),
        "disk/never": CrashCampaign(os.path.join(disk_root, "crash-never"), "never", seed + 2, max_delay=0.050),
    }
    torn = Torn()
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    interrupted = False
    round_ = 0
    try:
        while time.monotonic() < deadline:
            for name, campaign in campaigns.items():
                trials = args.trials_per_round // 2 if name == "disk/never" else args.trials_per_round
                for _ in range(max(1, trials)):
                    campaign.trial()
                    if time.monotonic() >= deadline:
                        break
            if time.monotonic() < deadline:
                torn_round(mem_root, ("int64", "str")[round_ % 2], min(args.torn_seconds, deadline - time.monotonic()),
                           seed + 100 * round_, torn, args.strict)
            round_ += 1
            total = CrashStats()
            for c in campaigns.values():
                total.add(c.stats)
            elapsed = time.monotonic() - t0
            print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] crash trials {total.trials:,}, kills "
                  f"{total.kills:,} (mid-op {total.mid_op:,}), acknowledged ops verified {total.acked_ops:,}, bad "
                  f"outcomes {len(total.bad)} | torn-read rounds {torn.rounds}, reads {torn.reads:,}, vectors "
                  f"verified {torn.vectors:,}, bad reads {torn.bad} (known numpy-kernel false misses "
                  f"{torn.numpy_misses})", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping", flush=True)
    finally:
        for path in (mem_root, disk_root):
            shutil.rmtree(path, ignore_errors=True)
    total = CrashStats()
    for name, c in campaigns.items():
        print(f"  {c.stats.summary(name)}")
        total.add(c.stats)
    print(f"  torn reads: {torn.rounds} rounds, writer rewrote {torn.rows_written:,} rows, {torn.reads:,} reads "
          f"verified {torn.vectors:,} vectors, bad reads {torn.bad}; known numpy-kernel false misses "
          f"{torn.numpy_misses} (a present key reported missing, never wrong data)")
    failures = total.bad + torn.errors
    for line in failures[:20]:
        print(f"FAILURE: {line}")
    if args.json:
        print(json.dumps({"seed": seed, "minutes": args.minutes, "trials": total.trials, "kills": total.kills,
                          "mid_op": total.mid_op, "acked_ops": total.acked_ops, "bad_outcomes": len(total.bad),
                          "torn_rounds": torn.rounds, "reads": torn.reads, "vectors": torn.vectors,
                          "bad_reads": torn.bad, "numpy_false_misses": torn.numpy_misses,
                          "reader_errors": len(torn.errors)}))
    ok = not failures and total.trials > 0 and not interrupted
    print("soak: OK" if ok else "soak: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
