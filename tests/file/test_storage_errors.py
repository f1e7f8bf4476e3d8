"""Disk full and permission denied (issue item 5): a clear error, the previous version served.

A full disk is simulated in a forked child with RLIMIT_FSIZE (SIGXFSZ ignored, so writes past
the limit fail with EFBIG, like ENOSPC would); permission denied by dropping to uid/gid 65534
in a forked child after making the store folder unwritable (the suite runs as root, which no
file mode stops). Every child reports over a pipe and leaves with os._exit.
"""

from __future__ import annotations

import errno
import glob
import os
import resource
import signal

import numpy as np
import pytest

import embkv
from embkv.file.check import check_table
from helpers import DIM, check_vectors, die_in_put_packed, encode, fork_and_run

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid (and file modes "
                                                           "do not stop root, so the condition cannot be made)")


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _content(t: embkv.Table) -> dict[int, bytes]:
    keys, vectors = t.export()
    return {int(k): v.tobytes() for k, v in zip(keys, vectors, strict=True)}


def _temps(path: str) -> list[str]:
    return glob.glob(os.path.join(path, ".*.tmp"))


def _seed(path: str, n: int = 100, capacity: int = 1024) -> dict[int, bytes]:
    with embkv.open(path, sync="always") as s:
        t = s.create_table("t", DIM, capacity=capacity)
        keys = np.arange(n)
        t.put(keys, encode(keys, 1))
        return _content(t)


def _run(fn) -> str:
    status, text = fork_and_run(fn)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


# ------------------------------------------------------------------ disk full


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_load_table_larger_than_the_space_left(store_path, disk_store_path, where):
    path = store_path if where == "memory" else disk_store_path
    before = _seed(path)

    def child() -> str:
        store = embkv.open(path, sync="always")
        t = store["t"]
        _limit_file_size(1 << 20)
        keys = np.arange(100_000)
        with pytest.raises(embkv.StorageError) as info:
            store.load_table("t", keys, encode(keys, 2))
        assert isinstance(info.value, OSError) and info.value.errno == errno.EFBIG, info.value
        assert "previous version is still served" in str(info.value)
        assert _content(t) == before  # this handle still serves the old version
        assert _temps(path) == [], _temps(path)
        t.put([5], encode([5], 3))  # and still takes small writes
        return str(info.value)

    message = _run(child)
    assert "File too large" in message
    with embkv.open(path, readonly=True) as s:
        t = s["t"]
        after = _content(t)
        assert check_vectors([5], t.get([5])[0]).tolist() == [3]
    before[5] = encode([5], 3)[0].tobytes()
    assert after == before
    assert _temps(path) == []
    assert check_table(os.path.join(path, "t.ekv")).ok


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_put_whose_log_append_does_not_fit(store_path, disk_store_path, where):
    path = store_path if where == "memory" else disk_store_path
    before = _seed(path)
    wal = os.path.join(path, "t.ekv.wal")

    def child() -> str:
        t = embkv.open(path, sync="always")["t"]
        t.put([0], encode([0], 1))  # the log is open and checked
        size = os.path.getsize(wal)
        _limit_file_size(size + 1000)  # the next record (50 rows, ~3.6 KB) is cut short
        keys = np.arange(200, 250)
        with pytest.raises(embkv.StorageError) as info:
            t.put(keys, encode(keys, 2))
        assert os.path.getsize(wal) == size, "a half record was left in the log"
        assert not t.contains(keys).any()
        assert _content(t) == before
        t.put([1], encode([1], 1))  # a small record still fits
        return f"{info.value.errno} {info.value}"

    _run(child)
    with embkv.open(path, readonly=True) as s:
        assert _content(s["t"]) == before


def test_put_whose_log_append_does_not_fit_names_the_errno(store_path):
    _seed(store_path)

    def child() -> int:
        t = embkv.open(store_path)["t"]
        t.put([0], encode([0], 1))
        _limit_file_size(os.path.getsize(os.path.join(store_path, "t.ekv.wal")) + 1000)
        try:
            t.put(np.arange(200, 250), encode(np.arange(200, 250), 2))
        except embkv.StorageError as exc:
            return exc.errno
        return -1

    code = int(_run(child))
    assert code in (errno.EFBIG, errno.ENOSPC), f"StorageError.errno is {code}"


