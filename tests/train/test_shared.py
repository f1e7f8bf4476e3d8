"""Several trainer processes on one training table (``shared=True``): no update lost or torn.

Real processes (spawned) push the same rows at once; SGD with lr 1 on gradients of ones from
zero rows makes every row the exact count of pushes that touched it, so a lost update, a
doubled one or a torn row shows as a wrong integer.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embkv
from embkv.file.check import check_table
from embkv.train import SGD, Adagrad, TrainingTable

DIM = 4
ROWS = 200


def _plan(seed: int, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(ROWS, size=32, replace=False).astype(np.int64) for _ in range(steps)]


def _counts(plans: list[list[np.ndarray]]) -> np.ndarray:
    counts = np.zeros(ROWS, dtype=np.float32)
    for plan in plans:
        for ids in plan:
            counts[ids] += 1
    return counts


def _trainer(path: str, seed: int, steps: int, done: object, checkpoint_every: int, together: object) -> None:
    table = TrainingTable(embkv.open(path), "t", DIM, SGD(lr=1.0), init_std=0.0, shared=True,
                          cache_bytes=1 << 20)
    done.value = 0  # type: ignore[attr-defined]  # opened
    if together is not None:
        together.wait(60)  # type: ignore[attr-defined]  # every trainer has the table open: they overlap
    for i, ids in enumerate(_plan(seed, steps)):
        table.pull(ids)
        table.push(ids, np.ones((len(ids), DIM), dtype=np.float32))
        done.value = i + 1  # type: ignore[attr-defined]
        if checkpoint_every and (i + 1) % checkpoint_every == 0:
            table.checkpoint()
    table.close()


CTX = multiprocessing.get_context("spawn")  # no fork of a threaded test process


def _spawn(path: str, seed: int, steps: int, checkpoint_every: int = 0,
           together: object = None) -> tuple[multiprocessing.Process, object]:
    done = CTX.Value("i", -1)  # -1 until the trainer has the table open, then its pushes done
    proc = CTX.Process(target=_trainer, args=(path, seed, steps, done, checkpoint_every, together), daemon=True)
    proc.start()
    return proc, done


def test_two_trainer_processes_lose_no_update(disk_store_path: str) -> None:
    steps = 150
    together = CTX.Barrier(2)
    procs = [_spawn(disk_store_path, seed, steps, checkpoint_every=40, together=together) for seed in (1, 2)]
    for proc, _ in procs:
        proc.join(120)
        assert proc.exitcode == 0
    with embkv.open(disk_store_path) as store, TrainingTable(store, "t", DIM, SGD(lr=1.0), init_std=0.0) as table:
        want = -_counts([_plan(1, steps), _plan(2, steps)])
        np.testing.assert_array_equal(table.weights(np.arange(ROWS)), np.repeat(want[:, None], DIM, axis=1))
        assert table.step == 2 * steps  # every push had its own step


def test_a_killed_shared_trainer_leaves_the_others_training(disk_store_path: str) -> None:
    victim, victim_done = _spawn(disk_store_path, 1, 10_000)
    deadline = time.monotonic() + 60
    while victim_done.value < 30 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    survivor, survivor_done = _spawn(disk_store_path, 2, 100)
    while survivor_done.value < 1 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.005)  # the survivor trains beside the victim
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(30)
    finished = victim_done.value  # type: ignore[attr-defined]
    survivor.join(120)
    assert survivor.exitcode == 0  # its close checkpoints everyone's pushes
    with embkv.open(disk_store_path) as store, TrainingTable(store, "t", DIM, SGD(lr=1.0), init_std=0.0) as table:
        assert check_table(store["t.train"].path).ok
        got = table.weights(np.arange(ROWS))[:, 0]
        # the kill lands before or after the victim counted its last push, never inside a push
        options = [-_counts([_plan(1, 10_000)[:k], _plan(2, 100)]) for k in (finished, finished + 1)]
        assert any(np.array_equal(got, o) for o in options), (finished, got[:10])


def test_one_shared_trainer_trains_as_a_sole_one(disk_store_path: str) -> None:
    results = []
    store = embkv.open(disk_store_path)
    for shared, name in ((False, "sole"), (True, "shared")):
        table = TrainingTable(store, name, DIM, Adagrad(lr=0.1), shared=shared, cache_bytes=1 << 20)
        rng = np.random.default_rng(3)
        for _ in range(40):
            ids = rng.integers(0, ROWS, size=64)
            table.pull(ids)
            table.push(ids, rng.normal(size=(64, DIM)).astype(np.float32))
        results.append((table.weights(np.arange(ROWS)), table.pull_state(np.arange(ROWS))))
        table.close()
    store.close()
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_sole_and_shared_trainers_refuse_each_other(disk_store_path: str) -> None:
    store = embkv.open(disk_store_path)
    with TrainingTable(store, "t", DIM, SGD(lr=1.0)):
        with pytest.raises(embkv.WriterLockedError, match="shared=True"):
            TrainingTable(store, "t", DIM, SGD(lr=1.0), shared=True)
        with pytest.raises(embkv.WriterLockedError, match="another trainer"):
            TrainingTable(store, "t", DIM, SGD(lr=1.0))
    with TrainingTable(store, "t", DIM, SGD(lr=1.0), shared=True):
        with TrainingTable(store, "t", DIM, SGD(lr=1.0), shared=True) as second:  # in one process too
            assert second.shared
        with pytest.raises(embkv.WriterLockedError, match="shared=True"):
            TrainingTable(store, "t", DIM, SGD(lr=1.0))
    with pytest.raises(embkv.SchemaError, match="sole trainer"):
        TrainingTable(store, "t", DIM, SGD(lr=1.0), shared=True, admit_after=3)
    TrainingTable(store, "t", DIM, SGD(lr=1.0)).close()  # all let go: a sole trainer opens
    store.close()


def test_publish_is_one_checkpoint_even_while_another_trainer_checkpoints(disk_store_path: str, tmp_path) -> None:
    with embkv.open(disk_store_path) as store, embkv.open(str(tmp_path / "serve")) as serve:
        a = TrainingTable(store, "t", DIM, SGD(), init_std=0.0, shared=True)
        b = TrainingTable(store, "t", DIM, SGD(), init_std=0.0, shared=True)
        a.put(np.arange(10), np.full((10, DIM), 5.0))
        a.checkpoint()
        real = a.stored.rows.read_rows
        other = threading.Thread(target=lambda: (b.delete([3]), b.checkpoint()))

        def read_rows(keys: np.ndarray, threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
            if not other.is_alive() and other.ident is None:
                other.start()
                time.sleep(0.3)  # b's checkpoint would merge now, were a's publish not holding the mutex
            return real(keys, threads)

        a.stored.rows.read_rows = read_rows  # type: ignore[method-assign]
        keys, vectors = a.publish(serve, "w").export()
        other.join(30)
        assert keys.tolist() == list(range(10)) and (vectors == 5).all()  # the snapshot before b's delete
        assert not b.contains([3])[0]
        a.close()
        b.close()


KILLED_IN_PUSH = """
import os, sys
import numpy as np
import embkv
from embkv.train import SGD, TrainingTable
t = TrainingTable(embkv.open(sys.argv[1]), "t", 4, SGD(lr=1.0), init_std=0.0, shared=True)
real = t.stored.spill.put
def put(*args, **kwargs):
    real(*args, **kwargs)
    os._exit(9)  # dies right after the first put of its push
