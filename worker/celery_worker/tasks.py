"""The labeler's tasks and the worker's signal hooks: thin, the work is in job.py.

`LabelerTask` is the base of every labeler task. It owns the process's `WorkerProcess` (Celery's
pattern for per-process resources) and turns every outcome into one of three: a result, a clear
refusal of a job that can never succeed (a failed result naming why, logged, acked), or a requeue (acks_late
would ack a failed task, dropping the shard; the ledger's attempts bound the loop).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown, worker_shutting_down

from worker.celery_worker.app import app
from worker.celery_worker.job import PathsJob, ShardJob
from worker.celery_worker.outcomes import BadJob
from worker.celery_worker.process import WorkerProcess
from worker.celery_worker.startup_checks import configuration_warnings
from worker.ledger.keys import RunNameError
from worker.ledger.protocol import PATHS_TASK, RETIRED_TASKS, SHARD_TASK

log = logging.getLogger(__name__)


class LabelerTask(Task):
    process: ClassVar[WorkerProcess] = WorkerProcess(app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id or "unknown"
        try:
            return super().__call__(*args, **kwargs)
        except Reject:
            raise
        except (BadJob, RunNameError, TypeError) as exc:  # TypeError: arguments of another shape
            log.error("job %s refused: %s", job_id, exc)
            raise BadJob(f"refused: {exc}") from exc  # a failed result the sender can read, acked
        except Exception as exc:  # noqa: BLE001 - any other failure requeues; attempts bound the loop
            log.exception("job %s failed, requeueing", job_id)
            raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc


@app.task(name=SHARD_TASK, bind=True, base=LabelerTask)
def label_shard(self: LabelerTask, **kwargs: Any) -> dict[str, Any]:
    """Label one shard of a run into the run's dataset."""
    result = ShardJob(self.process, self.request.id or "unknown", kwargs).run_job()
    result["worker"] = self.request.hostname
    return result


@app.task(name=PATHS_TASK, bind=True, base=LabelerTask)
def label_paths(self: LabelerTask, **kwargs: Any) -> dict[str, Any]:
    """Label a few paths and return their records in the result."""
    result = PathsJob(self.process, kwargs).label()
    result["worker"] = self.request.hostname
    return result


def _retired(name: str, what: str):
    @app.task(name=name, bind=True)
    def retired(self: Task, *args: Any, **kwargs: Any) -> None:
        """A job of a retired protocol: failed with a message the sender can read, never dropped."""
        raise BadJob(
            f"{name} ({what}) is no longer served: publish {SHARD_TASK} (a shard of a run, labels in its "
            f"Parquet dataset) or {PATHS_TASK} (a few paths, labels in the job's result); docs/queue-contract.md"
        )

    return retired


RETIRED = [_retired(name, what) for name, what in RETIRED_TASKS.items()]


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs: object) -> None:
    LabelerTask.process.node_name = str(sender)


@worker_ready.connect
def _on_ready(**_kwargs: object) -> None:
    process = LabelerTask.process
    for warning in configuration_warnings(process.settings):
        log.warning("configuration: %s", warning)
    process.sweeper.start()
    port = process.settings.metrics_port
    if port:
        process.metrics.serve(port)


@worker_shutting_down.connect
def _on_shutting_down(**_kwargs: object) -> None:
    """Warm shutdown: running jobs stop submitting, finish the images in flight, hand back the rest."""
    LabelerTask.process.stopping.set()


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: object) -> None:
    LabelerTask.process.close()
