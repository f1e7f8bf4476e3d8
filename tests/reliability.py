"""Machinery of the reliability tests: SIGKILL crash trials and torn-read readers.

Shared by tests/file/test_crash.py, tests/file/test_torn_reads.py and scripts/soak.py, so it imports no
pytest. Children are forked from the already-imported caller (``os.fork`` / the "fork"
context): a crash trial costs milliseconds, not an interpreter start.

Crash trial, in short: the parent derives a deterministic list of operations from
``(seed, trial)`` and the current content (a ``versions`` array: key -> version written, -1 =
absent), forks a child that runs them on the store and reports ``begin i`` / ``ack i`` over a
pipe, SIGKILLs it after a random delay, then judges what is on the store:

1. ``check_table`` on the file read-only, before any writer reopens it. A writer killed inside a
   batch leaves ``dirty`` set and may leave the live/tombstone counters one step behind the
   index (it bumps them after the slot store): those three notes are expected and counted;
   anything else (row checksums, index, free list, reachability) is a bad outcome.
2. A read-only handle: every acknowledged op is visible, every key holds a whole vector of the
   version the model allows (the in-flight op may be partly visible: batches are atomic across
   crashes, not to concurrent readers), a load_table in flight is all-or-nothing.
3. A writable reopen (recovery runs), then ``check_table`` must be clean, no temp file is left,
   row accounting adds up, and the content is exactly "every acknowledged op applied" or exactly
   "that plus the in-flight op": never part of a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import select
import signal
import struct
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

import embkv
from embkv.file.check import check_table
from helpers import DIM, encode

TABLE = "t"
KEY_SPACE = 1 << 14  # keys are < 2**24 so that float32 vectors hold them exactly (see helpers.encode)
OPS_PER_TRIAL = 120

# the notes check_table may print about a file whose writer was killed inside a batch, before
# the next writer recovered it: the dirty flag itself, and the two counters that the kernel
# bumps right after publishing a slot (so they may lag the index by the op in progress)
EXPECTED_AFTER_KILL = ("a writer (pid ", "live-key counter says ", "tombstone counter says ")

_MSG = struct.Struct("<Bi")
READY, BEGIN, ACK, DONE, ERROR = range(5)


@dataclasses.dataclass
class Op:
    kind: str  # "put", "delete" or "load"
    keys: np.ndarray
    version: int


def iter_ops(rng: np.random.Generator, versions: np.ndarray, first_version: int) -> Iterator[Op]:
    """An endless deterministic random sequence of ops given the current content (``versions``, -1 = absent).

    Puts of 1-300 keys mixing overwrites and new keys (so the table grows from a small capacity
    and its index fills with tombstones and gets rebuilt), sometimes with duplicate keys;
    deletes of present and absent keys; now and then a load_table of a whole new version.
    The child and the parent draw the same sequence from the same seed, each as far as it needs.
    """
    present = versions >= 0
    version = first_version
    while True:
        r = rng.random()
        if r < 0.04:
            keys = rng.choice(KEY_SPACE, size=int(rng.integers(1, 1500)), replace=False)
            present[:] = False
            present[keys] = True
            yield Op("load", keys.astype(np.int64), version)
        elif r < 0.28:
            live = np.flatnonzero(present)
            n = int(rng.integers(1, 100))
            keys = np.concatenate([rng.choice(live, size=min(n, len(live)), replace=False),
                                   rng.integers(0, KEY_SPACE, size=int(rng.integers(0, 5)))])
            present[keys] = False
            yield Op("delete", keys.astype(np.int64), version)
        else:
            n = int(rng.integers(1, 301))
            n_new = int(rng.binomial(n, rng.random()))
            absent = np.flatnonzero(~present)
            live = np.flatnonzero(present)
            new = rng.choice(absent, size=min(n_new, len(absent)), replace=False)
            old = rng.choice(live, size=min(n - len(new), len(live)), replace=False)
            keys = np.concatenate([new, old])
            rng.shuffle(keys)
            if rng.random() < 0.1 and len(keys) > 1:  # duplicates in one batch: same vector, last wins
                keys = np.concatenate([keys, keys[: int(rng.integers(1, len(keys)))]])
            present[keys] = True
            yield Op("put", keys.astype(np.int64), version)
        version += 1


def make_ops(rng: np.random.Generator, versions: np.ndarray, n_ops: int, first_version: int) -> list[Op]:
    """The first ``n_ops`` of :func:`iter_ops`."""
    return list(itertools.islice(iter_ops(rng, versions, first_version), n_ops))


def apply_op(versions: np.ndarray, op: Op) -> None:
    if op.kind == "put":
        versions[op.keys] = op.version
    elif op.kind == "delete":
        versions[op.keys] = -1
    else:
        versions[:] = -1
        versions[op.keys] = op.version


def read_versions(table: embkv.Table) -> tuple[np.ndarray, int]:
    """The version of every key in the universe (-1: absent) and how many vectors were not whole."""
    keys = np.arange(KEY_SPACE, dtype=np.int64)
    vectors, found = table.get(keys)
    got = np.full(KEY_SPACE, -1, dtype=np.int64)
    got[found] = vectors[found, 1].astype(np.int64)
    torn = int(bad_rows(keys[found], vectors[found]).sum())
    return got, torn


def bad_rows(keys: Any, vectors: np.ndarray) -> np.ndarray:
    """Mask of vectors that are not one whole write of their key (see helpers.encode)."""
    k = np.asarray(keys, dtype=np.int64).reshape(-1)
    if not len(k):
        return np.zeros(0, dtype=bool)
    want = encode(k, vectors[:, 1].astype(np.int64), vectors.shape[1])
    mask: np.ndarray = (want != vectors).any(axis=1)
    return mask


# ------------------------------------------------------------------ the child


def _send(fd: int, kind: int, i: int, text: str = "") -> None:
    data = _MSG.pack(kind, i)
    if text:
        raw = text.encode()[-4000:]
        data += struct.pack("<I", len(raw)) + raw
    os.write(fd, data)


def _child(path: str, sync: str, ops: Iterator[Op], wfd: int) -> None:
    """Run ``ops`` on the store, reporting each op before and after; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        store = embkv.open(path, sync=sync, lock_timeout=10)
        table = store[TABLE]
        _send(wfd, READY, 0)
        for i, op in enumerate(itertools.islice(ops, OPS_PER_TRIAL)):
            vectors = None if op.kind == "delete" else encode(op.keys, op.version)
            _send(wfd, BEGIN, i)
            if op.kind == "put":
                table.put(op.keys, vectors)
            elif op.kind == "delete":
                table.delete(op.keys)
            else:
                store.load_table(TABLE, op.keys, vectors)
            _send(wfd, ACK, i)
        _send(wfd, DONE, OPS_PER_TRIAL)
        while True:  # wait for the kill
            time.sleep(1)
    except BaseException:
        code = 1
        with contextlib.suppress(BaseException):
            _send(wfd, ERROR, 0, traceback.format_exc())
    finally:
        os._exit(code)


