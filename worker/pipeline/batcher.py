"""Dynamic batching as a small pure function over a real queue.

Waits for the first item without a deadline (or at most `first_wait_s`, for a caller with other
work to do when nothing comes), then gathers more until the batch is full or `max_wait_s` has
passed since the first item arrived (monotonic clock). A sentinel object ends
the stream; whatever was gathered before it is still returned.
"""

from __future__ import annotations

import queue
import time
from typing import Any

STOP = object()


def collect_batch(
    source: queue.Queue,
    max_size: int,
    max_wait_s: float,
    stop: object = STOP,
    first_wait_s: float | None = None,
) -> tuple[list[Any], bool]:
    """Return (items, stopped). `stopped` is True once the sentinel has been taken from the queue;
    items is empty when `first_wait_s` passed with nothing in the queue."""
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    try:
        first = source.get() if first_wait_s is None else source.get(timeout=max(0.0, first_wait_s))
    except queue.Empty:
        return [], False
    if first is stop:
        return [], True
    items = [first]
    deadline = time.monotonic() + max(0.0, max_wait_s)
    while len(items) < max_size:
        remaining = deadline - time.monotonic()
        try:
            item = source.get(timeout=remaining) if remaining > 0 else source.get_nowait()
        except queue.Empty:
            break
        if item is stop:
            return items, True
        items.append(item)
    return items, False
