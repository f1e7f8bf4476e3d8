"""TrainingTable: training larger than the hot cache equals training in memory, checkpoints,
crashes, staleness, admission, eviction, bad input, publish."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

import embkv
from embkv.file.check import check_table
from embkv.train import SGD, Adagrad, Adam, Optimizer, TrainingTable
from embkv.train.cache import slot_bytes
from embkv.train.init import initial_vectors
from helpers import fork_and_run

DIM = 8


class Reference:
    """The same model in process memory: dense numpy arrays, the same optimizer code."""

    def __init__(self, optimizer: Optimizer, n: int, dim: int = DIM, init_std: float = 0.01, seed: int = 0) -> None:
        self.optimizer = optimizer
        self.dim = dim
        self.weights = initial_vectors(np.arange(n), dim, init_std, seed)
        self.state = optimizer.initial_state(n, dim)
        self.step = 0

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        uniq, inverse = np.unique(ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
        summed = np.add.reduceat(grads[order], starts, axis=0).astype(np.float32)
        self.step += 1
        w, s = self.weights[uniq], self.state[uniq]
        self.optimizer.update(w, s, summed, self.step)
        self.weights[uniq], self.state[uniq] = w, s


def _batches(n: int, steps: int, batch: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ranks = np.minimum(rng.zipf(1.2, batch) - 1, n - 1)  # skewed, with duplicates
        out.append((ranks.astype(np.int64), rng.normal(size=(batch, DIM)).astype(np.float32)))
    return out


def _train(table: TrainingTable, batches: list[tuple[np.ndarray, np.ndarray]], ref: Reference | None = None,
           prefetch: bool = False) -> None:
    for i, (ids, grads) in enumerate(batches):
        nxt = batches[i + 1][0] if prefetch and i + 1 < len(batches) else None
        if prefetch and i % 2:  # now and then let the prefetch finish first, so some of it lands for sure
            table.wait_prefetch(5)
        rows = table.pull(ids, next_ids=nxt)
        if ref is not None:
            np.testing.assert_array_equal(rows, ref.weights[ids])
            ref.push(ids, grads)
        table.push(ids, grads)


@pytest.mark.parametrize("optimizer", [SGD(lr=0.1), Adagrad(lr=0.05, initial_accumulator_value=0.1), Adam(lr=0.01)],
                         ids=["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_training_through_a_small_cache_equals_training_in_memory(store, optimizer, prefetch):
    n = 2000
    ref = Reference(optimizer, n)
    width = DIM + optimizer.state_dim(DIM)
    table = TrainingTable(store, "users", DIM, optimizer, cache_bytes=300 * slot_bytes(width))
    try:
        _train(table, _batches(n, 120, 64), ref, prefetch=prefetch)
        stats = table.stats()
        assert stats["evictions"] > 0 and stats["written_back"] > 0 and stats["loaded"] > 0
        if prefetch:
            assert stats["prefetched"] > 0
        every = np.arange(n)
        weights = table.weights(every)
        np.testing.assert_array_equal(weights, ref.weights)
        np.testing.assert_array_equal(table.pull_state(every), ref.state)
    finally:
        table.close()


def test_reopen_gives_the_checkpointed_rows_state_and_step(store):
    n, opt = 500, Adam(lr=0.01)
    ref = Reference(opt, n)
    table = TrainingTable(store, "t", DIM, opt, cache_bytes=100 * slot_bytes(3 * DIM))
    _train(table, _batches(n, 50, 32), ref)
    table.close()  # checkpoints
    again = TrainingTable(store, "t", DIM, opt, cache_bytes=1 << 20)
    try:
        assert again.step == 50
        np.testing.assert_array_equal(again.weights(np.arange(n)), ref.weights)
        np.testing.assert_array_equal(again.pull_state(np.arange(n)), ref.state)
        _train(again, _batches(n, 10, 32, seed=7), ref)  # Adam's bias correction goes on from step 50
        np.testing.assert_array_equal(again.weights(np.arange(n)), ref.weights)
    finally:
        again.close()


def _killed_trainer(path: str, opt: Optimizer, n: int, die_in_merge: bool) -> None:
    """Train 30 steps, checkpoint, train 30 more (through a small cache, so rows spill), die."""
    store = embkv.open(path)
    table = TrainingTable(store, "t", DIM, opt, cache_bytes=80 * slot_bytes(2 * DIM))
    batches = _batches(n, 60, 32)
    _train(table, batches[:30])
    if die_in_merge:  # the checkpoint commits, then the process dies before its merge is done
        import embkv.train.stored as module

        def dying_merge(self: Any, evict_before_step: int) -> None:
            self.rows.put(np.arange(3), np.zeros((3, self.width), dtype=np.float32))  # half of a merge
            os.kill(os.getpid(), signal.SIGKILL)

        module.StoredRows.merge = dying_merge  # type: ignore[method-assign]
    table.checkpoint()
    _train(table, batches[30:])
    assert table.stats()["written_back"] > 0
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("die_in_merge", [False, True], ids=["between-checkpoints", "inside-the-merge"])
def test_a_killed_trainer_reopens_at_its_last_checkpoint(disk_store_path, die_in_merge):
    n, opt = 400, Adagrad(lr=0.05)
    status, text = fork_and_run(lambda: _killed_trainer(disk_store_path, opt, n, die_in_merge))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, text
    ref = Reference(opt, n)
    for ids, grads in _batches(n, 60, 32)[:30]:
        ref.push(ids, grads)
    store = embkv.open(disk_store_path)
    table = TrainingTable(store, "t", DIM, opt)
    try:
        assert table.step == 30
        np.testing.assert_array_equal(table.weights(np.arange(n)), ref.weights)
        np.testing.assert_array_equal(table.pull_state(np.arange(n)), ref.state)
        assert len(store["t.train-spill"]) == 0
        assert check_table(store["t.train"].path).ok
    finally:
        table.close()


def test_staleness_bound_zero_refuses_or_waits_for_the_push(store):
    table = TrainingTable(store, "t", DIM, SGD(lr=0.1), staleness=0)
    try:
        table.pull([1, 2])
        with pytest.raises(embkv.StalenessError):
            table.pull([2, 3], block=False)
        table.pull([3, 4])  # other rows are free
        got: list[float] = []

        def second_pull() -> None:
            t0 = time.monotonic()
            table.pull([2])
            got.append(time.monotonic() - t0)

        waiter = threading.Thread(target=second_pull)
        waiter.start()
        time.sleep(0.3)
        assert not got  # still waiting
        table.push([1, 2], np.ones((2, DIM), dtype=np.float32))
        waiter.join(5)
        assert got and got[0] >= 0.25
        assert table.stats()["seconds_stalled"] >= 0.25
    finally:
        table.close()


def test_staleness_bound_allows_that_many_more_outstanding_pulls(store):
    table = TrainingTable(store, "t", DIM, SGD(lr=0.1), staleness=2)
    try:
        for _ in range(3):
            table.pull([5])
        with pytest.raises(embkv.StalenessError):
            table.pull([5], block=False)
        table.push([5], np.ones((1, DIM), dtype=np.float32))
        table.pull([5], block=False)
    finally:
        table.close()


def test_admission_after_k_sightings_and_counters_survive_a_checkpoint(store):
    opt = SGD(lr=1.0)
    table = TrainingTable(store, "t", DIM, opt, admit_after=3, init_std=0.5)
    init = initial_vectors(np.array([7]), DIM, 0.5, 0)
    ones = np.ones((1, DIM), dtype=np.float32)
    try:
        for _ in range(2):  # seen once, twice: initial vector, gradient dropped
            np.testing.assert_array_equal(table.pull([7]), init)
            table.push([7], ones)
        assert table.stats()["not_admitted"] == 2 and table.stats()["waiting_admission"] == 1
        assert not table.get([7])[1][0]
        table.close()
        table = TrainingTable(store, "t", DIM, opt, admit_after=3, init_std=0.5)
        np.testing.assert_array_equal(table.pull([7]), init)  # the third sighting: now it has a row
        table.push([7], ones)
        np.testing.assert_array_equal(table.get([7])[0], init - 1.0)
        assert table.get([7])[1][0] and table.stats()["waiting_admission"] == 0
    finally:
        table.close()


def test_rows_untouched_for_n_steps_are_evicted_at_the_checkpoint(store):
    table = TrainingTable(store, "t", DIM, SGD(lr=0.1), evict_after_steps=5, cache_bytes=1 << 20)
    g = np.ones((1, DIM), dtype=np.float32)
    try:
        table.pull([1])
        table.push([1], g)  # step 1
        for _ in range(9):  # steps 2..10 touch only row 2
            table.pull([2])
            table.push([2], g)
        table.checkpoint()
        assert table.get([1, 2])[1].tolist() == [False, True]
        assert len(table.store["t.train"]) == 1
    finally:
        table.close()


def test_bad_input_is_refused_and_changes_nothing(store):
    table = TrainingTable(store, "t", DIM, Adagrad(lr=0.1), cache_bytes=20 * slot_bytes(2 * DIM))
    try:
        with pytest.raises(embkv.KeyTypeError):
            table.pull(np.array([1.5, 2.0]))
        with pytest.raises(embkv.KeyTypeError):
            table.pull(np.array([[1, 2]]))
        table.pull([1, 2])
        before = table.get([1, 2])[0]
        with pytest.raises(embkv.SchemaError, match="shape"):
            table.push([1, 2], np.ones((2, DIM + 1)))
        bad = np.ones((2, DIM), dtype=np.float32)
        bad[1, 3] = np.nan
        with pytest.raises(embkv.SchemaError, match="NaN or inf"):
            table.push([1, 2], bad)
        np.testing.assert_array_equal(table.get([1, 2])[0], before)
        assert table.step == 0
        table.push([1, 2], bad, skip_nonfinite=True)  # row 2's gradient dropped
        after = table.get([1, 2])[0]
        assert not np.array_equal(after[0], before[0]) and np.array_equal(after[1], before[1])
        assert table.stats()["skipped_rows"] == 1
        with pytest.raises(embkv.SchemaError, match="at least"):
            table.pull(np.arange(100, 200))  # 100 distinct rows, the cache holds 20
    finally:
        table.close()
    with pytest.raises(embkv.SchemaError, match=r"dim=8.*Adagrad.*dim=8.*Adam"):
        TrainingTable(store, "t", DIM, Adam(lr=0.1))
    with pytest.raises(embkv.SchemaError, match=r"dim=8.*dim=9"):
        TrainingTable(store, "t", DIM + 1, Adagrad(lr=0.1))
    with pytest.raises(embkv.SchemaError, match="cache_bytes"):
        TrainingTable(store, "u", DIM, SGD(), cache_bytes=10)
    with pytest.raises(embkv.SchemaError):
        Adagrad(lr=-1)


def test_one_trainer_process_per_table(store):
    table = TrainingTable(store, "t", DIM, SGD())
    try:
        status, text = fork_and_run(lambda: TrainingTable(embkv.open(store.path), "t", DIM, SGD()))
        assert os.WEXITSTATUS(status) == 1 and "WriterLockedError" in text
    finally:
        table.close()


def test_many_tables_in_one_process_each_with_its_own_optimizer(store):
    users = TrainingTable(store, "users", DIM, Adagrad(lr=0.1))
    items = TrainingTable(store, "items", 4, SGD(lr=1.0), init_std=0.0)
    try:
        users.pull([1])
        users.push([1], np.ones((1, DIM), dtype=np.float32))
        items.pull([1])
        items.push([1], np.ones((1, 4), dtype=np.float32))
        np.testing.assert_array_equal(items.get([1])[0], -np.ones((1, 4)))
        assert users.pull_state([1]).shape == (1, DIM) and items.pull_state([1]).shape == (1, 0)
    finally:
        users.close()
        items.close()


def test_publish_writes_the_weights_as_a_serving_table_readers_switch_to(store, tmp_path):
    serving = embkv.open(os.path.join(store.path, "serving"))
    table = TrainingTable(store, "users", DIM, Adagrad(lr=0.1))
    try:
        table.push_rows([1, 2, 3], np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM))
        table.publish(serving, "users")
        reader = embkv.open(serving.path, readonly=True)["users"]
        np.testing.assert_array_equal(reader.get([1, 2, 3])[0], np.arange(3 * DIM).reshape(3, DIM))
        assert reader.dim == DIM  # the optimizer state stays behind
        table.pull([1])
        table.push([1], np.ones((1, DIM), dtype=np.float32))
        table.publish(serving, "users")
        vectors, found = reader.get([1, 2, 3])  # the open reader switched to the new version
        assert found.all() and not np.array_equal(vectors[0], np.arange(DIM))
        np.testing.assert_array_equal(vectors, table.get([1, 2, 3])[0])
        reader.close()
    finally:
        table.close()
        serving.close()


def test_push_rows_with_state_then_pull_state(store):
    table = TrainingTable(store, "t", DIM, Adagrad(lr=0.1))
    try:
        table.push_rows([4, 4, 5], np.ones((3, DIM)), state=np.full((3, DIM), 2.0))
        np.testing.assert_array_equal(table.pull_state([5, 4]), np.full((2, DIM), 2.0, dtype=np.float32))
        np.testing.assert_array_equal(table.pull_state([99]), np.zeros((1, DIM), dtype=np.float32))
        table.checkpoint()
        assert len(table) == 2
    finally:
        table.close()


def _on_first_wait(table: TrainingTable, action: Any) -> None:
    """Run ``action`` (what another thread does) the first time ``table`` waits with its lock released."""
    real, done = table._cond.wait, [False]

    def wait(timeout: float | None = None) -> bool:
        if not done[0]:
            done[0] = True
            action()
            return True
        return real(timeout)

    table._cond.wait = wait  # type: ignore[method-assign]


def test_a_pull_that_waits_for_room_reads_the_rows_after_the_wait(store):
    """Regression (review of the first training tables): the rows were read before making room
    waited, so an update another thread made meanwhile was overwritten by the stale copy."""
    table = TrainingTable(store, "t", 4, SGD(lr=1.0), cache_bytes=20 * slot_bytes(4))
    try:
        held, x = np.arange(20), np.array([500])
        table.pull(held)  # another pipeline stage holds every slot
        init = table.weights(x)

        def other_thread() -> None:
            table.push(held, np.zeros((20, 4), dtype=np.float32))
            table.pull(x)
            table.push(x, np.ones((1, 4), dtype=np.float32))
            table.pull(np.arange(1000, 1019))  # x leaves the cache, dirty, for the spill table
            table.push(np.arange(1000, 1019), np.zeros((19, 4), dtype=np.float32))

        _on_first_wait(table, other_thread)
        np.testing.assert_array_equal(table.pull(x), init - 1)
        assert (table.cache.ids[table.cache.used] == 500).sum() == 1
    finally:
        table.close(checkpoint=False)


def test_a_failed_pull_leaves_no_pins(store):
    table = TrainingTable(store, "t", 4, SGD(), cache_bytes=20 * slot_bytes(4))
    try:
        table.pull(np.arange(10))
        table.push(np.arange(10), np.zeros((10, 4), dtype=np.float32))
        with pytest.raises(embkv.SchemaError, match="at least"):
            table.pull(np.arange(40))  # 10 cached, 30 more do not fit
        table.pull(np.arange(10), block=False)  # not pinned by the failed pull
    finally:
        table.close(checkpoint=False)