t.stored.spill.put = put
ids = np.arange(600)
t.pull(ids)
t.push(ids, np.ones((600, 4), dtype=np.float32))
"""


def test_a_shared_trainer_killed_in_a_push_leaves_all_of_it_or_none(disk_store_path: str) -> None:
    with embkv.open(disk_store_path) as store:
        survivor = TrainingTable(store, "t", DIM, SGD(lr=1.0), init_std=0.0, shared=True)
        survivor.put(np.arange(600), np.zeros((600, DIM)))
        survivor.checkpoint()
        assert subprocess.call([sys.executable, "-c", KILLED_IN_PUSH, disk_store_path]) == 9
        survivor.checkpoint()  # commits whatever the dead trainer left
        survivor.close()
        with TrainingTable(store, "t", DIM, SGD(lr=1.0), init_std=0.0) as table:
            changed = int((table.weights(np.arange(600))[:, 0] != 0).sum())
            assert changed in (0, 600), changed
            assert table.step == 1  # its step was counted before its rows were written


FORKS_THEN_DIES = """
import os, sys, time
import numpy as np
import embkv
from embkv.train import SGD, TrainingTable
t = TrainingTable(embkv.open(sys.argv[1]), "t", 4, SGD(), shared=True)
if os.fork() == 0:  # a helper process (a DataLoader worker, say) that outlives the trainer
    time.sleep(6)
    os._exit(0)
t.stored.write = lambda *args, **kwargs: os._exit(9)  # killed while it holds the mutex
t.pull([1])
t.push([1], np.ones((1, 4), dtype=np.float32))
"""


def test_a_forked_child_does_not_keep_a_dead_trainers_locks(disk_store_path: str) -> None:
    assert subprocess.call([sys.executable, "-c", FORKS_THEN_DIES, disk_store_path]) == 9
    t0 = time.monotonic()
    with embkv.open(disk_store_path) as store:
        TrainingTable(store, "t", DIM, SGD(), shared=True).close()
    assert time.monotonic() - t0 < 4, "the next trainer waited for the forked child"
