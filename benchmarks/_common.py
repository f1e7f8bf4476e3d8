"""Pieces every benchmark script shares: where the repo is, what machine ran it, how to rerun it.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), so this folder is on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parent.parent


def make_log(name: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[name HH:MM:SS] msg`` to stderr (stdout carries the report)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_describe() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False).stdout.strip()
    return out or "unknown"


def command_line() -> str:
    """The command that reproduces this run, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") else ""
    return env + "python " + shlex.join([str(script), *sys.argv[1:]])


def raise_exit(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind through ``finally`` blocks so servers and folders are cleaned up."""
    raise SystemExit(128 + signum)


def zipf_cdf(n: int, exponent: float) -> NDArray[np.float64]:
    """CDF over ranks 1..n of P(rank k) proportional to 1 / k**exponent (sample with searchsorted)."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return cdf


# ---------------------------------------------------------------------------- data

KEY_HIGH = 2**62  # benchmark keys are drawn uniformly from [0, KEY_HIGH): sparse ids, not 0..N-1


def distinct_int_keys(rng: np.random.Generator, n: int) -> NDArray[np.int64]:
    """``n`` distinct random int64 keys in [0, KEY_HIGH), in random order."""
    keys = rng.integers(0, KEY_HIGH, n, dtype=np.int64)
    while True:
        _, first = np.unique(keys, return_index=True)
        if len(first) == n:
            return keys
        keys = np.concatenate([keys[np.sort(first)], rng.integers(0, KEY_HIGH, n - len(first), dtype=np.int64)])


def make_miss_pool(rng: np.random.Generator, keys: NDArray[np.int64], size: int) -> NDArray[np.int64]:
    """``size`` distinct int64 keys from the same range as ``keys`` but not among them."""
    pool = np.empty(0, dtype=np.int64)
    while len(pool) < size:
        cand = rng.integers(0, KEY_HIGH, 2 * size, dtype=np.int64)
        pool = np.unique(np.concatenate([pool, cand[~np.isin(cand, keys)]]))
    return rng.permutation(pool)[:size]
