"""Durability (issue items 1, 4): sync policies, SIGKILL under each policy, WAL replay after a
simulated reboot, a torn log tail, check/repair through the command line, and copy between
/dev/shm and disk while readers keep reading.

Disk stores live in ``tempfile.gettempdir()`` (the ``disk_store_path`` fixture).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from click.testing import CliRunner

import embkv
from embkv.cli import main as cli_main
from embkv.file.check import check_table
from embkv.file.format import Layout
from helpers import DIM, check_vectors, die_in_put_packed, encode, fork_and_run
from reliability import version_watcher

FORK = mp.get_context("fork")
WAL_HEADER = 48  # magic, version, reserved, table created_ns, boot id (bytes 24..40), checkpoint generation
BOOT_ID = slice(24, 40)
WAIT = 30


def _versions(t: embkv.Table, keys: np.ndarray) -> np.ndarray:
    vectors, found = t.get(keys)
    got = np.full(len(keys), -1, dtype=np.int64)
    got[found] = check_vectors(keys[found], vectors[found])
    return got


# ------------------------------------------------------------------ sync policies


@pytest.mark.parametrize("sync", ["always", "interval", "never"])
def test_sync_policies_are_accepted_and_work(disk_store_path, sync):
    with embkv.open(disk_store_path, sync=sync, sync_interval=0.05) as s:
        t = s.create_table("t", DIM)
        keys = np.arange(100)
        t.put(keys, encode(keys, 1))
        if sync == "interval":
            time.sleep(0.15)  # the background syncer runs
            assert any(th.name.startswith("embkv-wal-sync") for th in threading.enumerate())
        assert (_versions(t, keys) == 1).all()
    assert not any(th.name.startswith("embkv-wal-sync") for th in threading.enumerate()), "syncer left running"
    with embkv.open(disk_store_path, readonly=True) as s:
        assert (_versions(s["t"], keys) == 1).all()


@pytest.mark.parametrize("sync", ["sometimes", "", "ALWAYS", None, 1, "everysec"])
def test_invalid_sync_policy_is_a_schema_error(disk_store_path, sync):
    with pytest.raises(embkv.SchemaError, match="sync"):
        embkv.open(disk_store_path, sync=sync)
    with pytest.raises(embkv.SchemaError):
        embkv.Store(disk_store_path, sync=sync)


# ------------------------------------------------------------------ SIGKILL under each policy


def _put_and_ack(path: str, sync: str, conn) -> None:
    t = embkv.open(path, sync=sync)["t"]
    i = 0
    while True:
        keys = np.arange(i * 50, i * 50 + 50)
        t.put(keys, encode(keys, i + 1))
        conn.send(i)  # acknowledged: put returned
        i += 1


@pytest.mark.parametrize("sync", ["always", "interval", "never"])
def test_disk_store_keeps_every_acknowledged_put_after_sigkill(disk_store_path, sync):
    """A process crash loses nothing acknowledged under any policy (the page cache survives it);
    `always` also covers power loss, which a test cannot produce (see the reboot test below)."""
    with embkv.open(disk_store_path, sync=sync) as s:
        s.create_table("t", DIM, capacity=64)  # grows several times during the run
    recv, send = FORK.Pipe(duplex=False)
    writer = FORK.Process(target=_put_and_ack, args=(disk_store_path, sync, send))
    writer.start()
    send.close()
    acks = []
    try:
        while len(acks) < 40:
            assert recv.poll(WAIT), "writer made no progress"
            acks.append(recv.recv())
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(WAIT)
    with contextlib.suppress(EOFError):
        while recv.poll(0):
            acks.append(recv.recv())
    assert writer.exitcode == -signal.SIGKILL
    last = acks[-1]
    with embkv.open(disk_store_path, sync=sync) as s:
        t = s["t"]
        got = _versions(t, np.arange((last + 2) * 50))
        want = np.repeat(np.arange(1, last + 2), 50)
        assert (got[: (last + 1) * 50] == want).all(), "an acknowledged put is missing"
        tail = got[(last + 1) * 50 :]
        assert (tail == -1).all() or (tail == last + 2).all(), "the batch in flight is half there"
        assert check_table(t.path).ok


# ------------------------------------------------------------------ WAL replay after a reboot


def _simulate_reboot(path: str, n_batches: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Log writes in a child that dies without a checkpoint, then make the file look as if the OS
    crashed: another boot id in the log, and the table's index pages never written back."""
    with embkv.open(path, sync="always") as s:
        s.create_table("t", DIM, capacity=4096)  # no growth: every write is in this version's log

    def write() -> None:
        t = embkv.open(path, sync="always")["t"]
        for i in range(n_batches):
            keys = np.arange(i * 100, i * 100 + 100)
            t.put(keys, encode(keys, i + 1))
        t.delete(np.arange(0, 50))
        os.kill(os.getpid(), signal.SIGKILL)  # no close(): the log is not checkpointed

    status, text = fork_and_run(write)
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    wal = os.path.join(path, "t.ekv.wal")
    assert os.path.getsize(wal) > WAL_HEADER
    with open(wal, "r+b") as f:
        f.seek(BOOT_ID.start)
        f.write(b"\0" * (BOOT_ID.stop - BOOT_ID.start))
    table_file = os.path.join(path, "t.ekv")
    with open(table_file, "r+b") as f:
        lay = Layout.parse(f.read(4096), os.path.getsize(table_file))
        f.seek(lay.index_offset)
        f.write(b"\0" * (16 * lay.slot_count))
    assert not check_table(table_file).ok
    keys = np.arange(n_batches * 100)
    want = np.repeat(np.arange(1, n_batches + 1), 100)
    want[:50] = -1
    return keys, want