def _parse(buf: bytes) -> tuple[list[tuple[int, int]], str]:
    msgs, pos, error = [], 0, ""
    while pos + _MSG.size <= len(buf):
        kind, i = _MSG.unpack_from(buf, pos)
        pos += _MSG.size
        if kind == ERROR:
            (n,) = struct.unpack_from("<I", buf, pos)
            error = buf[pos + 4 : pos + 4 + n].decode(errors="replace")
            pos += 4 + n
        msgs.append((kind, i))
    return msgs, error


# ------------------------------------------------------------------ the parent


@dataclasses.dataclass
class CrashStats:
    """Running totals of a crash campaign."""

    trials: int = 0
    kills: int = 0
    landed: Counter[str] = dataclasses.field(default_factory=Counter)  # where the kills landed
    in_flight_applied: int = 0  # in-flight op found complete after recovery
    in_flight_dropped: int = 0  # in-flight op found absent after recovery
    publishes: int = 0  # trials during which a new version was published (growth, rebuild, load)
    notes_before_recovery: Counter[str] = dataclasses.field(default_factory=Counter)
    acked_ops: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: CrashStats) -> None:
        self.trials += other.trials
        self.kills += other.kills
        self.landed.update(other.landed)
        self.in_flight_applied += other.in_flight_applied
        self.in_flight_dropped += other.in_flight_dropped
        self.publishes += other.publishes
        self.notes_before_recovery.update(other.notes_before_recovery)
        self.acked_ops += other.acked_ops
        self.bad += other.bad

    @property
    def mid_op(self) -> int:
        return sum(v for k, v in self.landed.items() if k.startswith("mid-"))

    def summary(self, label: str) -> str:
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.landed.items()))
        notes = ", ".join(f"{k} {v}" for k, v in sorted(self.notes_before_recovery.items())) or "none"
        return (f"{label}: trials {self.trials}, kills {self.kills}: mid-op {self.mid_op}, "
                f"between ops {self.kills - self.mid_op} ({where}); in-flight op after recovery: applied "
                f"{self.in_flight_applied}, absent {self.in_flight_dropped}; versions published during a trial "
                f"{self.publishes}; acknowledged ops verified {self.acked_ops}; check notes before recovery: "
                f"{notes}; bad outcomes {len(self.bad)}")


