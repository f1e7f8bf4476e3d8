"""The background thread that loads the next batches' rows of a training table while the model computes.

``Prefetcher(load)`` runs ``load(ids)`` on its own thread for every batch of ids handed to
``submit``, in order, at most ``depth`` waiting (a trainer running further ahead waits in
``submit``). ``load`` is a hint: what it raises is dropped (the pull loads what is missing
itself). The training table's ``_prefetch`` is the ``load``: it reads rows without the table's
lock and inserts them under it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import numpy as np

__all__ = ["Prefetcher"]


class Prefetcher:
    def __init__(self, load: Callable[[np.ndarray], None], name: str, depth: int = 4) -> None:
        self._load = load
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self._pending = 0  # batches submitted and not yet loaded (or dropped)
        self._done = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, ids: np.ndarray) -> None:
        with self._done:
            if self._stopped:
                return  # a hint after close: nothing to do
            self._pending += 1
        self._queue.put(ids)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every batch submitted so far was loaded (or dropped)."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        with self._done:
            self._stopped = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)  # behind what is queued: the thread drains it first
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            ids = self._queue.get()
            if ids is None:
                return
            try:
                self._load(ids)
            except Exception:  # a hint only: the pull loads what is missing itself
                pass
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()
