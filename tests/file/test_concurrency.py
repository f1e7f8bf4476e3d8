"""Several real processes on one store: readers during writes and publishes, killed writers,
killed readers, dead builders, fork, and the writer lock.

Process targets live in helpers.py so that "spawn" children can import them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator

import numpy as np
import pytest

import embkv
import helpers
from helpers import DIM, check_vectors, encode, pid_gone, store_files

SPAWN = mp.get_context("spawn")
FORK = mp.get_context("fork")
COUNTERS = 128  # byte offset of the header counters (format.COUNTERS_OFFSET)
WAIT = 60  # seconds: generous bound for a spawned interpreter to get going on a loaded machine


@contextlib.contextmanager
def running(*procs: mp.process.BaseProcess) -> Iterator[None]:
    """Start processes; on the way out (also on failure) kill and reap whatever still runs."""
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.join(timeout=10 if p.exitcode is None else 0)
            if p.is_alive():
                p.kill()
                p.join()


def results(q, n: int) -> list:
    out = []
    for _ in range(n):
        status, value = q.get(timeout=WAIT)
        assert status == "ok", value
        out.append(value)
    return out


def check_accounting(t: embkv.Table) -> None:
    info = t.info()
    assert info["rows"] == len(t) == len(t.keys())
    assert info["rows_used"] - info["free_rows"] == info["rows"], info


# ------------------------------------------------------------------ (1) readers during writes


@pytest.mark.parametrize("reader_kernel", ["c", "numpy"])
def test_readers_only_see_whole_versions(store, monkeypatch, reader_kernel):
    """3 spawned readers read continuously while this process updates rows in place, inserts
    (growing the table), deletes, and publishes whole new versions with load_table."""
    base, key_space = 2000, 12_000
    t = store.create_table("emb", DIM, capacity=64)
    keys = np.arange(base)
    t.put(keys, encode(keys, 0))
    truth = np.full(key_space, -1, dtype=np.int64)
    truth[keys] = 0

    if reader_kernel == "numpy":
        monkeypatch.setenv("EMBKV_KERNEL", "numpy")
    else:
        monkeypatch.delenv("EMBKV_KERNEL", raising=False)
    ready = [SPAWN.Event() for _ in range(3)]
    go, stop, q = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    readers = [SPAWN.Process(target=helpers.reader_loop,
                             args=(store.path, "emb", base, key_space, 100 + i, reader_kernel, ready[i], go, stop, q))
               for i in range(3)]
    loads = 0
    with running(*readers):
        try:
            for e in ready:
                assert e.wait(WAIT), "reader did not start"
            go.set()
            rng = np.random.default_rng(99)
            version, next_key = 0, base
            deadline = time.monotonic() + 2.5
            while version < 60 or (time.monotonic() < deadline and version < 3000):
                version += 1
                if version % 25 == 0:
                    alive = np.flatnonzero(truth >= 0)
                    store.load_table("emb", alive, encode(alive, version))
                    truth[alive] = version
                    loads += 1
                    continue
                upd = rng.choice(base, size=200, replace=False)
                t.put(upd, encode(upd, version))
                truth[upd] = version
                if next_key < key_space:
                    new = np.arange(next_key, min(next_key + 40, key_space))
                    t.put(new, encode(new, version))
                    truth[new] = version
                    next_key = int(new[-1]) + 1
                if version % 7 == 0:
                    grown = np.flatnonzero(truth[base:] >= 0) + base
                    dead = rng.choice(grown, size=min(15, len(grown)), replace=False)
                    assert t.delete(dead) == len(dead)
                    truth[dead] = -1
                if version % 11 == 0:  # bring some deleted keys back (reuses tombstones)
                    gone = np.flatnonzero(truth[base:next_key] < 0)[:10] + base
                    t.put(gone, encode(gone, version))
                    truth[gone] = version
        finally:
            stop.set()
            go.set()
        out = results(q, len(readers))
    assert loads >= 2 and t.capacity > base
    for r in out:
        assert r["reads"] >= 20
        assert r["max_version"] >= 25, "readers never saw a published version"
        np.testing.assert_array_equal(r["final"], truth)
        assert r["len"] == int((truth >= 0).sum())
    assert store_files(store.path) == ["emb.ekv", "emb.ekv.lock", "emb.ekv.wal"]
    misses = sum(r["misses"] for r in out)
    assert misses == 0, f"readers reported keys that were never deleted as missing {misses} times"


# ------------------------------------------------------------------ (2) killed writers


def _expected_after_kill(last: int, batch: int, space: int) -> tuple[np.ndarray, np.ndarray]:
    """Versions allowed per key after rounds 0..last were acknowledged (see put_loop_until_killed):
    (lowest, highest); -1 means missing. Round last+1 may have been cut anywhere."""
    block = np.arange(space) // batch
    lo = np.where(block + 1 <= last, block + 1, block).astype(np.int64)
    lo[block > last] = -1
    hi = lo.copy()
    hi[block == last] = last + 1  # rewritten by the interrupted round, maybe
    hi[block == last + 1] = last + 1  # inserted by the interrupted round, maybe
    return lo, hi


def _check_after_kill(t: embkv.Table, last: int, batch: int) -> None:
    space = (last + 3) * batch
    lo, hi = _expected_after_kill(last, batch, space)
    keys = np.arange(space, dtype=np.int64)
    vectors, found = t.get(keys)
    got = np.full(space, -1, dtype=np.int64)
    got[found] = check_vectors(keys[found], vectors[found])
    ok = (got == lo) | (got == hi)
    assert ok.all(), f"key {keys[~ok][0]}: version {got[~ok][0]}, want {lo[~ok][0]} or {hi[~ok][0]}"


def counters(path: str) -> dict[str, int]:
    """The table file's live header counters, read through a separate read-only mapping."""
    raw = np.memmap(path, dtype=np.uint64, mode="r", offset=COUNTERS, shape=(8,))
    names = ["generation", "live", "rows_used", "free", "heap_used", "tombs", "superseded", "dirty"]
    return {n: int(v) for n, v in zip(names, raw.tolist(), strict=True)}