def _classify_note(problem: str) -> str | None:
    for i, prefix in enumerate(EXPECTED_AFTER_KILL):
        if problem.startswith(prefix):
            return ("dirty", "live counter", "tombstone counter")[i]
    return None


class CrashCampaign:
    """Repeated SIGKILL trials on one table; ``versions`` is the model of its content."""

    def __init__(self, path: str, sync: str, seed: int, max_delay: float = 0.020) -> None:
        self.path = path
        self.sync = sync
        self.seed = seed
        self.max_delay = max_delay
        self.file = os.path.join(path, TABLE + ".ekv")
        self.versions = np.full(KEY_SPACE, -1, dtype=np.int64)
        self.next_version = 1
        self.stats = CrashStats()
        with embkv.open(path, sync=sync) as store:
            store.create_table(TABLE, DIM, capacity=16)

    def _reset_small(self) -> None:
        """Start over from an empty 16-row table, so growth from a small capacity keeps happening."""
        with embkv.open(self.path, sync=self.sync) as store:
            store.drop_table(TABLE)
            store.create_table(TABLE, DIM, capacity=16)
        self.versions[:] = -1

    def trial(self) -> None:
        n = self.stats.trials
        rng = np.random.default_rng([self.seed, n])
        if n and rng.random() < 0.08:
            self._reset_small()
        if self.next_version + OPS_PER_TRIAL >= 1 << 24:  # versions must stay exact in float32 (long soaks)
            self._reset_small()
            self.next_version = 1
        # where to aim the kill: mostly 0..max_delay after the child is ready to write, sometimes
        # at once, sometimes counted from the fork (lands in open and recovery of the last dead writer)
        regime = rng.random()
        wait_ready = regime >= 0.1
        if not wait_ready:
            delay = float(rng.uniform(0, 0.004))
        elif regime < 0.15:
            delay = 0.0
        else:
            delay = float(rng.uniform(0, self.max_delay))
        start = self.versions.copy()
        ops_seed = [self.seed, n, 1]
        inode = os.stat(self.file).st_ino
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(self.path, self.sync, iter_ops(np.random.default_rng(ops_seed), start, self.next_version), wfd)
        os.close(wfd)
        buf = b""
        try:
            if wait_ready:
                deadline = time.monotonic() + 30
                while len(buf) < _MSG.size:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([rfd], [], [], left)[0]:
                        break
                    chunk = os.read(rfd, 65536)
                    if not chunk:
                        break
                    buf += chunk
            if delay:
                time.sleep(delay)
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            while chunk := os.read(rfd, 65536):
                buf += chunk
            os.close(rfd)
        self.stats.trials += 1
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        self.stats.kills += killed
        msgs, error = _parse(buf)
        prefix = f"{self.sync} trial {n} (seed {self.seed})"
        if error or not killed:
            self.stats.bad.append(f"{prefix}: child failed: {error or status}")
        begun = sum(kind == BEGIN for kind, _ in msgs)
        ops = make_ops(np.random.default_rng(ops_seed), start, begun, self.next_version)
        self._judge(ops, msgs, inode, prefix)
        self.next_version += OPS_PER_TRIAL

    def _judge(self, ops: list[Op], msgs: list[tuple[int, int]], inode: int, prefix: str) -> None:
        stats = self.stats
        acked = [i for kind, i in msgs if kind == ACK]
        begun = [i for kind, i in msgs if kind == BEGIN]
        if acked != list(range(len(acked))) or begun[: len(acked)] != acked or len(begun) > len(acked) + 1:
            stats.bad.append(f"{prefix}: garbled reports {msgs[:10]}")
            return
        last = len(acked) - 1
        in_flight = ops[last + 1] if len(begun) > len(acked) else None
        if in_flight is not None:
            where = f"mid-{in_flight.kind}"
        elif not any(kind == READY for kind, _ in msgs):
            where = "during open/recovery"
        elif any(kind == DONE for kind, _ in msgs):
            where = "after the last op"
        else:
            where = "between ops"
        stats.landed[where] += 1
        want_a = self.versions.copy()
        for op in ops[: last + 1]:
            apply_op(want_a, op)
        want_b = want_a.copy()
        if in_flight is not None:
            apply_op(want_b, in_flight)
        stats.acked_ops += last + 1
        published = False
        with contextlib.suppress(FileNotFoundError):
            published = os.stat(self.file).st_ino != inode
        stats.publishes += published

        # (1) check, read-only, before any writer reopened the file
        report = check_table(self.file)
        notes = set()
        for problem in report.problems:
            note = _classify_note(problem)
            if note is None:
                stats.bad.append(f"{prefix}: check before recovery: {problem} ({where})")
            else:
                notes.add(note)
                stats.notes_before_recovery[note] += 1
        # (2) what a reader sees before recovery: every acknowledged op, whole vectors
        with embkv.open(self.path, readonly=True) as ro:
            got, torn = read_versions(ro[TABLE])
        allowed = (got == want_a) | (got == want_b)
        if torn or not allowed.all():
            k = int(np.flatnonzero(~allowed)[0]) if not allowed.all() else 0
            stats.bad.append(f"{prefix}: reader before recovery: {torn} torn vectors; key {k} has version "
                             f"{got[k]}, allowed {want_a[k]} or {want_b[k]} ({where})")
        if in_flight is not None and in_flight.kind == "load" and not (
                (got == want_a).all() or (got == want_b).all()):
            stats.bad.append(f"{prefix}: reader saw part of a load_table")
        # (3) a writable reopen recovers; then everything must be exact
        with embkv.open(self.path, sync=self.sync, lock_timeout=10) as store:
            table = store[TABLE]
            got, torn = read_versions(table)
            info = table.info()
            leftovers = sorted(set(os.listdir(self.path)) - {TABLE + ".ekv", TABLE + ".ekv.lock",
                                                              TABLE + ".ekv.wal"})
        problems = []
        report = check_table(self.file)
        if not report.ok:
            problems.append(f"check after recovery: {report.problems}")
        if info["rows_used"] - info["free_rows"] != info["rows"] or info["rows"] != int((got >= 0).sum()):
            problems.append(f"row accounting after recovery: rows {info['rows']}, rows_used {info['rows_used']}, "
                            f"free {info['free_rows']}, keys found {int((got >= 0).sum())}")
        if leftovers:
            problems.append(f"files left in the store: {leftovers}")
        if torn:
            problems.append(f"{torn} torn vectors after recovery")
        changed = want_a != want_b
        if (got == want_a).all():
            if in_flight is not None and changed.any():
                stats.in_flight_dropped += 1
        elif (got == want_b).all():
            stats.in_flight_applied += 1
        else:
            wrong = np.flatnonzero((got != want_a) & (got != want_b))
            done = int(((got == want_b) & changed).sum())
            detail = (f"key {wrong[0]} has version {got[wrong[0]]}, want {want_a[wrong[0]]} or {want_b[wrong[0]]}"
                      if len(wrong) else f"{done} of the {int(changed.sum())} keys of the in-flight op applied")
            problems.append(f"content after recovery is neither before nor after the in-flight op: {detail}")
        if problems:
            stats.bad.append(f"{prefix} ({where}, published: {published}, check notes before recovery: "
                             f"{sorted(notes)}): " + "; ".join(problems))
            # start the next trial from a clean table, so that one bad outcome (a leaked row, say)
            # is not counted again by the trials after it
            self._reset_small()
            return
        self.versions = got  # carry on from what is really there (once judged)


