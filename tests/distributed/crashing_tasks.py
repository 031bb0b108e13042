"""Test-only task module, loaded into a test worker with `--include crashing_tasks`.

`tests.crash_chunk` uses the production task base class (delivery counting, dead-lettering) but kills its own process
(as a segfault or the OOM killer would), so the dead-letter path is exercised for real: the pool
child dies, Celery requeues the message (task_reject_on_worker_lost), and after
LABELER_MAX_DELIVERIES deliveries the base class dead-letters the job instead of running it again.
"""

from __future__ import annotations

import os

from worker.celery_worker.app import app
from worker.celery_worker.tasks import LabelerTask

CRASH_TASK = "tests.crash_chunk"


@app.task(name=CRASH_TASK, bind=True, base=LabelerTask)
def crash_chunk(self, run: str, paths: list[str]) -> dict:
    os._exit(3)
