"""Helpers shared by the tests, and the targets of the processes they start.

This module must stay importable in a freshly spawned interpreter (no pytest import, no
fixtures): multiprocessing's "spawn" context imports it by name in the child.

Self-checking vectors (``encode``, ``check_vectors``) come from :mod:`embkv.testing`, which
the conformance suites share.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from typing import Any

import numpy as np

import embkv
from embkv.testing.data import DIM, check_vectors, encode  # noqa: F401 (DIM: re-exported for the tests)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (servers of the tests bind loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_files(path: str) -> list[str]:
    return sorted(os.listdir(path))


def mapped_files(path: str) -> list[str]:
    """Lines of /proc/self/maps that map a file under ``path`` (deleted or not)."""
    prefix = os.path.abspath(path) + "/"
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if prefix in line]


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _report_errors(q: Any, fn: Any, *args: Any) -> None:
    try:
        q.put(("ok", fn(*args)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


# ------------------------------------------------------------------ process targets


def reader_loop(path: str, name: str, base_keys: int, key_space: int, seed: int, expect_backend: str,
                ready: Any, go: Any, stop: Any, q: Any) -> None:
    """Read random batches until ``stop``; every found vector must be one whole write, and a
    key's version never goes backwards. Base keys are never deleted, so they should always be
    found: lookups that miss one are counted and reported (``misses``).
    Finally read every key once more and report the versions (-1: missing)."""

    def run() -> dict[str, Any]:
        assert expect_backend == embkv.KERNEL_BACKEND, embkv.KERNEL_BACKEND
        table = embkv.open(path, readonly=True)[name]
        rng = np.random.default_rng(seed)
        last = np.full(key_space, -1, dtype=np.int64)
        reads = misses = 0
        max_version = -1
        ready.set()
        go.wait()
        while not stop.is_set():
            keys = rng.choice(key_space, size=256, replace=False).astype(np.int64)
            vectors, found = table.get(keys)
            base = keys < base_keys
            misses += int((base & ~found).sum())
            versions = check_vectors(keys[found], vectors[found])
            prev = last[keys[found]]
            assert (versions >= prev).all(), "a key's version went backwards"
            last[keys[found]] = versions
            max_version = max(max_version, int(versions.max(initial=-1)))
            if reads % 16 == 0:
                present = table.contains(keys)
                misses += int((base & ~present).sum())
                assert len(table) >= base_keys
            reads += 1
        # the writer is done: this read must see the final state
        all_keys = np.arange(key_space, dtype=np.int64)
        vectors, found = table.get(all_keys)
        final = np.full(key_space, -1, dtype=np.int64)
        final[found] = check_vectors(all_keys[found], vectors[found])
        return {"reads": reads, "misses": misses, "max_version": max_version, "final": final,
                "len": len(table)}

    _report_errors(q, run)


def put_loop_until_killed(path: str, name: str, batch: int, conn: Any) -> None:
    """Put batches forever: round i writes keys [i*batch, (i+1)*batch) plus rewrites the keys
    of round i-1, all at version i; sends i after put(i) returned (an acknowledged put).
    The next round's data is ready before the ack goes out, so the process is inside put()
    right after the ack: a kill that follows an ack lands in the middle of a batch."""
    table = embkv.open(path, lock_timeout=5)[name]

    def round_data(i: int) -> tuple[np.ndarray, np.ndarray]:
        keys = np.arange(max(0, i - 1) * batch, (i + 1) * batch, dtype=np.int64)
        return keys, encode(keys, i)

    i = 0
    keys, vectors = round_data(0)
    while True:
        table.put(keys, vectors)
        keys, vectors = round_data(i + 1)
        conn.send(i)
        i += 1


def put_big_batches(path: str, name: str, batch: int, dim: int, conn: Any) -> None:
    """Round i puts keys [i*batch, (i+1)*batch) at version i, acknowledging each round."""
    table = embkv.open(path, lock_timeout=5)[name]
    i = 0
    keys = np.arange(batch, dtype=np.int64)
    vectors = encode(keys, 0, dim)
    while True:
        table.put(keys, vectors)
        keys = keys + batch
        vectors = encode(keys, i + 1, dim)
        conn.send(i)
        i += 1


def hold_lock(path: str, name: str, held: Any, release: Any, q: Any) -> None:
    """Hold the table's writer lock until ``release`` is set."""

    def run() -> int:
        table = embkv.open(path)[name]
        with table.write_session():
            held.set()
            assert release.wait(60), "never released"
        return os.getpid()

    _report_errors(q, run)