# ------------------------------------------------------------------ torn reads


def torn_reader(path: str, name: str, key_type: str, key_space: int, seed: int, use_numpy: bool,
                ready: Any, go: Any, stop: Any, q: Any) -> None:
    """Read random batches until ``stop``, verifying every vector: key, version, every element.

    Every key is always present, so a miss is a bad read too, and a key's version must never go
    backwards. Reports counts rather than failing at the first bad read.
    """
    try:
        from embkv.file import kernels

        if use_numpy:  # a forked child cannot re-import: switch this process to the numpy kernel
            kernels._C_KERNELS = None
        use_numpy = kernels._C_KERNELS is None  # also true in a session run with EMBKV_KERNEL=numpy
        table = embkv.open(path, readonly=True)[name]
        rng = np.random.default_rng(seed)
        last = np.full(key_space, -1, dtype=np.int64)
        str_names = np.array([f"k{i}" for i in range(key_space)], dtype=object)
        reads = vectors_read = torn = missing = backwards = 0
        example = ""
        ready.set()
        go.wait()
        while not stop.is_set():
            idx = rng.choice(key_space, size=64, replace=False)
            keys: Any = idx if key_type == "int64" else str_names[idx].tolist()
            vectors, found = table.get(keys)
            reads += 1
            vectors_read += int(found.sum())
            missing += int((~found).sum())
            bad = bad_rows(idx[found], vectors[found])
            if bad.any():
                torn += int(bad.sum())
                example = example or f"key {idx[found][bad][0]}: {vectors[found][bad][0].tolist()[:6]}..."
            versions = vectors[found, 1].astype(np.int64)
            back = versions < last[idx[found]]
            backwards += int(back.sum())
            last[idx[found]] = np.maximum(versions, last[idx[found]])
        q.put(("ok", {"reads": reads, "vectors": vectors_read, "torn": torn, "missing": missing,
                      "backwards": backwards, "example": example, "numpy": use_numpy}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def stop_processes(procs: list[Any], q: Any, *events: Any) -> None:
    """Set ``events`` (stop, go, ...), join the reader processes (kill stragglers), close their queue."""
    for event in events:
        event.set()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    q.close()
    q.join_thread()


def rewrite_as_fast_as_possible(table: embkv.Table, key_type: str, key_space: int, dim: int, seconds: float,
                                seed: int) -> int:
    """Overwrite random keys with increasing versions for ``seconds``; returns the rows written.

    Every overwrite is copy-on-write into a free row, and the old row goes back on the free stack:
    with a small table, rows are recycled (for other keys) within microseconds, which is what a
    reader's seqlock must catch.
    """
    rng = np.random.default_rng(seed)
    str_names = np.array([f"k{i}" for i in range(key_space)], dtype=object)
    version, rows = 1, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            n = int(rng.integers(1, 65))
            idx = rng.choice(key_space, size=n, replace=False)
            keys: Any = idx if key_type == "int64" else str_names[idx].tolist()
            table.put(keys, encode(idx, version, dim))
            version += 1
            rows += n
    return rows


def version_watcher(path: str, name: str, key_space: int, seed: int, conn: Any) -> None:
    """Read random batches until told to stop; every table version in these tests holds all keys
    at one version number, so every answer must be whole vectors, all found, all of one version.

    Commands over ``conn``: ``"snapshot"`` -> the set of versions seen by one read of every key;
    ``"stop"`` -> the totals. Errors are reported as ("error", traceback).
    """
    try:
        table = embkv.open(path, readonly=True)[name]
        rng = np.random.default_rng(seed)
        totals = {"reads": 0, "vectors": 0, "torn": 0, "missing": 0, "mixed": 0, "versions_seen": set()}
        conn.send(("ready", os.getpid()))
        while True:
            if conn.poll():
                cmd = conn.recv()
                if cmd == "stop":
                    conn.send(("ok", totals))
                    return
                keys = np.arange(key_space, dtype=np.int64)
                vectors, found = table.get(keys)
                conn.send(("snapshot", (int(found.sum()), sorted(set(vectors[found, 1].astype(int).tolist())))))
                continue
            keys = rng.choice(key_space, size=64, replace=False).astype(np.int64)
            vectors, found = table.get(keys)
            totals["reads"] += 1
            totals["vectors"] += int(found.sum())
            totals["missing"] += int((~found).sum())
            totals["torn"] += int(bad_rows(keys[found], vectors[found]).sum())
            versions = set(vectors[found, 1].astype(int).tolist())
            totals["mixed"] += len(versions) > 1
            totals["versions_seen"] |= versions
    except BaseException:
        conn.send(("error", traceback.format_exc()))
