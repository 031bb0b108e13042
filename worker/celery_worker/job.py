"""One labeling job, read top to bottom: which paths still need work, submit them to the process's
shared service, write their records as they come, and end in exactly one of three ways.

- finished: every path has its record in Redis (then the task returns and Celery acks);
- handed back (Reject with requeue): a Redis outage, the job's own deadline, a warm shutdown, or an
  engine failure (whose `inference_failed` records are never kept: the images are not at fault);
- dead-lettered: delivered more than `max_deliveries` times; its paths get `internal_error` records.

A redelivered job skips the paths that already have records, so each image ends with one record.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from celery.exceptions import Reject

from worker.celery_worker.process import WorkerProcess
from worker.celery_worker.redis_retry import with_redis_retry
from worker.pipeline.service import ServiceFailed
from worker.records import ErrorCode, Record, error_record, is_engine_failure, is_error
from worker.runs.keys import check_run_name

log = logging.getLogger(__name__)

T = TypeVar("T")


def job_arguments(args: tuple, kwargs: dict) -> tuple[str, list[str]]:
    """(run, paths) from a job, positional or keyword; ValueError for a malformed job."""
    run = kwargs.get("run", args[0] if args else None)
    paths = kwargs.get("paths", args[1] if len(args) > 1 else None)
    if not isinstance(run, str):
        raise ValueError("job needs 'run', a string")
    check_run_name(run)
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError("job needs 'paths', a list of non-empty strings")
    return run, paths


class RecordSink:
    """Records of one job, handed from the inference thread to the job's thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Record] = queue.Queue()

    def put(self, record: Record) -> None:
        self._queue.put(record)

    def pending(self) -> int:
        return self._queue.qsize()

    def take(self, most: int, timeout: float) -> list[Record]:
        try:
            records = [self._queue.get(timeout=max(timeout, 0.0))]
        except queue.Empty:
            return []
        while len(records) < most:
            try:
                records.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return records