def hold_lock_then_die(path: str, name: str, keys: Any, held: Any) -> None:
    """Enter a write batch, write some rows through the kernel, then block until killed."""
    from embkv.file.mapping import put_packed

    table = embkv.open(path)[name]
    with table.write_session() as session:
        assert put_packed(session.mapping, np.ascontiguousarray(keys, dtype=np.int64), encode(keys, 77), None)
        held.set()
        time.sleep(600)


def timed_put(path: str, name: str, keys: Any, version: int, lock_timeout: float, started: Any,
              q: Any) -> None:
    def run() -> float:
        table = embkv.open(path, lock_timeout=lock_timeout)[name]
        started.set()
        t0 = time.monotonic()
        table.put(keys, encode(keys, version))
        return time.monotonic() - t0

    _report_errors(q, run)


def writer_rounds(path: str, name: str, writer_id: int, own_keys: Any, shared_keys: Any, rounds: int,
                  barrier: Any, q: Any) -> None:
    """Write own keys (disjoint from the other writer's) and shared keys in many small batches."""

    def run() -> int:
        table = embkv.open(path, lock_timeout=60)[name]
        own = np.asarray(own_keys, dtype=np.int64)
        shared = np.asarray(shared_keys, dtype=np.int64)
        chunks = np.array_split(own, rounds)
        barrier.wait(60)
        for r, chunk in enumerate(chunks):
            table.put(chunk, encode(chunk, writer_id * 10_000 + r))
            table.put(shared, encode(shared, writer_id * 10_000 + r))
        return rounds

    _report_errors(q, run)


def version_reader(path: str, name: str, conn: Any) -> None:
    """Answer "read" commands with what the reader sees now, "maps" with its mappings of the store."""
    try:
        table = embkv.open(path, readonly=True)[name]
        conn.send(("ready", os.getpid()))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "read":
                keys = np.asarray(arg, dtype=np.int64)
                vectors, found = table.get(keys)
                versions = np.full(len(keys), -1, dtype=np.int64)
                versions[found] = check_vectors(keys[found], vectors[found])
                conn.send(("read", versions, len(table)))
            elif cmd == "maps":
                conn.send(("maps", mapped_files(path)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def read_forever(path: str, name: str, conn: Any) -> None:
    table = embkv.open(path, readonly=True)[name]
    keys = np.arange(100, dtype=np.int64)
    table.get(keys)
    conn.send("reading")
    while True:
        table.get(keys)


def load_and_block(path: str, name: str, n: int, conn: Any) -> None:
    """Start a load_table whose progress callback blocks: dies holding the lock and a temp file."""
    store = embkv.open(path)
    keys = np.arange(n, dtype=np.int64)

    def progress(rows: int) -> None:
        conn.send(("building", os.getpid()))
        signal.pause()

    store.load_table(name, keys, encode(keys, 5), progress=progress)


def create_race(path: str, name: str, dim: int, barrier: Any, q: Any) -> None:
    def run() -> str:
        store = embkv.open(path)
        barrier.wait(60)
        try:
            store.create_table(name, dim)
        except embkv.TableExistsError:
            return "exists"
        return "created"

    _report_errors(q, run)


# ------------------------------------------------------------------ forked children (os.fork)


def die_in_put_packed(after_calls: int) -> None:
    """Call in a forked child: SIGKILL the process when embkv applies its ``after_calls``-th batch
    through the kernel (``put_packed``, called by ``Table.put`` and by ``build_version`` when a
    version is built), after the batch was logged and before any of it is applied."""
    import embkv.file.mapping
    import embkv.file.table

    real = embkv.file.mapping.put_packed
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= after_calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    embkv.file.mapping.put_packed = dying  # type: ignore[assignment]
    embkv.file.table.put_packed = dying  # type: ignore[assignment]


def results_of(procs: list[Any], out: Any, timeout: float = 60.0) -> list[Any]:
    """Start ``procs``, take one result per process from the queue ``out``, join them, and
    assert that each exited with status 0."""
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    return results


def fork_and_run(fn: Any) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; returns (wait status, text the child reported).

    The child never returns into the caller (pytest): it reports ``repr(fn())`` or the
    traceback over a pipe and leaves with os._exit (0 = ok, 1 = exception).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            text = repr(fn())
            code = 0
        except BaseException:
            text = traceback.format_exc()
        finally:
            try:
                os.write(wfd, text.encode()[-60000:])
            finally:
                os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks).decode(errors="replace")