def test_writer_killed_in_the_middle_of_a_put(store_path):
    """SIGKILL lands while the kernel is half-way through a batch (watched through the table's
    counters): the lock goes with the process, acknowledged puts stay readable, the half-done
    batch shows only whole rows, and the next writer completes the batch from the log and
    repairs the counters."""
    batch, dim = 400_000, 4
    with embkv.open(store_path) as s:
        s.create_table("t", dim, capacity=2 * batch + batch // 2)  # no growth: the kernel loop is the batch
    path = os.path.join(store_path, "t.ekv")
    recv, send = SPAWN.Pipe(duplex=False)
    writer = SPAWN.Process(target=helpers.put_big_batches, args=(store_path, "t", batch, dim, send))
    with running(writer):
        send.close()
        assert recv.poll(WAIT) and recv.recv() == 0  # round 0 acknowledged
        deadline = time.monotonic() + WAIT
        while counters(path)["live"] < batch + 1000:  # round 1 is being written
            assert time.monotonic() < deadline, "writer made no progress"
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(WAIT)
    assert writer.exitcode == -signal.SIGKILL
    at_death = counters(path)
    assert at_death["dirty"] == writer.pid, "the kill did not land inside a batch"
    assert batch < at_death["live"] < 2 * batch

    keys = np.arange(2 * batch, dtype=np.int64)
    ro = embkv.open(store_path, readonly=True)["t"]
    vectors, found = ro.get(keys)
    assert found[:batch].all()
    versions = check_vectors(keys[found], vectors[found])
    assert (versions[:batch] == 0).all() and (versions[batch:] == 1).all()
    partial = int(found[batch:].sum())
    assert 0 < partial < batch

    # the batch was logged before it was applied: a writable open completes it from the log
    t0 = time.monotonic()
    t = embkv.open(store_path, lock_timeout=5)["t"]
    t.put([-1], encode([-1], 2, dim))
    assert time.monotonic() - t0 < 5
    after = counters(path)
    assert after["dirty"] == 0 and after["live"] == 2 * batch + 1
    assert after["rows_used"] - after["free"] == after["live"]  # rows the dead writer took came back
    check_accounting(t)
    assert store_files(store_path) == ["t.ekv", "t.ekv.lock", "t.ekv.wal"]
    vectors, found = t.get(keys)
    assert found.all() and (check_vectors(keys, vectors)[batch:] == 1).all()


@pytest.mark.parametrize(("kill_after", "delay"), [(1, 0.0), (4, 0.0005), (6, 0.002)])
def test_writer_killed_during_put_loop_with_growth(store_path, kill_after, delay):
    """Kill a writer whose batches keep growing the table (so the kill may land in a rebuild
    and publish as well as in a batch): same guarantees."""
    batch = 3000
    with embkv.open(store_path) as s:
        s.create_table("t", DIM, capacity=16)
    recv, send = SPAWN.Pipe(duplex=False)
    writer = SPAWN.Process(target=helpers.put_loop_until_killed, args=(store_path, "t", batch, send))
    acks: list[int] = []
    with running(writer):
        send.close()
        while len(acks) < kill_after:
            assert recv.poll(WAIT), "writer made no progress"
            acks.append(recv.recv())
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < delay:  # positions the kill; nothing waits on it
            pass
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(WAIT)
    assert writer.exitcode == -signal.SIGKILL
    with contextlib.suppress(EOFError):
        while recv.poll(0):
            acks.append(recv.recv())
    last = acks[-1]
    assert acks == list(range(last + 1))

    # readers see every acknowledged put before anyone repairs anything
    _check_after_kill(embkv.open(store_path, readonly=True)["t"], last, batch)
    # the next writer gets the lock at once (the kernel dropped the dead writer's flock) and
    # opening a writable store removes a temp file the writer may have been building
    store = embkv.open(store_path, lock_timeout=5)
    t = store["t"]
    t0 = time.monotonic()
    t.put([-5], encode([-5], 1))
    assert time.monotonic() - t0 < 5
    _check_after_kill(t, last, batch)
    assert t.get([-5])[1].all()
    check_accounting(t)
    assert store_files(store_path) == ["t.ekv", "t.ekv.lock", "t.ekv.wal"]
    # and the table keeps working normally: update and grow
    more = np.arange(10**6, 10**6 + 5000)
    t.put(more, encode(more, 9))
    assert (check_vectors(more, t.get(more)[0]) == 9).all()
    check_accounting(t)


def test_writer_killed_inside_a_batch_is_recovered(store):
    """A writer dies inside ``write_session()`` after writing rows through the kernel: the lock goes
    with it and the next writer recounts the table (the dirty flag) before writing."""
    t = store.create_table("t", DIM, capacity=256)
    keys = np.arange(100)
    t.put(keys, encode(keys, 1))
    held = SPAWN.Event()
    dying = SPAWN.Process(target=helpers.hold_lock_then_die, args=(store.path, "t", np.arange(50, 150), held))
    with running(dying):
        assert held.wait(WAIT)
        impatient = embkv.open(store.path, lock_timeout=0.2)["t"]
        with pytest.raises(embkv.WriterLockedError):
            impatient.put([999], encode([999], 1))
        os.kill(dying.pid, signal.SIGKILL)
        dying.join(WAIT)
    assert dying.exitcode == -signal.SIGKILL
    patient = embkv.open(store.path, lock_timeout=5)["t"]
    t0 = time.monotonic()
    patient.put([999], encode([999], 2))
    assert time.monotonic() - t0 < 5
    all_keys = np.arange(1000)
    vectors, found = patient.get(all_keys)
    versions = check_vectors(all_keys[found], vectors[found])
    assert found[:150].all() and found[999] and found.sum() == 151
    assert versions.tolist() == [1] * 50 + [77] * 100 + [2]
    check_accounting(patient)
    check_accounting(t)


# ------------------------------------------------------------------ killed readers, dead builders


def test_killed_reader_leaves_nothing_behind(store):
    t = store.create_table("t", DIM)
    t.put(np.arange(100), encode(np.arange(100), 1))
    recv, send = SPAWN.Pipe(duplex=False)
    reader = SPAWN.Process(target=helpers.read_forever, args=(store.path, "t", send))
    with running(reader):
        assert recv.poll(WAIT) and recv.recv() == "reading"
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(WAIT)
    assert reader.exitcode == -signal.SIGKILL
    assert store_files(store.path) == ["t.ekv", "t.ekv.lock", "t.ekv.wal"]
    other = embkv.open(store.path, lock_timeout=1)["t"]
    other.put([5], encode([5], 2))  # no lock or state was left to block a writer
    assert check_vectors([5], t.get([5])[0]).tolist() == [2]


def test_dead_builder_temp_file_is_removed(store):
    t = store.create_table("t", DIM)
    t.put(np.arange(10), encode(np.arange(10), 1))
    before = sorted(store_files(store.path))
    recv, send = SPAWN.Pipe(duplex=False)
    builder = SPAWN.Process(target=helpers.load_and_block, args=(store.path, "t", 70_000, send))
    with running(builder):
        assert recv.poll(WAIT)
        assert recv.recv() == ("building", builder.pid)
        temps = [f for f in store_files(store.path) if f not in before]
        assert len(temps) == 1 and re.fullmatch(rf"\.t\.ekv\.{builder.pid}\.[0-9a-f]+\.tmp", temps[0]), temps
        # the builder holds the lock while it builds
        with pytest.raises(embkv.WriterLockedError):
            embkv.open(store.path, lock_timeout=0.1)["t"].put([1], encode([1], 2))
        # a writable store opened while the builder lives leaves its temp file alone
        embkv.open(store.path).close()
        assert temps[0] in store_files(store.path)
        os.kill(builder.pid, signal.SIGKILL)
        builder.join(WAIT)
    assert pid_gone(builder.pid)
    # nothing was published: readers still see the old version
    ro = embkv.open(store.path, readonly=True)
    assert len(ro["t"]) == 10 and temps[0] in store_files(store.path)  # readers never delete
    fresh = embkv.open(store.path, lock_timeout=5)
    assert store_files(store.path) == before
    fresh["t"].put([11], encode([11], 3))
    assert len(ro["t"]) == 11


@pytest.mark.makes_temp_files
def test_stale_temp_of_dead_pid_removed_on_writable_open(store):
    store.create_table("t", DIM).put([1], encode([1], 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    assert pid_gone(dead_pid)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            "dead": f".t.ekv.{dead_pid}.0a1b2c3d.tmp",
            "dead_dotted": f".my.table.ekv.{dead_pid}.ffee0011.tmp",
            "live": f".t.ekv.{live.pid}.0a1b2c3d.tmp",
            "mine": f".t.ekv.{os.getpid()}.12345678.tmp",
            "not_ours": ".notes.txt",
        }
        for name in names.values():
            with open(os.path.join(store.path, name), "wb") as f:
                f.write(b"partial")
        embkv.open(store.path, readonly=True).close()
        assert all(n in store_files(store.path) for n in names.values())
        embkv.open(store.path).close()
        files = store_files(store.path)
        assert names["dead"] not in files and names["dead_dotted"] not in files
        assert names["live"] in files and names["mine"] in files and names["not_ours"] in files
        assert embkv.open(store.path)["t"].get([1])[1].all()
    finally:
        live.communicate(b"", timeout=WAIT)


# ------------------------------------------------------------------ (3) fork


def test_table_opened_before_os_fork_works_in_child(store):
    t = store.create_table("t", DIM, capacity=16)
    t.put(np.arange(100), encode(np.arange(100), 1))
    ro = embkv.open(store.path, readonly=True)["t"]
    assert ro.get([0])[1].all()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            for handle in (t, ro):
                vectors, found = handle.get(np.arange(100))
                assert found.all() and (check_vectors(np.arange(100), vectors) == 1).all()
            t.put([1000], encode([1000], 2))
            grow = np.arange(5000, 8000)
            t.put(grow, encode(grow, 3))  # publishes a bigger version from the child
            assert ro.get(grow)[1].all()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for handle in (t, ro):
        assert check_vectors([1000], handle.get([1000])[0]).tolist() == [2]
        assert (check_vectors(np.arange(5000, 8000), handle.get(np.arange(5000, 8000))[0]) == 3).all()
    t.put([5], encode([5], 4))  # the parent's lock handling is intact
    assert check_vectors([5], ro.get([5])[0]).tolist() == [4]
    check_accounting(t)


def _fork_child(t: embkv.Table, ro: embkv.Table, first: int, q) -> None:
    try:
        vectors, found = ro.get(np.arange(100))
        assert found.all() and (check_vectors(np.arange(100), vectors) == 1).all()
        mine = np.arange(first, first + 2000)
        for chunk in np.array_split(mine, 20):
            t.put(chunk, encode(chunk, 5))
        q.put(("ok", os.getpid()))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def test_fork_context_children_share_handles(store):
    t = store.create_table("t", DIM, capacity=16)
    t.put(np.arange(100), encode(np.arange(100), 1))
    ro = embkv.open(store.path, readonly=True)["t"]
    assert ro.get([0])[1].all()
    q = FORK.Queue()
    kids = [FORK.Process(target=_fork_child, args=(t, ro, 10_000 * (i + 1), q)) for i in range(2)]
    with running(*kids):
        pids = results(q, 2)
    assert sorted(pids) == sorted(k.pid for k in kids)
    assert all(k.exitcode == 0 for k in kids)
    written = np.concatenate([np.arange(10_000, 12_000), np.arange(20_000, 22_000)])
    for handle in (t, ro):
        vectors, found = handle.get(written)
        assert found.all() and (check_vectors(written, vectors) == 5).all()
        assert len(handle) == 4100
    check_accounting(t)


def _locked_fork_child(t: embkv.Table, released, q) -> None:
    try:
        t.lock_timeout = 0.2
        try:
            t.put([7], encode([7], 6))
        except embkv.WriterLockedError:
            q.put(("tried", "locked"))
        else:
            q.put(("tried", "wrote while the parent held the lock"))
        assert released.wait(WAIT)
        t.lock_timeout = 5
        t.put([7], encode([7], 7))
        q.put(("ok", None))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def test_fork_child_does_not_inherit_the_parents_lock(store):
    t = store.create_table("t", DIM)
    t.put([1], encode([1], 1))
    released, q = FORK.Event(), FORK.Queue()
    kid = FORK.Process(target=_locked_fork_child, args=(t, released, q))
    try:
        with t.write_session():
            kid.start()  # forked while this process holds the lock
            first = q.get(timeout=WAIT)
    finally:
        released.set()
    try:
        assert first == ("tried", "locked"), first
        results(q, 1)
    finally:
        kid.join(WAIT)
        if kid.is_alive():
            kid.kill()
            kid.join()
    assert kid.exitcode == 0
    assert check_vectors([7], t.get([7])[0]).tolist() == [7]
    check_accounting(t)


# ------------------------------------------------------------------ (4) the writer lock


def test_two_writer_processes_serialize(store):
    t = store.create_table("t", DIM, capacity=16)
    own = [np.arange(0, 3000), np.arange(100_000, 103_000)]
    shared = np.arange(50_000, 50_100)
    rounds = 60
    barrier, q = SPAWN.Barrier(2), SPAWN.Queue()
    writers = [SPAWN.Process(target=helpers.writer_rounds,
                             args=(store.path, "t", i + 1, own[i], shared, rounds, barrier, q))
               for i in range(2)]
    with running(*writers):
        results(q, 2)
    for i in range(2):
        keys = own[i]
        vectors, found = t.get(keys)
        assert found.all(), f"writer {i + 1} lost rows"
        chunk_round = np.concatenate([np.full(len(c), r) for r, c in enumerate(np.array_split(keys, rounds))])
        assert (check_vectors(keys, vectors) == (i + 1) * 10_000 + chunk_round).all()
    vectors, found = t.get(shared)
    versions = check_vectors(shared, vectors)
    # every put is one batch under the lock: the last batch wins as a whole
    assert found.all() and len(set(versions.tolist())) == 1
    assert versions[0] in (10_000 + rounds - 1, 20_000 + rounds - 1)
    assert len(t) == 6100
    check_accounting(t)


def test_writer_locked_error_and_waiting_writer(store):
    t = store.create_table("t", DIM)
    t.put(np.arange(10), encode(np.arange(10), 1))
    held, release, q = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=helpers.hold_lock, args=(store.path, "t", held, release, q))
    started, wq = SPAWN.Event(), SPAWN.Queue()
    waiter = SPAWN.Process(target=helpers.timed_put, args=(store.path, "t", np.arange(10, 20), 2, 30, started, wq))
    with running(holder):
        try:
            assert held.wait(WAIT)
            impatient = embkv.open(store.path, lock_timeout=0.2)
            it = impatient["t"]
            for call in (lambda: it.put([50], encode([50], 1)), lambda: it.delete([1]),
                         lambda: impatient.load_table("t", [1], encode([1], 9)), lambda: impatient.drop_table("t"),
                         lambda: it.export()):
                t0 = time.monotonic()
                with pytest.raises(embkv.WriterLockedError):
                    call()
                assert 0.2 <= time.monotonic() - t0 < 5
            # set on the table, the timeout applies to its next write
            patient = embkv.open(store.path)["t"]
            assert patient.lock_timeout == 30.0
            patient.lock_timeout = 0.3
            t0 = time.monotonic()
            with pytest.raises(embkv.WriterLockedError):
                patient.put([51], encode([51], 1))
            assert 0.3 <= time.monotonic() - t0 < 5 and patient.lock_timeout == 0.3
            with running(waiter):
                assert started.wait(WAIT)
                assert wq.empty()  # still waiting: the lock is held
                release.set()
                (waited,) = results(wq, 1)
            results(q, 1)
        finally:
            release.set()
    vectors, found = t.get(np.arange(20))
    assert found.all() and check_vectors(np.arange(20), vectors).tolist() == [1] * 10 + [2] * 10
    assert len(t) == 20 and not t.contains([50]).any()
    assert waited < 30
    assert store.list_tables() == ["t"]


# ------------------------------------------------------------------ (5) version switches


def test_open_readers_switch_to_published_versions(store):
    recv_end, child_end = SPAWN.Pipe()
    store.load_table("t", np.arange(100), encode(np.arange(100), 1))
    reader = SPAWN.Process(target=helpers.version_reader, args=(store.path, "t", child_end))
    probe = np.arange(400)

    def ask(cmd, arg=None):
        recv_end.send((cmd, arg))
        assert recv_end.poll(WAIT)
        answer = recv_end.recv()
        assert answer[0] == cmd, answer
        return answer[1:]

    with running(reader):
        assert recv_end.poll(WAIT)
        assert recv_end.recv()[0] == "ready"
        versions, n = ask("read", probe)
        assert versions.tolist() == [1] * 100 + [-1] * 300 and n == 100
        inodes = {os.stat(os.path.join(store.path, "t.ekv")).st_ino}
        for version, (lo, hi) in enumerate([(50, 200), (0, 10), (150, 400)], start=2):
            keys = np.arange(lo, hi)
            store.load_table("t", keys, encode(keys, version))
            assert store_files(store.path) == ["t.ekv", "t.ekv.lock", "t.ekv.wal"]
            inodes.add(os.stat(os.path.join(store.path, "t.ekv")).st_ino)
            versions, n = ask("read", probe)
            want = np.full(400, -1)
            want[lo:hi] = version
            assert versions.tolist() == want.tolist() and n == hi - lo
            (maps,) = ask("maps")
            assert maps and not [m for m in maps if "(deleted)" in m], maps
        # growth by put publishes a version too
        grow = np.arange(1000, 6000)
        store["t"].put(grow, encode(grow, 9))
        versions, n = ask("read", np.concatenate([probe, grow]))
        assert (versions[400:] == 9).all() and n == 250 + 5000
        (maps,) = ask("maps")
        assert not [m for m in maps if "(deleted)" in m], maps
        recv_end.send(("stop", None))
    assert len(inodes) == 4
    assert reader.exitcode == 0


def test_concurrent_create_table_has_one_winner(store):
    barrier, q = SPAWN.Barrier(3), SPAWN.Queue()
    kids = [SPAWN.Process(target=helpers.create_race, args=(store.path, "t", 4, barrier, q)) for _ in range(3)]
    with running(*kids):
        outcomes = sorted(results(q, 3))
    assert outcomes == ["created", "exists", "exists"]
    assert store_files(store.path) == ["t.ekv"]
    store["t"].put([1], np.ones((1, 4)))
    assert len(store["t"]) == 1
