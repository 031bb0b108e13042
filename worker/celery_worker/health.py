"""When this worker's engine is broken, stop the worker instead of failing everyone's images.

A labeling service that gave up (pipeline/service.py: batches failing in a row, a crashed inference
thread) or a model that cannot load would fail every job this worker takes, and a fast-failing
worker drains the whole queue. So the job in hand goes back to the queue without spending one of
its deliveries, the worker warm-shuts itself down (SIGTERM to its main process: Celery stops
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


class EngineHealth:
    """Whether this process stopped its worker, and why. Made in the main worker process, so prefork
    children inherit `main_pid` and signal the process that owns the worker."""

    def __init__(self, main_pid: int | None = None) -> None:
        self.main_pid = main_pid or os.getpid()
        self._lock = threading.Lock()
        self.failure: str | None = None

    def stop_worker(self, reason: str) -> None:
        """Record why, and ask the Celery worker for a warm shutdown (once)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.critical("stopping this worker, its engine is broken: %s", reason)
        os.kill(self.main_pid, signal.SIGTERM)
