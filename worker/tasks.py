"""The labeling task: a chunk of paths in, one record per path in Redis, keyed by (run, path).

Every job of a worker process shares one `LabelingService` (created on first use, inside the
process that infers), so images of concurrent jobs share engine batches. A job never ends acked
without its records: it finishes (records written, then acked), or it hands the job back to the
queue (Reject with requeue) on a Redis outage, its own deadline or a warm shutdown; a redelivered
job skips the paths that already have records. Deliveries are counted in Redis, and a job that
keeps failing or killing its worker is dead-lettered after `max_deliveries`.

An engine failure is never an image's fault, so `inference_failed` records are not kept: the job
goes back to the queue for those images, and a broken engine stops its worker (worker_health).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_shutdown, worker_shutting_down

from worker.celery_app import TASK_NAME, app
from worker.errors import ErrorCode
from worker.postprocess import error_record, is_engine_failure
from worker.run_store import RunNameError, RunStore, check_run_name
from worker.service import LabelingService, ServiceFailed, ServiceOptions
from worker.settings import Settings
from worker.worker_health import engine_failure, stop_worker
from worker.worker_telemetry import note_records, process_metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

_shutting_down = threading.Event()
_service_lock = threading.Lock()
_service: LabelingService | None = None
_store: RunStore | None = None


def settings() -> Settings:
    return app.labeler_settings  # type: ignore[attr-defined]


def run_store() -> RunStore:
    """One Redis client (and connection pool) per worker process."""
    global _store
    if _store is None:
        client = redis.Redis.from_url(
            settings().broker_url, socket_connect_timeout=5, socket_timeout=60, health_check_interval=15
        )
        _store = RunStore(client, settings().key_prefix)
    return _store


def shared_service() -> LabelingService:
    """The process's labeling service, loaded on first use (after any fork, on the worker's side)."""
    global _service
    with _service_lock:
        if _service is None:
            _service = _create_service(settings())
        return _service


def _create_service(config: Settings) -> LabelingService:
    from worker.reading import ReadPolicy
    from worker.runners import create_runner

    if config.model:
        bundle = Path(config.model)
    else:
        from engine_build.default_bundle import ensure_default_bundle

        bundle = ensure_default_bundle(echo=log.warning)
    runner_options: dict[str, Any] = {"variant": config.precision}
    if config.backend == "onnxruntime":
        runner_options["intra_op_threads"] = config.intra_op_threads or None
    runner = create_runner(bundle, config.backend, **runner_options)
    options = ServiceOptions(
        max_batch_size=config.batch_size or runner.default_batch_size,
        max_wait_s=config.max_wait_ms / 1000.0,
        decode_threads=config.decode_threads,
        top_k=config.top_k,
        read_policy=ReadPolicy.create(config.allowed_roots, config.max_bytes),
        observer=process_metrics(),
    )
    service = LabelingService(runner, options).start()
    log.warning("labeling service ready: %s (%s, %s)", bundle, config.backend, config.precision)
    return service


@worker_shutting_down.connect
def _on_shutting_down(**_kwargs: object) -> None:
    """Warm shutdown: running jobs stop submitting, finish the images in flight, hand back the rest."""
    _shutting_down.set()


@worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: object) -> None:
    global _service
    with _service_lock:
        if _service is not None:
            _service.close()
            _service = None


def with_redis_retry(action: Callable[[], T], what: str) -> T:
    """Retry through a Redis outage (restart, failover); past the limit, requeue the job."""
    limit = time.monotonic() + settings().redis_retry_s
    delay = 0.2
    while True:
        try:
            return action()
        except REDIS_ERRORS as exc:
            if time.monotonic() + delay > limit:
                log.error("Redis unavailable for %s, handing the job back: %s", what, exc)
                raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc
            log.warning("Redis error during %s (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


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


class DeliveryCountingTask(Task):
    """Counts each delivery of a job in Redis and dead-letters it after `max_deliveries`.

    With late acks and requeue on a lost worker, a job that crashes its worker would otherwise be
    delivered forever. Any exception becomes a requeue (acks_late would ack it, dropping the chunk).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id or "unknown"
        try:
            run, paths = job_arguments(args, kwargs)
        except (ValueError, RunNameError) as exc:
            log.error("malformed job %s rejected: %s", job_id, exc)
            raise Reject(f"malformed job: {exc}", requeue=False) from exc
        store = run_store()
        deliveries = with_redis_retry(lambda: store.count_delivery(run, job_id), "counting a delivery")
        limit = settings().max_deliveries
        if deliveries > limit:
            return self._dead_letter(store, job_id, run, paths, deliveries - 1)
        try:
            return super().__call__(*args, **kwargs)
        except Reject:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure requeues; the counter bounds the loop
            log.exception("job %s failed (delivery %d of %d), requeueing", job_id, deliveries, limit)
            with contextlib.suppress(REDIS_ERRORS):
                store.note_error(run, job_id, f"{type(exc).__name__}: {exc}")
            raise Reject(f"{type(exc).__name__}: {exc}", requeue=True) from exc

    def _dead_letter(
        self, store: RunStore, job_id: str, run: str, paths: list[str], attempts: int
    ) -> dict[str, Any]:
        last = store.last_error(run, job_id)
        reason = f"delivered {attempts} times without finishing" + (
            f"; last error: {last}" if last else " (its worker was lost each time)"
        )
        log.error("dead-lettering job %s of run %s: %s", job_id, run, reason)
        todo = store.paths_without_record(run, paths)
        records = [
            error_record(path, str(ErrorCode.INTERNAL_ERROR), f"job dead-lettered: {reason}") for path in todo
        ]
        with_redis_retry(lambda: store.write_records(run, records), "writing dead-letter records")
        with_redis_retry(
            lambda: store.dead_letter(run, job_id, paths, attempts, reason), "dead-lettering a job"
        )
        return {"run": run, "job_id": job_id, "dead_lettered": True, "reason": reason, "images": len(paths)}


