"""Plumbing every benchmark script shares: where the repo is, progress logging, clean-up on exit,
the data they draw, per-process memory readings.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), so this folder is on
``sys.path`` and they import this module as ``_common`` (and its siblings ``_peers``, ``_servers``
and ``_report`` the same way). What goes into a report (machine lines, number formats, targets,
plots) is in ``_report``; peer clients and their loaders in ``_peers``; server processes in ``_servers``.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
GB = 1 << 30

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]


class BenchError(RuntimeError):
    """A system gave a wrong answer, a server or a client failed: the run is void."""


def make_log(name: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[name HH:MM:SS] msg`` to stderr (stdout carries the report)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------- clean-up


def raise_exit(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind through ``finally`` blocks so servers and folders are cleaned up."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def removed_at_end(folders: Sequence[str | Path]) -> Iterator[None]:
    """Remove ``folders`` (as the sequence stands at the end) whatever happens; SIGTERM unwinds too."""
    old = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def scratch(prefix: str, *parents: str | None) -> Iterator[list[Path]]:
    """One new temporary folder under each of ``parents`` (None: the system's temp folder), all
    removed at the end whatever happens (SIGTERM included)."""
    made: list[Path] = []
    with removed_at_end(made):
        for parent in parents:
            made.append(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)))
        yield made


# ---------------------------------------------------------------------------- processes


def malloc_trim() -> None:
    """Give freed heap back to the OS so PSS shows what is held, not what was once used."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# psutil is imported where it is used: the service's workers import this module (through _peers),
# and their PSS is what the service benchmark measures.


def pss_uss(pid: int) -> tuple[int, int]:
    """Process ``pid``'s PSS and USS in bytes (``psutil.Process.memory_full_info``)."""
    import psutil

    m = psutil.Process(pid).memory_full_info()
    return int(m.pss), int(m.uss)


def pss(pid: int) -> int:
    return pss_uss(pid)[0]


def mapped_pss(pid: int, path: str) -> int:
    """PSS of ``path``'s mapping in process ``pid`` (0 if it does not map it)."""
    import psutil

    return sum(int(m.pss) for m in psutil.Process(pid).memory_maps(grouped=True) if m.path == path)


# ---------------------------------------------------------------------------- data

KEY_HIGH = 2**62  # benchmark keys are drawn uniformly from [0, KEY_HIGH): sparse ids, not 0..N-1


def distinct_int_keys(rng: np.random.Generator, n: int) -> IntArray:
    """``n`` distinct random int64 keys in [0, KEY_HIGH), in random order."""
    keys = rng.integers(0, KEY_HIGH, n, dtype=np.int64)
    while True:
        _, first = np.unique(keys, return_index=True)
        if len(first) == n:
            return keys
        keys = np.concatenate([keys[np.sort(first)], rng.integers(0, KEY_HIGH, n - len(first), dtype=np.int64)])


def random_table(rng: np.random.Generator, n: int, dim: int) -> tuple[IntArray, FloatArray]:
    """N distinct random int64 keys in [0, 2**62) (random order) and their standard-normal float32 vectors."""
    keys = distinct_int_keys(rng, n)
    return keys, rng.standard_normal((n, dim), dtype=np.float32)


def str_key(key: int) -> str:
    """The str-keyed twin of an int key."""
    return f"item:{key}"


def make_miss_pool(rng: np.random.Generator, keys: IntArray, size: int) -> IntArray:
    """``size`` distinct int64 keys from the same range as ``keys`` but not among them."""
    pool = np.empty(0, dtype=np.int64)
    while len(pool) < size:
        cand = rng.integers(0, KEY_HIGH, 2 * size, dtype=np.int64)
        pool = np.unique(np.concatenate([pool, cand[~np.isin(cand, keys)]]))
    return rng.permutation(pool)[:size]


def zipf_cdf(n: int, exponent: float) -> NDArray[np.float64]:
    """CDF over ranks 1..n of P(rank k) proportional to 1 / k**exponent (sample with :func:`zipf_ranks`)."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return cdf


def zipf_ranks(rng: np.random.Generator, cdf: NDArray[np.float64], size: int) -> NDArray[np.intp]:
    """``size`` ranks (0-based) drawn by inverse CDF: searchsorted of uniform numbers on ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def pct_us(lat_ns: Sequence[int] | NDArray[np.int64], q: float) -> float:
    """Percentile ``q`` of nanosecond latencies, in microseconds."""
    return float(np.percentile(np.asarray(lat_ns, dtype=np.float64), q)) / 1e3
