"""The dynamic batcher, driven through a real queue.Queue."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from worker.pipeline.batcher import STOP, collect_batch


def filled(*items) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_takes_up_to_max_size_and_leaves_the_rest():
    q = filled(*range(10))
    assert collect_batch(q, 4, 1.0) == ([0, 1, 2, 3], False)
    assert q.qsize() == 6


def test_timeout_zero_takes_only_what_is_already_there():
    q = filled(1, 2)
    started = time.monotonic()
    assert collect_batch(q, 100, 0.0) == ([1, 2], False)
    assert time.monotonic() - started < 0.5


def test_max_size_one_never_waits_for_more():
    q = filled("a", "b")
    assert collect_batch(q, 1, 60.0) == (["a"], False)


def test_huge_batch_with_short_wait_returns_after_the_wait():
    q = filled(1)
    started = time.monotonic()
    items, stopped = collect_batch(q, 10_000, 0.05)
    assert items == [1] and not stopped
    assert 0.04 <= time.monotonic() - started < 2.0


def test_huge_timeout_is_ended_by_the_sentinel_and_keeps_gathered_items():
    q = filled(1, 2, STOP, 3)
    assert collect_batch(q, 100, 3600.0) == ([1, 2], True)
    assert q.get_nowait() == 3


def test_sentinel_first_means_stopped_with_nothing():
    assert collect_batch(filled(STOP), 8, 1.0) == ([], True)


def test_items_arriving_during_the_wait_join_the_batch():
    q = filled(0)

    def feed():
        for i in range(1, 4):
            time.sleep(0.01)
            q.put(i)

    thread = threading.Thread(target=feed)
    thread.start()
    items, _ = collect_batch(q, 4, 5.0)
    thread.join()
    assert items == [0, 1, 2, 3]


def test_waits_without_deadline_for_the_first_item():
    q: queue.Queue = queue.Queue()
    threading.Timer(0.1, q.put, args=("late",)).start()
    assert collect_batch(q, 8, 0.0) == (["late"], False)


def test_rejects_a_batch_size_below_one():
    with pytest.raises(ValueError):
        collect_batch(filled(1), 0, 1.0)


def test_first_wait_returns_nothing_when_no_item_comes():
    """The GPU pipeline's case: with a batch in flight, an empty queue means 'finish that one'."""
    q: queue.Queue = queue.Queue()
    assert collect_batch(q, 8, 5.0, first_wait_s=0.0) == ([], False)
    started = time.monotonic()
    assert collect_batch(q, 8, 5.0, first_wait_s=0.05) == ([], False)
    assert time.monotonic() - started >= 0.05


def test_first_wait_still_gathers_a_batch_and_sees_the_sentinel():
    q = filled(1, 2, STOP)
    assert collect_batch(q, 8, 1.0, first_wait_s=0.0) == ([1, 2], True)
    assert collect_batch(filled(STOP), 8, 1.0, first_wait_s=0.0) == ([], True)
