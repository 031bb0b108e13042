"""The labeling task and the worker's signal hooks: thin, the work is in job.py.

`LabelerTask` is the base of every labeler task. It owns the process's `WorkerProcess` (Celery's
pattern for per-process resources), counts each delivery of a job in Redis and dead-letters a job
after `max_deliveries`: with late acks and requeue on a lost worker, a job that crashes its worker
would otherwise be delivered forever. Any exception becomes a requeue (acks_late would ack it,
dropping the chunk); the counter bounds the loop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown, worker_shutting_down

from worker.celery_worker.app import app
from worker.celery_worker.job import LabelJob, job_arguments
from worker.celery_worker.process import WorkerProcess
from worker.celery_worker.redis_retry import REDIS_ERRORS
from worker.runs.keys import RunNameError
from worker.runs.protocol import TASK_NAME

log = logging.getLogger(__name__)


class LabelerTask(Task):
    process: ClassVar[WorkerProcess] = WorkerProcess(app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id or "unknown"
        try:
            run, paths = job_arguments(args, kwargs)
        except (ValueError, RunNameError) as exc:
            log.error("malformed job %s rejected: %s", job_id, exc)
            raise Reject(f"malformed job: {exc}", requeue=False) from exc
        job = LabelJob(self.process, job_id, run, paths)
        deliveries = job.count_delivery()
        limit = self.process.settings.max_deliveries
        if deliveries > limit:
            return job.dead_letter(deliveries - 1)
        try:
            return super().__call__(*args, **kwargs)
        except Reject:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure requeues; the counter bounds the loop
            log.exception("job %s failed (delivery %d of %d), requeueing", job_id, deliveries, limit)
            with contextlib.suppress(REDIS_ERRORS):
                self.process.store.note_error(run, job_id, f"{type(exc).__name__}: {exc}")
            raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc


@app.task(name=TASK_NAME, bind=True, base=LabelerTask)
def label_chunk(self: LabelerTask, run: str, paths: list[str], return_records: bool = False) -> dict[str, Any]:
    """Label `paths` into run `run`. Returns counts (and the records, when asked, for small jobs)."""
    result = LabelJob(self.process, self.request.id or "unknown", run, paths).label(return_records)
    result["worker"] = self.request.hostname
    return result


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs: object) -> None:
    LabelerTask.process.node_name = str(sender)


@worker_ready.connect
def _start_metrics_endpoint(**_kwargs: object) -> None:
    port = LabelerTask.process.settings.metrics_port
    if port:
        LabelerTask.process.metrics.serve(port)


@worker_shutting_down.connect
def _on_shutting_down(**_kwargs: object) -> None:
    """Warm shutdown: running jobs stop submitting, finish the images in flight, hand back the rest."""
    LabelerTask.process.stopping.set()


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: object) -> None:
    LabelerTask.process.close()
