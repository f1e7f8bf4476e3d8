"""Crash safety: a writer SIGKILLed at random moments, hundreds of times (issue item 1).

Each trial forks a writer from this (already imported) process, so a trial costs
milliseconds. The writer runs a deterministic random sequence of ops (seeded per trial):
put batches of 1-300 keys (new keys, so the table grows from 16 rows, and overwrites),
deletes, now and then a load_table; it reports ``begin i`` / ``ack i`` over a pipe and is
SIGKILLed after a random delay. Then, see reliability.py for the details:

(a) ``check_table`` on the file, read-only, before any writer reopens it: row checksums, index,
    free-row stack and reachability must be sound; the only notes allowed are the ones a
    writer killed inside a batch leaves for the next writer (``dirty``, and the live/tombstone
    counters lagging the index by the op in progress);
(b) a writable reopen (recovery runs), then ``check_table`` is clean;
(c) the whole content equals the model: every acknowledged op applied, the in-flight op
    (begun, not acknowledged) fully or not at all; vectors whole and of the right version.

Run with ``-s`` to see the figures (docs/reliability.md quotes them).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import embkv
from embkv.file.check import check_table
from helpers import check_vectors, die_in_put_packed, encode, fork_and_run
from reliability import CrashCampaign, CrashStats

MEMORY_TRIALS = 200
DISK_TRIALS = 100
TOTAL = CrashStats()


def _campaign(path: str, sync: str, trials: int, seed: int, max_delay: float) -> CrashStats:
    campaign = CrashCampaign(path, sync, seed, max_delay)
    t0 = time.perf_counter()
    for _ in range(trials):
        campaign.trial()
    stats = campaign.stats
    kind = "memory (/dev/shm)" if path.startswith("/dev/shm/") else f'disk, sync="{sync}"'
    print(f"\n[crash] {stats.summary(kind)} in {time.perf_counter() - t0:.1f} s")
    TOTAL.add(stats)
    return stats


def _assert_sound(stats: CrashStats, trials: int) -> None:
    assert stats.trials == trials and stats.kills == trials
    assert not stats.bad, "\n".join(stats.bad[:10])
    # the kills must land all over the cycle, not only between ops
    assert stats.landed["mid-put"] >= trials // 10, stats.landed
    assert stats.landed["between ops"] >= trials // 20, stats.landed
    assert stats.acked_ops > trials


def test_sigkill_trials_memory_store(store_path):
    stats = _campaign(store_path, "never", MEMORY_TRIALS, seed=20240601, max_delay=0.020)
    _assert_sound(stats, MEMORY_TRIALS)
    assert stats.publishes >= MEMORY_TRIALS // 10  # growth, index rebuilds and loads were hit too
    assert stats.landed["mid-load"] + stats.landed["mid-delete"] >= 5, stats.landed


def test_sigkill_trials_disk_store_sync_always(disk_store_path):
    # a synced op costs 0.2-5 ms on disk, so the kills are spread over up to 50 ms
    stats = _campaign(disk_store_path, "always", DISK_TRIALS, seed=20240602, max_delay=0.050)
    _assert_sound(stats, DISK_TRIALS)


def test_crash_totals():
    """At least 200 SIGKILLs in this file, none with a bad outcome (summary line with -s)."""
    if TOTAL.trials < MEMORY_TRIALS + DISK_TRIALS:
        pytest.skip("runs after both campaigns (run the whole file)")
    print(f"\n[crash] {TOTAL.summary('total')}")
    assert TOTAL.kills >= 200
    assert TOTAL.mid_op >= 50
    assert not TOTAL.bad


def _counters(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint64, count=8, offset=128)


def test_batch_that_grows_the_table_is_atomic_after_a_kill(store_path):
    """One batch that does not fit: the writer builds and publishes a bigger version, then
    applies the batch there. Kill it half-way through that apply: after a writable reopen the
    batch must be all or nothing, like any other batch.

    Regression test: before c7e6f91 the grown version was not marked dirty, so the batch
    stayed half applied (and rows leaked) with no recovery on reopen; the crash campaign
    above hit that about once per 150 trials."""
    n, dim = 400_000, 4
    with embkv.open(store_path) as s:
        s.create_table("t", dim, capacity=16).put([-1], encode([-1], 0, dim))
    path = os.path.join(store_path, "t.ekv")
    keys = np.arange(n, dtype=np.int64)
    vectors = encode(keys, 1, dim)
    first_inode = os.stat(path).st_ino
    pid = os.fork()
    if pid == 0:
        try:
            embkv.open(store_path)["t"].put(keys, vectors)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the new version, then for the batch to be half in it
            try:
                if os.stat(path).st_ino != first_inode and 1000 < _counters(path)[1] < n - 1000:
                    break
            except (FileNotFoundError, ValueError):
                continue
        else:
            pytest.fail("never saw the batch half applied to the grown version")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    at_kill = _counters(path)
    assert 0 < at_kill[1] < n + 1  # really half applied
    assert at_kill[7] == pid, "the grown version does not say a writer is inside a batch"
    table = embkv.open(store_path)["t"]  # writable: recovery completes the batch from the log
    assert len(table) in (1, n + 1), f"{len(table) - 1} of the batch's {n} keys are present after recovery"
    assert check_table(path).ok
    info = table.info()
    assert info["rows_used"] - info["free_rows"] == info["rows"]


def test_a_batch_decided_by_recovery_stays_decided(store_path):
    """A batch logged to the grown version and killed before any of it was applied: the next
    writable open decides its fate (completed from the log, or dropped); a crash in the write
    after that must not change the decision.

    Regression test: before c7e6f91 the first open dropped the batch (no dirty flag on the
    grown version) but left its record in the log with the generation the next write reuses,
    so the recovery after the next crash replayed it: a dropped batch came back."""
    dim = 4
    base = np.arange(10, dtype=np.int64)
    with embkv.open(store_path) as s:
        s.create_table("t", dim, capacity=16).put(base, encode(base, 1, dim))
    batch = np.arange(100, 200, dtype=np.int64)

    def grow_then_die() -> None:
        # 1st call: the old version says "no room"; 2nd: building the grown version; 3rd: the batch,
        # logged again to the grown version's log
        die_in_put_packed(after_calls=3)
        embkv.open(store_path)["t"].put(batch, encode(batch, 2, dim))

    assert os.WTERMSIG(fork_and_run(grow_then_die)[0]) == signal.SIGKILL
    with embkv.open(store_path) as s:  # writable reopen: recovery decides the batch
        t = s["t"]
        present = t.contains(batch)
        assert present.all() or not present.any(), "the batch is half there"
        first = present.all()
        assert check_table(t.path).ok

    def write_then_die() -> None:
        die_in_put_packed(after_calls=1)  # killed inside the next write, after logging it
        embkv.open(store_path)["t"].put([5], encode([5], 3, dim))

    assert os.WTERMSIG(fork_and_run(write_then_die)[0]) == signal.SIGKILL
    with embkv.open(store_path) as s:
        t = s["t"]
        present = t.contains(batch)
        assert (present.all() if first else not present.any()), (
            f"the batch was {'applied' if first else 'dropped'} by the first recovery, now {int(present.sum())} "
            f"of its {len(batch)} keys are present")
        assert check_vectors([5], t.get([5])[0])[0] in (1, 3)
        assert check_table(t.path).ok


def _numpy_kernel_child(fn):
    """Run ``fn`` in a forked child whose tables use the numpy fallback kernel."""

    def run():
        from embkv.file import kernels

        kernels._C_KERNELS = None
        return fn()

    return run


def test_numpy_kernel_recovery_completes_a_batch_that_filled_the_table(store_path):
    with embkv.open(store_path) as s:
        s.create_table("t", 16, capacity=16)
    keys = np.arange(16, dtype=np.int64)

    def put_and_die_half_way() -> None:
        from embkv.file import kernels

        real, calls = kernels.NumpyView._put_one, []

        def dying(self, *args):
            calls.append(1)
            if len(calls) > 8:  # 8 of the 16 rows written
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args)

        kernels.NumpyView._put_one = dying
        embkv.open(store_path)["t"].put(keys, encode(keys, 1, 16))

    status, text = fork_and_run(_numpy_kernel_child(put_and_die_half_way))
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    status, text = fork_and_run(_numpy_kernel_child(lambda: len(embkv.open(store_path)["t"])))  # recovers
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert int(text) in (0, 16), f"{text} of the batch's 16 keys are present after recovery"


# ---------------------------------------------------------------- a publisher killed between rename and flag


def _die_right_after(call: str, path_suffix: str) -> None:
    """In a forked child: SIGKILL the process right after ``os.<call>`` acts on a path ending with
    ``path_suffix`` (the new version renamed into place, or the dropped table unlinked)."""
    real = getattr(os, call)

    def dying(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)
        if str(args[-1] if call == "rename" else args[0]).endswith(path_suffix):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(os, call, dying)


def test_readers_learn_of_a_version_whose_publisher_died_before_the_flag(store_path):
    with embkv.open(store_path) as s:
        s.create_table("t", 4, capacity=16).put(np.arange(10), encode(np.arange(10), 1, 4))
    reader = embkv.open(store_path, readonly=True)["t"]
    old_capacity = reader.capacity

    def grow_and_die() -> None:
        t = embkv.open(store_path)["t"]
        _die_right_after("rename", "t.ekv")
        t.put(np.arange(100, 200), encode(np.arange(100, 200), 1, 4))  # grows: a new version

    status, text = fork_and_run(grow_and_die)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, text
    assert os.path.exists(os.path.join(store_path, ".t.ekv.prev"))
    assert reader.capacity == old_capacity  # nobody told the reader yet: it reads the old version
    with embkv.open(store_path):  # a writable open finishes the dead publisher's work
        pass
    assert not os.path.exists(os.path.join(store_path, ".t.ekv.prev"))
    assert reader.capacity > old_capacity, "the reader still reads the replaced version"
    vectors, found = reader.get(np.arange(10))
    assert found.all() and (check_vectors(np.arange(10), vectors) == 1).all()
    reader.close()


def test_next_writer_finishes_a_publish_and_a_publish_that_never_renamed_flags_nothing(store_path):
    with embkv.open(store_path) as s:
        s.create_table("t", 4, capacity=16).put(np.arange(10), encode(np.arange(10), 1, 4))
    reader = embkv.open(store_path, readonly=True)["t"]
    # a publisher that died after linking the old version but before its rename
    os.link(os.path.join(store_path, "t.ekv"), os.path.join(store_path, ".t.ekv.prev"))
    writer = embkv.open(store_path)["t"]
    writer.put([11], encode([11], 1, 4))  # takes the lock: removes the link, flags nothing
    assert not os.path.exists(os.path.join(store_path, ".t.ekv.prev"))
    _, found = reader.get([0, 11])  # the current file was not flagged superseded
    assert found.all()
    writer.close()
    reader.close()


def test_readers_learn_of_a_drop_whose_dropper_died_before_the_flag(store_path):
    with embkv.open(store_path) as s:
        s.create_table("t", 4).put([1], encode([1], 1, 4))
    reader = embkv.open(store_path, readonly=True)["t"]

    def drop_and_die() -> None:
        store = embkv.open(store_path)
        _die_right_after("unlink", "/t.ekv")
        store.drop_table("t")

    status, text = fork_and_run(drop_and_die)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, text
    assert reader.get([1])[1].all()  # still the dropped file
    with embkv.open(store_path):
        pass
    with pytest.raises(embkv.TableNotFoundError):
        reader.get([1])
    reader.close()
