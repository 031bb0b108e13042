"""Facts about the machine the worker runs on."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask (taskset, cpusets, one worker per NUMA node)
    rather than every core in the box, so thread pools are not oversubscribed."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
