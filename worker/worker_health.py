"""When this worker's engine is broken, stop the worker instead of failing everyone's images.

A labeling service that gave up (worker/service.py: batches failing in a row, a crashed inference
thread) or a model that cannot load would fail every job this worker takes, and a fast-failing
worker drains the whole queue. So the job in hand goes back to the queue without spending one of
its deliveries, the worker warm-shuts itself down (SIGTERM to its own process: Celery stops
consuming and running jobs hand their work back), and `labeler worker` exits with EXIT_ENGINE_BROKEN,
so systemd (Restart=on-failure), Kubernetes or Compose restarts it on a fresh CUDA context while the
other workers take the jobs. With the prefork pool, where the engine lives in a pool child, the
child signals the main worker process instead (a replaced child would only break again); that
process then exits 0, since the reason stayed in the child.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

EXIT_ENGINE_BROKEN = 70  # EX_SOFTWARE: not a clean stop, restart me

_lock = threading.Lock()
_failure: str | None = None
_WORKER_PID = os.getpid()  # imported by the main worker process; prefork children inherit it


def engine_failure() -> str | None:
    """Why this process stopped its worker (None: it did not)."""
    return _failure


def stop_worker(reason: str) -> None:
    """Record why, and ask this process's Celery worker for a warm shutdown (once)."""
    global _failure
    with _lock:
        if _failure is not None:
            return
        _failure = reason
    log.critical("stopping this worker, its engine is broken: %s", reason)
    os.kill(_WORKER_PID, signal.SIGTERM)