class _RecordSink:
    """Records of one job, handed from the inference thread to the job's thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()

    def put(self, record: dict[str, Any]) -> None:
        self._queue.put(record)

    def pending(self) -> int:
        return self._queue.qsize()

    def take(self, most: int, timeout: float) -> list[dict[str, Any]]:
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


@app.task(name=TASK_NAME, bind=True, base=DeliveryCountingTask)
def label_chunk(self: Task, run: str, paths: list[str], return_records: bool = False) -> dict[str, Any]:
    """Label `paths` into run `run`. Returns counts (and the records, when asked, for small jobs)."""
    result = label_paths(self.request.id or "unknown", run, paths, return_records)
    result["worker"] = self.request.hostname
    return result


def label_paths(job_id: str, run: str, paths: list[str], return_records: bool = False) -> dict[str, Any]:
    config = settings()
    store = run_store()
    todo = list(
        dict.fromkeys(with_redis_retry(lambda: store.paths_without_record(run, paths), "resume check"))
    )
    counts = {"labeled": 0, "failed": 0, "engine_failed": 0}
    if not todo:  # a redelivered job whose images all have records: no engine needed
        return _finish_job(store, job_id, run, paths, len(paths), counts, return_records)
    broken = engine_failure()
    if broken is not None:  # this worker is stopping; do not reload a broken engine
        _hand_back_from_broken_worker(store, run, job_id, broken)
    try:
        service = shared_service()
    except Exception as exc:
        log.critical("cannot load the model, handing job %s back: %s", job_id, exc)
        _hand_back_from_broken_worker(store, run, job_id, f"model failed to load: {exc}")

    sink = _RecordSink()
    deadline = time.monotonic() + config.task_deadline_s

    def flush(records: list[dict[str, Any]]) -> int:
        """Write the records worth keeping; returns how many images were answered."""
        kept = [r for r in records if not is_engine_failure(r)]
        counts["engine_failed"] += len(records) - len(kept)
        if kept:
            with_redis_retry(lambda: store.write_records(run, kept), "writing records")
            note_records(store.client, store.prefix, run, kept)
            failed = sum(1 for r in kept if "error" in r)
            counts["failed"] += failed
            counts["labeled"] += len(kept) - failed
        return len(records)

    submitted = written = 0
    for path in todo:
        if _shutting_down.is_set() or time.monotonic() > deadline:
            break
        try:
            service.submit(path, sink.put)
        except ServiceFailed:
            break
        submitted += 1
        if sink.pending() >= config.flush_records:
            written += flush(sink.take(config.flush_records, 0))
    while written < submitted and time.monotonic() < deadline + config.deadline_grace_s:
        written += flush(sink.take(config.flush_records, 0.25))

    if service.failure is not None:
        reason = f"labeling service gave up: {service.failure}"
        if counts["engine_failed"] or written < len(todo):
            _hand_back_from_broken_worker(store, run, job_id, reason)
        stop_worker(reason)  # this job got all its records first; the worker still stops
    if counts["engine_failed"]:
        reason = f"{counts['engine_failed']} images met an engine failure; the job goes back for them"
        log.warning("job %s: %s", job_id, reason)
        with_redis_retry(lambda: store.note_error(run, job_id, reason), "noting an error")
        raise Reject(reason, requeue=True)
    if written < len(todo):
        if _shutting_down.is_set():
            log.warning(
                "warm shutdown: job %s wrote %d of %d, handing the rest back", job_id, written, len(todo)
            )
            with_redis_retry(lambda: store.uncount_delivery(run, job_id), "uncounting a delivery")
            raise Reject("warm shutdown", requeue=True)
        reason = f"deadline of {config.task_deadline_s:.0f} s passed with {len(todo) - written} images left"
        with_redis_retry(lambda: store.note_error(run, job_id, reason), "noting an error")
        raise Reject(reason, requeue=True)

    return _finish_job(store, job_id, run, paths, len(paths) - len(todo), counts, return_records)


def _finish_job(
    store: RunStore,
    job_id: str,
    run: str,
    paths: list[str],
    skipped: int,
    counts: dict[str, int],
    return_records: bool,
) -> dict[str, Any]:
    """Every path has its record: clear the delivery count and say what the job did."""
    with_redis_retry(lambda: store.finish_job(run, job_id), "finishing a job")
    result: dict[str, Any] = {
        "run": run,
        "job_id": job_id,
        "images": len(paths),
        "skipped": skipped,
        "labeled": counts["labeled"],
        "failed": counts["failed"],
    }
    if return_records:
        result["records"] = with_redis_retry(lambda: store.get_records(run, paths), "reading records")
    return result


def _hand_back_from_broken_worker(store: RunStore, run: str, job_id: str, reason: str) -> NoReturn:
    """Requeue the job without spending a delivery (the worker failed, not the job); stop the worker."""
    with_redis_retry(lambda: store.uncount_delivery(run, job_id), "uncounting a delivery")
    stop_worker(reason)
    raise Reject(reason, requeue=True)