def test_wal_replay_after_reboot_restores_every_logged_write(disk_store_path):
    keys, want = _simulate_reboot(disk_store_path)
    with embkv.open(disk_store_path, sync="always") as s:
        t = s["t"]
        t.put([10**6], encode([10**6], 1))  # the first write takes the lock: recovery replays the log
        np.testing.assert_array_equal(_versions(t, keys), want)
        assert len(t) == int((want >= 0).sum()) + 1
        assert check_table(t.path).ok


def test_wal_replay_after_reboot_happens_on_writable_open(disk_store_path):
    keys, want = _simulate_reboot(disk_store_path)
    with embkv.open(disk_store_path, sync="always") as s:
        got = _versions(s["t"], keys)
        assert (got == want).all(), f"{int((got != want).sum())} logged writes missing after a writable open"


# ------------------------------------------------------------------ torn log tail


def _logged_not_applied(path: str, dim: int = DIM) -> tuple[int, int]:
    """Batches 0..4 acknowledged, batch 5 logged (and synced) but killed before it was applied.
    Returns (log size, size of the last record)."""
    with embkv.open(path, sync="always") as s:
        s.create_table("t", dim, capacity=1024)

    def write() -> None:
        t = embkv.open(path, sync="always")["t"]
        for i in range(5):
            keys = np.arange(i * 10, i * 10 + 10)
            t.put(keys, encode(keys, i + 1, dim))
        die_in_put_packed(after_calls=1)
        keys = np.arange(50, 60)
        t.put(keys, encode(keys, 6, dim))

    status, text = fork_and_run(write)
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    record = 32 + 10 * 8 + 10 * 8 + 10 * dim * 4 + 8  # header, keys, tags, vectors, xxh3
    size = os.path.getsize(os.path.join(path, "t.ekv.wal"))
    assert size == WAL_HEADER + 6 * record
    return size, record


@pytest.mark.parametrize("damage", ["none", "truncated", "flipped payload", "flipped checksum"])
def test_torn_log_tail_is_cut_off(disk_store_path, damage):
    size, record = _logged_not_applied(disk_store_path)
    wal = os.path.join(disk_store_path, "t.ekv.wal")
    if damage == "truncated":
        os.truncate(wal, size - 7)
    elif damage != "none":
        offset = size - record + 32 + 3 if damage == "flipped payload" else size - 2
        with open(wal, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x40]))
    keys = np.arange(60)
    with embkv.open(disk_store_path, sync="always") as s:
        t = s["t"]  # the writer died inside a batch: a writable open recovers
        got = _versions(t, keys)
        assert (got[:50] == np.repeat(np.arange(1, 6), 10)).all(), "an acknowledged batch was lost"
        if damage == "none":
            assert (got[50:] == 6).all(), "a logged batch was not completed"
        else:
            assert (got[50:] == -1).all(), "a torn record was applied"
        assert check_table(t.path).ok
        assert os.path.getsize(wal) == WAL_HEADER  # replayed, cut, checkpointed
        t.put([99], encode([99], 7))
    with embkv.open(disk_store_path, readonly=True) as s:
        assert _versions(s["t"], np.array([99]))[0] == 7


def test_replayed_batch_restores_its_tags(disk_store_path):
    with embkv.open(disk_store_path, sync="always") as s:
        s.create_table("t", DIM, capacity=64, tags=True)

    def write() -> None:
        t = embkv.open(disk_store_path, sync="always")["t"]
        die_in_put_packed(after_calls=1)
        t.put(np.arange(5), encode(np.arange(5), 1), tags=np.arange(5) + 70)

    status, text = fork_and_run(write)
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    with embkv.open(disk_store_path) as s:
        _, found, tags = s["t"].get_tagged(np.arange(5))
        assert found.all() and tags.tolist() == [70, 71, 72, 73, 74]


# ------------------------------------------------------------------ check and repair, command line


