"""The files of a store folder and the protocol that publishes a new table version.

A table ``<name>`` is ``<name>.ekv`` (the current version), ``<name>.ekv.lock`` (the writer
lock) and, on a disk path, ``<name>.ekv.wal``. A new version is built as a temp file beside
it and renamed over ``<name>.ekv``; the replaced file is then flagged ``superseded`` so that
open readers switch. While that is in flight, ``.<name>.ekv.prev`` links the replaced file,
so a publisher killed between the rename and the flag can be finished by the next writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import time
import uuid

from ..errors import SchemaError, WriterLockedError
from .format import COUNTERS_OFFSET, MAGIC, Counter

__all__ = [
    "LOCK_SUFFIX",
    "TABLE_SUFFIX",
    "TMP_SUFFIX",
    "check_name",
    "finish_interrupted_publish",
    "fsync_dir",
    "is_memory_path",
    "keep_previous",
    "lock_path",
    "pid_alive",
    "remove_stale_temps",
    "temp_path",
    "wait_for_flock",
]

TABLE_SUFFIX = ".ekv"
LOCK_SUFFIX = ".ekv.lock"
TMP_SUFFIX = ".tmp"
PREV_SUFFIX = ".prev"  # .<name>.ekv.prev: the version being replaced, while a publish is in flight
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def check_name(name: str) -> str:
    """``name`` if it is a valid table name, else :class:`SchemaError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith((TMP_SUFFIX, ".lock")):
        raise SchemaError(
            f"invalid table name {name!r}: use 1-128 letters, digits, '_', '-', '.', not starting with '.' or '-'"
        )
    return name


def is_memory_path(path: str) -> bool:
    """True for a path in shared memory (``/dev/shm``): nothing there outlives a reboot, so nothing is synced."""
    real = os.path.realpath(path)
    return real.startswith(("/dev/shm/", "/run/shm/"))


def lock_path(table_path: str) -> str:
    return table_path[: -len(TABLE_SUFFIX)] + LOCK_SUFFIX


def temp_path(path: str) -> str:
    """A fresh temp name beside ``path``; it carries our pid so a dead builder's temps can be told apart."""
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prev_path(path: str) -> str:
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}{PREV_SUFFIX}")


def keep_previous(path: str) -> str:
    """Hard-link the current version of ``path`` as ``.<name>.ekv.prev``; returns the link. Lock held."""
    prev = prev_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(prev)  # from an attempt that failed before its rename: nothing to tell anyone
    os.link(path, prev)
    return prev


def finish_interrupted_publish(path: str) -> None:
    """Tell the readers of a version replaced by a publisher that died before telling them. Lock held.

    If the ``.prev`` link is no longer the file at ``path``, set its ``superseded`` flag (a
    write to the file reaches every mapping of it); then remove the link. One ``stat`` when
    there is nothing to do.
    """
    prev = prev_path(path)
    with contextlib.suppress(FileNotFoundError):
        _flag_replaced(prev, path)
        os.unlink(prev)


def _finish_publishes_in(folder: str) -> None:
    """On a writable open of a store: finish the publishes that died, for tables no writer holds."""
    for entry in os.listdir(folder):
        if not (entry.startswith(".") and entry.endswith(TABLE_SUFFIX + PREV_SUFFIX)):
            continue
        path = os.path.join(folder, entry[1 : -len(PREV_SUFFIX)])
        try:
            fd = os.open(lock_path(path), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # no lock file, so no writer: nobody else can be publishing
            finish_interrupted_publish(path)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer holds it: it finishes the publish itself
            finish_interrupted_publish(path)
        finally:
            os.close(fd)  # releases the flock


def _flag_replaced(prev: str, path: str) -> None:
    st = os.stat(prev)
    try:
        cur = os.stat(path)
        if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
            return  # the publisher died before its rename: the link's file is still the current one
    except FileNotFoundError:
        pass  # dropped: readers must learn that too
    fd = os.open(prev, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.pread(fd, 8, 0) != MAGIC:
            return  # not a table file: write nothing into it
        # superseded = 1, dirty = 0 (adjacent counters)
        os.pwrite(fd, struct.pack("<QQ", 1, 0), COUNTERS_OFFSET + 8 * Counter.SUPERSEDED)
    finally:
        os.close(fd)


def remove_stale_temps(folder: str) -> None:
    """Delete temp files left by builders that died (their pid is gone); finish their publishes."""
    _finish_publishes_in(folder)
    for entry in os.listdir(folder):
        if not (entry.startswith(".") and entry.endswith(TMP_SUFFIX)):
            continue
        parts = entry.split(".")
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, entry))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it cannot be signalled, but it lives)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_flock(fd: int, timeout: float, what: str) -> None:
    """Take the exclusive ``flock`` on ``fd``, waiting with backoff up to ``timeout`` seconds.

    :class:`WriterLockedError` if another process held it all that time. The kernel drops a
    dead holder's lock, so a killed writer never blocks the next one.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise WriterLockedError(f"{what}: another writer held the lock for {timeout}s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