class LabelJob:
    """One delivery of one job in one worker process."""

    def __init__(self, process: WorkerProcess, job_id: str, run: str, paths: list[str]) -> None:
        self.process = process
        self.settings = process.settings
        self.store = process.store
        self.job_id = job_id
        self.run = run
        self.paths = paths
        self.labeled = 0
        self.failed = 0
        self.engine_failed = 0

    def redis(self, action: Callable[[], T], what: str) -> T:
        return with_redis_retry(action, what, self.settings.redis_retry_s)

    # -- delivery counting, before the job runs ---------------------------------------------------

    def count_delivery(self) -> int:
        return self.redis(lambda: self.store.count_delivery(self.run, self.job_id), "counting a delivery")

    def note_error(self, reason: str) -> None:
        self.redis(lambda: self.store.note_error(self.run, self.job_id, reason), "noting an error")

    def dead_letter(self, attempts: int) -> dict[str, Any]:
        """Give up on a job that keeps failing or killing its worker: its unfinished paths get an
        `internal_error` record, the job goes on the run's dead list."""
        last = self.store.last_error(self.run, self.job_id)
        reason = f"delivered {attempts} times without finishing" + (
            f"; last error: {last}" if last else " (its worker was lost each time)"
        )
        log.error("dead-lettering job %s of run %s: %s", self.job_id, self.run, reason)
        todo = self.store.paths_without_record(self.run, self.paths)
        message = f"job dead-lettered: {reason}"
        records = [error_record(path, ErrorCode.INTERNAL_ERROR, message) for path in todo]
        self.redis(lambda: self.store.write_records(self.run, records), "writing dead-letter records")
        self.redis(
            lambda: self.store.dead_letter(self.run, self.job_id, self.paths, attempts, reason),
            "dead-lettering a job",
        )
        return {"run": self.run, "job_id": self.job_id, "dead_lettered": True, "reason": reason,
                "images": len(self.paths)}  # fmt: skip

    # -- the job ----------------------------------------------------------------------------------

    def label(self, return_records: bool = False) -> dict[str, Any]:
        """Label the paths that have no record yet; return counts (and the records, when asked)."""
        todo = list(dict.fromkeys(
            self.redis(lambda: self.store.paths_without_record(self.run, self.paths), "resume check")
        ))  # fmt: skip
        if todo:  # a redelivered job whose images all have records needs no engine
            self._label(todo)
        return self._finish(len(self.paths) - len(todo), return_records)

    def _label(self, todo: list[str]) -> None:
        health = self.process.health
        if health.failure is not None:  # this worker is stopping; do not reload a broken engine
            self._hand_back_from_broken_worker(health.failure)
        try:
            service = self.process.service()
        except Exception as exc:
            log.critical("cannot load the model, handing job %s back: %s", self.job_id, exc)
            self._hand_back_from_broken_worker(f"model failed to load: {exc}")

        sink = RecordSink()
        flush_size = self.settings.flush_records
        deadline = time.monotonic() + self.settings.task_deadline_s
        submitted = written = 0
        for path in todo:
            if self.process.stopping.is_set() or time.monotonic() > deadline:
                break
            try:
                service.submit(path, sink.put)
            except ServiceFailed:
                break
            submitted += 1
            if sink.pending() >= flush_size:
                written += self._flush(sink.take(flush_size, 0))
        while written < submitted and time.monotonic() < deadline + self.settings.deadline_grace_s:
            written += self._flush(sink.take(flush_size, 0.25))

        if service.failure is not None:
            reason = f"labeling service gave up: {service.failure}"
            if self.engine_failed or written < len(todo):
                self._hand_back_from_broken_worker(reason)
            health.stop_worker(reason)  # this job got all its records first; the worker still stops
        if self.engine_failed:
            reason = f"{self.engine_failed} images met an engine failure; the job goes back for them"
            log.warning("job %s: %s", self.job_id, reason)
            self.note_error(reason)
            raise Reject(reason, requeue=True)
        if written < len(todo):
            self._hand_back_unfinished(len(todo) - written)

    def _flush(self, records: list[Record]) -> int:
        """Write the records worth keeping; returns how many images were answered."""
        kept = [r for r in records if not is_engine_failure(r)]
        self.engine_failed += len(records) - len(kept)
        if kept:
            self.redis(lambda: self.store.write_records(self.run, kept), "writing records")
            self.process.note_activity(self.run, kept)
            failed = sum(1 for r in kept if is_error(r))
            self.failed += failed
            self.labeled += len(kept) - failed
        return len(records)

    def _hand_back_unfinished(self, left: int) -> NoReturn:
        if self.process.stopping.is_set():
            log.warning("warm shutdown: job %s has %d images left, handing them back", self.job_id, left)
            self.redis(lambda: self.store.uncount_delivery(self.run, self.job_id), "uncounting a delivery")
            raise Reject("warm shutdown", requeue=True)
        reason = f"deadline of {self.settings.task_deadline_s:.0f} s passed with {left} images left"
        self.note_error(reason)
        raise Reject(reason, requeue=True)

    def _hand_back_from_broken_worker(self, reason: str) -> NoReturn:
        """Requeue without spending a delivery (the worker failed, not the job); stop the worker."""
        self.redis(lambda: self.store.uncount_delivery(self.run, self.job_id), "uncounting a delivery")
        self.process.health.stop_worker(reason)
        raise Reject(reason, requeue=True)

    def _finish(self, skipped: int, return_records: bool) -> dict[str, Any]:
        """Every path has its record: clear the delivery count and say what the job did."""
        self.redis(lambda: self.store.finish_job(self.run, self.job_id), "finishing a job")
        result: dict[str, Any] = {
            "run": self.run,
            "job_id": self.job_id,
            "images": len(self.paths),
            "skipped": skipped,
            "labeled": self.labeled,
            "failed": self.failed,
        }
        if return_records:
            result["records"] = self.redis(
                lambda: self.store.get_records(self.run, self.paths), "reading records"
            )
        return result
