"""``WorkQueueTests``: the contract of :class:`embkv.WorkQueue`, as a pytest class to subclass.

A subclass overrides the ``make_queue`` fixture with a :class:`QueueFactory`. Calling the
factory twice with the same ``name`` must give two objects on the same queue (what two
processes opening it would get); another name, an independent queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal, Protocol

import numpy as np
import pytest

from ..compute.queue import FailureInfo, WorkItem, WorkQueue
from ..errors import KeyTypeError
from .data import poll

__all__ = ["QueueFactory", "WorkQueueTests"]


class QueueFactory(Protocol):
    """Opens the queue called ``name`` (created empty on first use), with these retry settings."""

    def __call__(self, key_type: Literal["int64", "str"] = "int64", *, name: str = "q", max_attempts: int = 3,
                 backoff: float = 0.05, max_backoff: float = 300.0) -> WorkQueue: ...


def keys_of(items: list[WorkItem]) -> list[Any]:
    return sorted(it.key for it in items)


class WorkQueueTests:
    """The conformance suite of :class:`embkv.WorkQueue`; see :mod:`embkv.testing`."""

    @pytest.fixture
    def make_queue(self) -> Iterator[QueueFactory]:
        """Override with a fixture that yields a :class:`QueueFactory` and closes what it opened."""
        raise NotImplementedError("a WorkQueueTests subclass overrides the make_queue fixture")
        yield  # pragma: no cover

    # ---------------------------------------------------------------- enqueue, claim, ack

    def test_enqueue_once(self, make_queue: QueueFactory) -> None:
        queue = make_queue()
        assert queue.enqueue([1, 2, 3]) == 3
        assert queue.enqueue([2, 3, 4, 4]) == 1  # pending keys are not queued again
        assert queue.depth() == 4
        items = queue.claim(2, lease_seconds=30)
        assert len(items) == 2
        assert queue.enqueue([it.key for it in items]) == 0  # nor are keys being computed
        assert queue.depth() == 4
        queue.ack(items)
        assert queue.depth() == 2
        assert queue.enqueue([it.key for it in items]) == 2  # done keys may be queued again
        rest = queue.claim(10)
        assert keys_of(rest) == sorted({1, 2, 3, 4})
        assert all(it.enqueued_at <= time.time() and it.attempts == 0 for it in rest)

    @pytest.mark.parametrize("key_type", ["int64", "str"])
    def test_keys_come_back_exactly_as_queued(self, make_queue: QueueFactory,
                                              key_type: Literal["int64", "str"]) -> None:
        q = make_queue(key_type)
        if key_type == "int64":
            keys: list[Any] = [0, -1, 2**63 - 1, -(2**63), 12345678901234]
            more: list[Any] = [np.int64(7), 8]  # not all plain ints: the checked path
        else:
            keys = ["plain", 'with "quotes"', "back\\slash", "ключ", "🔑" * 3, "tab\tnewline\n", "\x00nul", ""]
            more = [b"raw \xff bytes", "text"]  # bytes that are not UTF-8 stay bytes
        assert q.enqueue(keys + keys[:2]) == len(keys)
        assert q.enqueue(keys) == 0  # the same keys, however they were sent, are pending already
        assert q.enqueue(more) == 2
        got = [it.key for it in q.claim(100)]
        want = keys + [int(k) if isinstance(k, np.integer) else k for k in more]
        assert sorted(got, key=repr) == sorted(want, key=repr)
        if key_type == "int64":
            assert all(type(k) is int for k in got)
        assert q.enqueue(got) == 0

    def test_int64_queue_refuses_keys_outside_int64(self, make_queue: QueueFactory) -> None:
        q = make_queue()
        for bad in ([2**63], [-(2**63) - 1], [1, 2**64]):
            with pytest.raises(KeyTypeError, match="int64"):
                q.enqueue(bad)
        assert q.depth() == 0

    def test_key_types_are_checked(self, make_queue: QueueFactory) -> None:
        ints = make_queue()
        for bad in (["a"], [1.5], [b"1"], [None], [True]):
            with pytest.raises(KeyTypeError):
                ints.enqueue(bad)
        strs = make_queue("str", name="s")
        for bad_str in ([1], [None], [1.5]):
            with pytest.raises(KeyTypeError):
                strs.enqueue(bad_str)
        assert ints.depth() == 0 and strs.depth() == 0
        assert strs.enqueue(["a", "b", "a"]) == 2
        assert keys_of(strs.claim(5)) == ["a", "b"]

    def test_a_second_handle_sees_the_same_queue(self, make_queue: QueueFactory) -> None:
        first = make_queue()
        second = make_queue()
        other = make_queue(name="other")
        assert first.enqueue([1, 2, 3]) == 3
        assert second.depth() == 3 and other.depth() == 0
        assert second.enqueue([3, 4]) == 1
        mine = first.claim(2, lease_seconds=30)
        theirs = second.claim(10, lease_seconds=30)
        assert not set(keys_of(mine)) & set(keys_of(theirs)), "a leased key was handed out twice"
        assert sorted(keys_of(mine) + keys_of(theirs)) == [1, 2, 3, 4]
        second.ack(mine)  # a lease is acknowledged by whoever finished the work
        first.ack(theirs)
        assert first.depth() == 0 and second.depth() == 0

    def test_expired_lease_is_claimed_again(self, make_queue: QueueFactory) -> None:
        queue = make_queue()
        queue.enqueue(np.arange(5))
        first = queue.claim(5, lease_seconds=0.1)
        assert keys_of(first) == [0, 1, 2, 3, 4]
        assert queue.claim(5, lease_seconds=30) == []  # leased
        # (Redis: a message is taken over once idle longer than the *claimer's* lease_seconds)
        again = poll(lambda: queue.claim(5, lease_seconds=0.1), 10, "the lease to run out")
        assert keys_of(again) == [0, 1, 2, 3, 4]
        queue.ack(again)
        assert queue.depth() == 0

    # ---------------------------------------------------------------- failures

    def test_fail_retries_with_backoff_then_gives_up(self, make_queue: QueueFactory) -> None:
        queue = make_queue(max_attempts=3, backoff=0.05)
        queue.enqueue([10, 11])
        items = {it.key: it for it in queue.claim(2)}
        t0 = time.monotonic()
        assert queue.fail(items[10], "ValueError: bad key 10") is True
        queue.ack([items[11]])
        assert queue.claim(2) == []  # waiting for its backoff
        assert queue.failures()[10] == FailureInfo(1, "ValueError: bad key 10", False)
        assert queue.enqueue([10]) == 0  # still pending
        retry = poll(lambda: queue.claim(2), 10, "the retry")
        assert time.monotonic() - t0 >= 0.05 - 0.01
        assert [(it.key, it.attempts) for it in retry] == [(10, 1)]
        assert queue.fail(retry[0], "ValueError: again") is True
        retry = poll(lambda: queue.claim(2), 10, "the second retry")
        assert retry[0].attempts == 2
        assert queue.fail(retry[0], "ValueError: third") is False  # max_attempts=3
        info = queue.failures()[10]
        assert info.gave_up and info.attempts == 3 and "third" in info.error
        assert queue.depth() == 0
        assert queue.enqueue([10]) == 0  # given up: not queued again by lookups
        assert queue.retry_failed() == 1
        assert [it.key for it in poll(lambda: queue.claim(5), 10, "the revived key")] == [10]

    def test_retry_delay_is_exponential_and_capped(self, make_queue: QueueFactory) -> None:
        queue = make_queue(backoff=0.05, max_backoff=0.3)
        assert [queue.retry_delay(a) for a in (1, 2, 3, 4, 5)] == [0.05, 0.1, 0.2, 0.3, 0.3]

    # ---------------------------------------------------------------- shared counters

    def test_counters_add_up_across_queue_objects(self, make_queue: QueueFactory) -> None:
        queue, other = make_queue(), make_queue()
        assert queue.counters() == {}
        queue.add_counters({"lookups": 3, "hits": 2.5})
        other.add_counters({"hits": 0.25, "fill_ms_le_10": 1})
        queue.add_counters({"lookups": 1})
        want = {"lookups": 4.0, "hits": 2.75, "fill_ms_le_10": 1.0}
        assert queue.counters() == want
        assert other.counters() == want
        other.add_counters({"hits": -0.75})  # a delta may be negative (a gauge moved down)
        assert queue.counters()["hits"] == 2.0
        assert make_queue(name="other").counters() == {}

    def test_counters_empty_deltas_do_nothing(self, make_queue: QueueFactory) -> None:
        queue = make_queue()
        queue.add_counters({})
        assert queue.counters() == {}
        queue.add_counters({"a": 1})
        queue.add_counters({})
        assert queue.counters() == {"a": 1.0}

    def test_counters_reject_bad_input(self, make_queue: QueueFactory) -> None:
        queue = make_queue()
        queue.add_counters({"a": 1})
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="finite"):
                queue.add_counters({"b": 1, "a": bad})  # all or nothing: "b" is not added either
        bad_deltas: list[Any] = [{"": 1}, {3: 1}, {"b": "1"}]
        for deltas in bad_deltas:
            with pytest.raises(TypeError):
                queue.add_counters(deltas)
        assert queue.counters() == {"a": 1.0}

    def test_counters_are_not_queue_work(self, make_queue: QueueFactory) -> None:
        queue = make_queue()
        queue.add_counters({"hits": 5})
        assert queue.depth() == 0 and queue.claim(10) == [] and queue.failures() == {}
