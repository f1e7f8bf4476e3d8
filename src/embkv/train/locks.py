"""Which trainer processes may use a training table, and the lock they change it under.

``<name>.train.lock`` is ``flock``-ed by every trainer process that has the table open: a sole
trainer takes it exclusively (a second trainer of either kind is refused), trainers opened
with ``shared=True`` take it shared (each other, not a sole trainer). Shared trainers change
the stored rows under ``<name>.train.mutex`` (an exclusive ``flock``, waited for in turn) and
count pushes in ``<name>.train-step`` (one u64, read and written under the mutex), so that a
push reads the current row, applies its update and writes it back with no other trainer in
between, and every push has its own step.

``flock`` locks belong to the open file, which a forked child shares: a child that outlived a
killed trainer (a DataLoader worker, say) would hold its locks, and every other trainer would
wait for the mutex until the child exits. So a forked child closes its copies at once (that
releases nothing of the parent's) and cannot use the table; a trainer that dies releases its
locks with its last descriptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref
from collections.abc import Iterator

from ..errors import TableClosedError, WriterLockedError

__all__ = ["TrainerLocks"]

_OPEN: weakref.WeakSet[TrainerLocks] = weakref.WeakSet()  # for the fork handler below


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


class TrainerLocks:
    """The trainer's hold on one training table (see the module docstring).

    After construction, ``first`` says whether no other trainer had the table open: the caller
    then recovers the table (finishes or discards what a crash left) before anyone else joins,
    because shared openers wait for the mutex this holds until :meth:`joined`.
    """

    def __init__(self, folder: str, name: str, shared: bool) -> None:
        self.shared = shared
        self.name = name
        self._member: int | None = _open_lock_file(os.path.join(folder, f"{name}.train.lock"))
        self._mutex: int | None = None
        self._step: int | None = None
        self._depth = 0  # mutex() nests: the flock is taken by the outermost and released by it
        _OPEN.add(self)
        try:
            if shared:
                self._mutex = _open_lock_file(os.path.join(folder, f"{name}.train.mutex"))
                fcntl.flock(self._mutex, fcntl.LOCK_EX)  # until joined(): one opener recovers at a time
            self.first = self._try(fcntl.LOCK_EX)
            if not self.first and (not shared or not self._try(fcntl.LOCK_SH)):
                raise WriterLockedError(
                    f"training table {name!r} is open in a trainer process opened without shared=True"
                    if shared else f"training table {name!r} is open in another trainer process; open "
                    "every trainer with shared=True to train it together")
            if shared:
                self._step = _open_lock_file(os.path.join(folder, f"{name}.train-step"))
        except BaseException:
            self.close()
            raise

    def _try(self, how: int) -> bool:
        assert self._member is not None
        try:
            fcntl.flock(self._member, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def joined(self) -> None:
        """Recovery is done: become one shared trainer among others, and let the next opener in."""
        if not self.shared:
            return
        if self.first and not self._try(fcntl.LOCK_SH):  # the change from EX to SH is not atomic
            raise WriterLockedError("a sole trainer took the table while this shared trainer opened it")
        assert self._mutex is not None
        fcntl.flock(self._mutex, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def mutex(self) -> Iterator[None]:
        """Hold the table against the other shared trainers (a sole trainer needs no mutex)."""
        if not self.shared:
            yield
            return
        if self._mutex is None:
            raise TableClosedError(f"training table {self.name!r}: this trainer was closed, or this is a process "
                                    "forked from it (open the table again here)")
        if self._depth == 0:
            fcntl.flock(self._mutex, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._mutex is not None:
                fcntl.flock(self._mutex, fcntl.LOCK_UN)

    def read_step(self) -> int:
        """The shared push count (hold the mutex)."""
        assert self._step is not None
        raw = os.pread(self._step, 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def write_step(self, step: int) -> None:
        """Set the shared push count (hold the mutex)."""
        assert self._step is not None
        os.pwrite(self._step, step.to_bytes(8, "little"), 0)

    def close(self) -> None:
        for fd in (self._step, self._mutex, self._member):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the last descriptor of the open file releases its flock
        self._step = self._mutex = self._member = None


def _close_in_child() -> None:
    for locks in list(_OPEN):
        locks.close()


os.register_at_fork(after_in_child=_close_in_child)