def test_put_that_needs_growth_when_the_disk_is_full(disk_store_path):
    """The batch is logged, the bigger version cannot be built: StorageError, nothing changed, and
    the refused batch does not come back when the next writer recovers from a crash."""
    before = _seed(disk_store_path, n=60, capacity=64)
    grow = np.arange(1000, 1100)

    def child() -> None:
        t = embkv.open(disk_store_path, sync="always")["t"]
        t.put([0], encode([0], 1))
        _limit_file_size(os.path.getsize(t.path) + 4096)  # room for the log, not for a new version
        with pytest.raises(embkv.StorageError):
            t.put(grow, encode(grow, 2))
        assert _content(t) == before and _temps(disk_store_path) == []

    _run(child)

    def crash_in_next_write() -> None:
        die_in_put_packed(after_calls=1)
        embkv.open(disk_store_path, sync="always")["t"].put([1], encode([1], 9))

    status, text = fork_and_run(crash_in_next_write)
    assert os.WTERMSIG(status) == signal.SIGKILL, text
    with embkv.open(disk_store_path, sync="always") as s:
        t = s["t"]  # recovery replays the log
        assert not t.contains(grow).any(), "a batch refused with StorageError came back"
        got = _content(t)
        assert {k: v for k, v in got.items() if k != 1} == {k: v for k, v in before.items() if k != 1}
        assert check_table(t.path).ok


# ------------------------------------------------------------------ permission denied


def _as_nobody(fn):
    def run():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return fn()

    return run


@needs_root
def test_readers_still_read_a_store_they_cannot_write(disk_store_path):
    before = _seed(disk_store_path)
    os.chmod(disk_store_path, 0o555)
    try:
        def child() -> None:
            with embkv.open(disk_store_path, readonly=True) as s:
                assert _content(s["t"]) == before

        _run(_as_nobody(child))
    finally:
        os.chmod(disk_store_path, 0o755)


@needs_root
def test_unwritable_store_folder_refuses_new_versions_with_storage_error(disk_store_path):
    """The table's files are the user's, the folder is not writable: in-place writes work, a new
    version (load, growth) cannot be created: StorageError (errno EACCES), the old one is served."""
    before = _seed(disk_store_path, capacity=128)
    for name in os.listdir(disk_store_path):
        os.chown(os.path.join(disk_store_path, name), NOBODY, NOBODY)
    os.chmod(disk_store_path, 0o555)
    try:
        def child() -> None:
            store = embkv.open(disk_store_path, sync="always")
            t = store["t"]
            t.put([7], encode([7], 2))  # fits: written in place
            keys = np.arange(5000, 5200)
            for attempt in (lambda: store.load_table("t", keys, encode(keys, 3)),
                            lambda: t.put(keys, encode(keys, 3))):  # needs growth
                with pytest.raises(embkv.StorageError) as info:
                    attempt()
                assert info.value.errno == errno.EACCES, info.value
                assert check_vectors([7], t.get([7])[0]).tolist() == [2]
                assert not t.contains(keys).any()
            store.close()

        _run(_as_nobody(child))
    finally:
        os.chmod(disk_store_path, 0o755)
    before[7] = encode([7], 2)[0].tobytes()
    with embkv.open(disk_store_path, readonly=True) as s:
        assert _content(s["t"]) == before
    assert _temps(disk_store_path) == []


@needs_root
def test_store_of_another_user_refuses_writes_with_storage_error(disk_store_path):
    before = _seed(disk_store_path)
    os.chmod(disk_store_path, 0o755)  # root's folder and files, readable by all

    def child() -> str:
        outcomes = []
        for what, call in [("open for writing", lambda: embkv.open(disk_store_path)["t"]),
                           ("load_table", lambda: embkv.open(disk_store_path).load_table("t", [1], encode([1], 2))),
                           ("create_table", lambda: embkv.open(disk_store_path).create_table("u", DIM))]:
            try:
                call()
                outcomes.append(f"{what}: no error")
            except embkv.StorageError:
                pass
            except OSError as exc:
                outcomes.append(f"{what}: {type(exc).__name__}: {exc}")
        with embkv.open(disk_store_path, readonly=True) as s:
            assert _content(s["t"]) == before
        return "; ".join(outcomes)

    text = _run(_as_nobody(child))
    assert text == "''", text
