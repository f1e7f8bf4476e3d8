"""Write-ahead log: what makes a write batch all-or-nothing, and on a disk path durable.

A table file is updated in place through mmap, and the page cache decides when those pages
reach the disk. So, before a write batch touches the mapping, the batch is appended to
``<name>.ekv.wal`` as one checksummed record, and the file is fsynced according to the
sync policy (like Redis's ``appendfsync``):

- ``"always"``: fdatasync before ``put``/``delete`` returns (no acknowledged write is lost,
  even on power failure);
- ``"interval"``: a background thread fdatasyncs every ``sync_interval`` seconds (1 s by
  default): at most that much acknowledged work is lost on power failure;
- ``"never"``: the OS flushes when it likes.

Whatever the policy, a process crash (SIGKILL) loses nothing acknowledged: the page cache
survives the process. Tables in /dev/shm keep a log too (never synced): it lets the next
writer complete a batch that a killed writer applied only in part. A checkpoint (on close,
on publish, and when the log passes ``CHECKPOINT_BYTES``) msyncs the table file and empties
the log.

Recovery runs when a writer takes the lock: records newer than the table's generation
counter are replayed in order (after a reboot, every record since the checkpoint, because
the counter's page may have reached the disk before the rows did), then the free-row stack
and counters are rebuilt. A torn last record fails its checksum and is cut off: it was never
acknowledged. Replaying a record is idempotent (upserts and deletes by key).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections.abc import Iterator
from typing import Final, Literal

import xxhash

__all__ = ["SYNC_POLICIES", "SyncPolicy", "WriteAheadLog"]

SyncPolicy = Literal["always", "interval", "never"]
SYNC_POLICIES: Final[tuple[SyncPolicy, ...]] = ("always", "interval", "never")
CHECKPOINT_BYTES: Final = 64 << 20
WAL_SUFFIX: Final = ".wal"

_FILE_MAGIC: Final = b"EMBKVWAL"
LOG_VERSION: Final = 2  # 2: put records carry row tags (see recovery.apply_record)
_FILE_HEADER = struct.Struct("<8sIIQ16sQ")  # magic, version, reserved, table created_ns, boot id, checkpoint gen
_REC_MAGIC: Final = 0x4C574B45
_REC_HEADER = struct.Struct("<IHHQQQ")  # magic, kind, reserved, count, payload bytes, generation
_REC_SUM = struct.Struct("<Q")

PUT_INT: Final = 1
PUT_STR: Final = 2
DELETE_INT: Final = 3
DELETE_STR: Final = 4


def boot_id() -> bytes:
    """Identifies this boot of the machine (changes after a crash or reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().replace(b"-", b"").decode())[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16


class WriteAheadLog:
    """The log file of one table version, opened by a writer."""

    def __init__(self, path: str, policy: SyncPolicy, interval: float, durable: bool = True) -> None:
        if policy not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {policy!r}")
        self.path = path
        self.durable = durable  # False in /dev/shm: nothing to sync to
        self.policy = policy
        self.interval = interval
        # O_APPEND: writers in several processes share the file, each through its own descriptor
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.pid = os.getpid()
        self._unsynced = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- header

    def header(self) -> tuple[int, bytes, int] | None:
        """(table created_ns, boot id, checkpoint generation), or None for an empty/foreign log."""
        return _parse_header(os.pread(self.fd, _FILE_HEADER.size, 0))

    def reset(self, created_ns: int, generation: int) -> None:
        """Empty the log for table version ``created_ns`` whose state is durable up to ``generation``."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, _FILE_HEADER.pack(_FILE_MAGIC, LOG_VERSION, 0, created_ns, boot_id(), generation))
        if self.durable:
            os.fsync(self.fd)
        self._unsynced = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # ---------------------------------------------------------------- append

    def truncate(self, size: int) -> None:
        """Take back records appended after the log was ``size`` bytes long (lock held)."""
        if self.size() > size:
            os.ftruncate(self.fd, size)
            if self.durable and self.policy != "never":
                os.fdatasync(self.fd)

    def append(self, kind: int, count: int, generation: int, parts: list[bytes | memoryview]) -> int:
        """Append one record and sync it as the policy says; returns the log size before it.

        Raises OSError (e.g. ENOSPC) with the log unchanged.
        """
        payload_len = sum(len(memoryview(p).cast("B")) for p in parts)
        head = _REC_HEADER.pack(_REC_MAGIC, kind, 0, count, payload_len, generation)
        h = xxhash.xxh3_64(head)
        for p in parts:
            h.update(p)
        end = self.size()
        try:
            written = os.writev(self.fd, [head, *parts, _REC_SUM.pack(h.intdigest())])
            if written != len(head) + payload_len + _REC_SUM.size:
                raise OSError(errno.ENOSPC, "short write to the write-ahead log (file system full?)", self.path)
            if self.policy == "always":
                os.fdatasync(self.fd)
            elif self.policy == "interval":
                self._unsynced = True
                self._ensure_syncer()
            return end
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, end)  # a failed append must not leave a half record
            raise

    def _ensure_syncer(self) -> None:
        if self._syncer is not None and self._syncer.is_alive() and self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name=f"embkv-wal-sync {self.path}", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._unsynced:
                self._unsynced = False
                with contextlib.suppress(OSError):
                    os.fdatasync(self.fd)

    # ---------------------------------------------------------------- replay

    def records(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """(kind, count, generation, payload) of every intact record; cuts a torn tail off the file."""
        size = self.size()
        data = b""
        if size > _FILE_HEADER.size:
            data = os.pread(self.fd, size - _FILE_HEADER.size, _FILE_HEADER.size)
        view = memoryview(data)
        pos = 0
        while pos + _REC_HEADER.size + _REC_SUM.size <= len(view):
            magic, kind, _, count, payload_len, gen = _REC_HEADER.unpack_from(view, pos)
            end = pos + _REC_HEADER.size + payload_len
            if magic != _REC_MAGIC or kind not in (PUT_INT, PUT_STR, DELETE_INT, DELETE_STR) or \
                    end + _REC_SUM.size > len(view):
                break
            (stored,) = _REC_SUM.unpack_from(view, end)
            if xxhash.xxh3_64_intdigest(view[pos:end]) != stored:
                break
            yield kind, count, gen, view[pos + _REC_HEADER.size : end]
            pos = end + _REC_SUM.size
        if pos != len(view):
            os.ftruncate(self.fd, _FILE_HEADER.size + pos)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None and self.pid == os.getpid():
            self._syncer.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._unsynced:
                os.fdatasync(self.fd)
            os.close(self.fd)


def read_header(path: str) -> tuple[int, bytes, int] | None:
    """(table created_ns, boot id, checkpoint generation) of the log at ``path``, without opening it for writing."""
    try:
        with open(path, "rb") as f:
            return _parse_header(f.read(_FILE_HEADER.size))
    except OSError:
        return None


def _parse_header(raw: bytes) -> tuple[int, bytes, int] | None:
    if len(raw) < _FILE_HEADER.size:
        return None
    magic, version, _, created_ns, boot, gen = _FILE_HEADER.unpack(raw)
    if magic != _FILE_MAGIC or version != LOG_VERSION:
        return None
    return created_ns, boot, gen


def log_from_another_boot(path: str, created_ns: int) -> bool:
    """True if the log of table version ``created_ns`` was started before the last reboot (replay needed)."""
    header = read_header(path)
    return header is not None and header[0] == created_ns and header[1] != boot_id()


def checkpoint_due(wal: WriteAheadLog) -> bool:
    return wal.size() > CHECKPOINT_BYTES


def wal_path(table_path: str) -> str:
    return table_path + WAL_SUFFIX