def test_check_and_repair_from_the_command_line(disk_store_path):
    with embkv.open(disk_store_path, sync="always") as s:
        t = s.create_table("t", DIM)
        keys = np.arange(200)
        t.put(keys, encode(keys, 1))
        path = t.path
    ok = subprocess.run([sys.executable, "-m", "embkv.cli", "check", disk_store_path], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "OK (200 rows)" in ok.stdout, ok.stdout + ok.stderr
    with open(path, "rb") as f:
        lay = Layout.parse(f.read(4096), os.path.getsize(path))
    victim_row = 17
    offset = lay.rows_offset + victim_row * lay.row_stride + lay.row_header + 9
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x08]))
    bad = subprocess.run([sys.executable, "-m", "embkv.cli", "check", disk_store_path], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "row checksum mismatch" in bad.stdout and f"row {victim_row}" in bad.stdout, bad.stdout
    runner = CliRunner()
    result = runner.invoke(cli_main, ["repair", disk_store_path, "t"], input="n\n")
    assert result.exit_code != 0 and "Aborted" in result.output  # asks first
    result = runner.invoke(cli_main, ["repair", disk_store_path, "t", "--yes"])
    assert result.exit_code == 0, result.output
    assert "kept 199 rows, dropped 1" in result.output and "OK (199 rows)" in result.output
    assert runner.invoke(cli_main, ["check", disk_store_path, "t"]).exit_code == 0
    with embkv.open(disk_store_path, readonly=True) as s:
        got = _versions(s["t"], keys)
    assert (got == -1).sum() == 1 and (got[got >= 0] == 1).all()


# ------------------------------------------------------------------ copy while readers read


@contextlib.contextmanager
def watchers(*targets: tuple[str, str]) -> Iterator[list]:
    conns, procs = [], []
    for i, (path, name) in enumerate(targets):
        parent, child = FORK.Pipe()
        p = FORK.Process(target=version_watcher, args=(path, name, KEYS, 50 + i, child))
        p.start()
        child.close()
        conns.append(parent)
        procs.append(p)
    try:
        for c in conns:
            assert c.poll(WAIT), "a reader did not start"
            status, value = c.recv()
            assert status == "ready", value
        yield conns
    finally:
        for c, p in zip(conns, procs, strict=True):
            with contextlib.suppress(OSError, EOFError):
                if p.is_alive():
                    c.send("stop")
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


KEYS = 2000


def _snapshot(conn) -> tuple[int, list[int]]:
    conn.send("snapshot")
    assert conn.poll(WAIT)
    status, value = conn.recv()
    assert status == "snapshot", value
    return value


def _stop(conn) -> dict:
    conn.send("stop")
    assert conn.poll(WAIT)
    status, value = conn.recv()
    assert status == "ok", value
    return value


def test_copy_memory_to_disk_and_back_while_readers_read(store_path, disk_store_path):
    """Snapshot /dev/shm -> disk and restore disk -> /dev/shm, repeatedly, while one reader reads
    the memory table and one the disk table: no error, no torn vector, every answer from one
    version, and readers of the destination switch to the copy."""
    keys = np.arange(KEYS)
    mem = embkv.open(store_path)
    disk = embkv.open(disk_store_path, sync="always")
    mem.load_table("emb", keys, encode(keys, 1))
    disk.load_table("emb", keys, encode(keys, 100))
    copies = 0
    with watchers((store_path, "emb"), (disk_store_path, "emb")) as (mem_reader, disk_reader):
        assert _snapshot(mem_reader) == (KEYS, [1]) and _snapshot(disk_reader) == (KEYS, [100])
        for round_ in range(6):
            version = 10 * (round_ + 1)
            mem.load_table("emb", keys, encode(keys, version))  # a new memory version ...
            mem.copy_table("emb", disk).close()  # ... snapshotted to disk
            copies += 1
            assert _snapshot(disk_reader) == (KEYS, [version]), "disk readers did not switch to the copy"
            mem.load_table("emb", keys, encode(keys, version + 1))  # the memory table moves on ...
            result = CliRunner().invoke(cli_main, ["copy", disk_store_path, "emb", store_path])  # ... restored
            assert result.exit_code == 0, result.output
            copies += 1
            assert _snapshot(mem_reader) == (KEYS, [version]), "memory readers did not switch to the restore"
        mem_totals, disk_totals = _stop(mem_reader), _stop(disk_reader)
    for totals in (mem_totals, disk_totals):
        assert totals["reads"] > 50, totals
        assert totals["torn"] == 0 and totals["missing"] == 0, totals
        assert totals["mixed"] == 0, f"an answer mixed two versions: {totals}"
    published = {10 * (r + 1) for r in range(6)}
    assert mem_totals["versions_seen"] <= {1} | published | {v + 1 for v in published}, mem_totals
    assert disk_totals["versions_seen"] <= {100} | published, disk_totals
    print(f"\n[copy] {copies} copies between /dev/shm and disk while 2 readers did "
          f"{mem_totals['reads'] + disk_totals['reads']:,} reads verifying "
          f"{mem_totals['vectors'] + disk_totals['vectors']:,} vectors: torn 0, missing 0")
    for s in (mem, disk):
        t = s["emb"]
        assert check_table(t.path).ok
        assert sorted(os.listdir(s.path)) == ["emb.ekv", "emb.ekv.lock", "emb.ekv.wal"]
        s.close()
