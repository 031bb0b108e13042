"""One shard job, read top to bottom: take the shard under a lease, label its paths with the
process's shared service, write its Parquet file, mark it done. It ends in exactly one outcome
(celery_worker/outcomes.py, where each becomes ledger and Celery actions):

- Finished: the shard's file is durable and the ledger says done;
- Skipped: the shard is done already, split, held by another living worker (a redelivered or
  duplicated message costs nothing), its run is failed, or its lease was taken over while this
  worker was cut off (lost: it writes nothing);
- HandedBack: its own deadline, a warm shutdown, an engine that failed or would not load
  (`inference_failed` records are never kept: the images are not at fault, and no attempt is spent);
- Split: the shard was taken too often without finishing (it kills workers): its halves are
  queued instead, until the image that kills workers is alone and gets an error row;
- Refused: the job cannot be served; when the reason holds for the whole run (an output outside
  this worker's roots, a missing shard list, embeddings its bundle cannot give) the run is marked
  failed, so the waiting client hears why instead of waiting forever.

Also here: the job that labels a few paths and returns their records in its result (no run).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from celery.exceptions import Reject

from worker.celery_worker.outcomes import (
    BadJob,
    Finished,
    HandedBack,
    Outcome,
    Refused,
    Skipped,
    Split,
    settle,
)
from worker.celery_worker.process import WorkerProcess
from worker.celery_worker.redis_retry import REDIS_ERRORS, with_redis_retry
from worker.dataset.files import (
    DatasetError,
    DatasetSpec,
    check_shard_id,
    iter_records,
    shard_path,
    write_shard,
)
from worker.dataset.object_path import Location, ObjectPath, canonical_output
from worker.dataset.shard_list import (
    ShardListError,
    ShardSource,
    children,
    halves,
    shard_source,
    size_of,
    write_shard_source,
)
from worker.dataset.storage import is_under, is_url, url_is_under
from worker.ledger.keys import check_run_name
from worker.ledger.protocol import shard_message
from worker.ledger.run_manifest import write_manifest_if_finished
from worker.ledger.states import State, Verdict
from worker.pipeline.errors import ImageError
from worker.pipeline.service import LabelingService, ServiceFailed
from worker.records import ErrorCode, Record, error_code, error_record, is_engine_failure, is_error
from worker.settings import output_roots
from worker.sources.container import Container
from worker.sources.item import SourceItem
from worker.sources.items import ShardError, SourceUnavailable, count_container, first_sample, iter_items

log = logging.getLogger(__name__)

T = TypeVar("T")
PATHS_JOB_LIMIT = 1000  # a labels-in-the-result job carries its records back through Redis


def _string(kwargs: dict, name: str) -> str:
    value = kwargs.get(name)
    if not isinstance(value, str) or not value:
        raise BadJob(f"job needs {name!r}, a non-empty string")
    return value


def _paths(value: object, name: str = "paths") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise BadJob(f"job needs {name!r}, a list of non-empty strings")
    return value


class RecordSink:
    """Records of one job, handed from the inference thread to the job's thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Record] = queue.Queue()

    def put(self, record: Record) -> None:
        self._queue.put(record)

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


@dataclass
class Labeled:
    """What `label_with` got through: `read_all` False means the deadline, a warm shutdown or a
    failed engine cut the shard's items short."""

    submitted: int = 0
    answered: int = 0
    read_all: bool = False


def label_with(
    process: WorkerProcess, service: LabelingService, items: Iterable[SourceItem], features: bool,
    on_records: Callable[[list[Record]], None],
) -> Labeled:  # fmt: skip
    """Submit `items` and hand their records to `on_records` in groups as they come."""
    settings = process.settings
    sink = RecordSink()
    deadline = time.monotonic() + settings.task_deadline_s
    done = Labeled()
    try:
        for item in items:
            if process.stopping.is_set() or time.monotonic() > deadline:
                break
            try:
                service.submit(item.path, sink.put, features, data=item.data, error=item.error, source=item.source)
            except ServiceFailed:
                break
            done.submitted += 1
            taken = sink.take(settings.flush_records, 0) if done.submitted % settings.flush_records == 0 else []
            if taken:
                done.answered += len(taken)
                on_records(taken)
        else:
            done.read_all = True
    finally:  # also when reading the source failed: what was submitted is answered first
        while done.answered < done.submitted and time.monotonic() < deadline + settings.deadline_grace_s:
            taken = sink.take(settings.flush_records, 0.25)
            if taken:
                done.answered += len(taken)
                on_records(taken)
    return done


class ShardJob:
    """One delivery of one shard job in one worker process."""

    def __init__(self, process: WorkerProcess, job_id: str, kwargs: dict[str, Any]) -> None:
        self.process = process
        self.settings = process.settings
        self.ledger = process.ledger
        self.job_id = job_id
        self.run = check_run_name(_string(kwargs, "run"))
        try:
            self.shard = check_shard_id(_string(kwargs, "shard"))
        except DatasetError as exc:
            raise BadJob(str(exc)) from None
        self.asked_output = _string(kwargs, "output")
        self.output: Location | str = self.asked_output
        self.given_paths = _paths(kwargs["paths"]) if "paths" in kwargs else None
        self.owner = process.leases.new_owner(process.worker_name)
        self.holds_lease = False
        self.labeled = self.failed = self.engine_failed = 0

    def redis(self, action: Callable[[], T], what: str) -> T:
        return with_redis_retry(action, what, self.settings.redis_retry_s)

    @functools.cached_property
    def run_settings(self) -> dict[str, Any]:
        """The run's options and queue as its first enqueue stored them, read once per job."""
        stored = self.redis(lambda: self.ledger.run_settings(self.run), "reading the run")
        return stored or {"options": {}, "queue": None}

    @property
    def queue(self) -> str:
        return self.run_settings.get("queue") or self.settings.queue

    @property
    def wants_embeddings(self) -> bool:
        """The run asked for embeddings (enqueue --embeddings), or this worker gives them always."""
        return bool(self.run_settings["options"].get("embeddings")) or self.settings.embeddings

    # -- what settle() asks of the job -------------------------------------------------------------

    def release(self, uncount: bool) -> None:
        """Give the shard back now, not after its lease runs out."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.ledger.release(self.run, self.shard, self.owner, uncount=uncount)
        self.holds_lease = False

    def fail_run(self, reason: str) -> None:
        if self.redis(lambda: self.ledger.fail_run(self.run, reason), "failing the run"):
            log.error("run %s failed: %s", self.run, reason)

    def stop_worker(self, reason: str) -> None:
        if not self.process.stopping.is_set():
            self.process.health.stop_worker(reason)

    def result(self, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"run": self.run, "shard": self.shard, "job_id": self.job_id,
                               "file": str(shard_path(self.output, self.shard))}  # fmt: skip
        return out | fields

    # -- the job ----------------------------------------------------------------------------------

    def run_job(self) -> dict[str, Any]:
        """Label the shard and settle how it ended (outcomes.py)."""
        try:
            outcome = self.label()
        except Exception:
            if self.holds_lease:  # back to the queue now, not after the lease (tasks.py requeues)
                self.release(uncount=False)
            raise
        finally:
            self.process.leases.drop(self.run, self.shard)
        return settle(self, outcome)

    def label(self) -> Outcome:
        refusal = self._confine_output()
        if refusal is not None:
            return refusal
        source = self._source()
        if isinstance(source, Refused):
            return source
        # A half of a split shard is split again at its first loss: a shard that kills workers
        # reaches its one bad image in log2(size) more losses, not three times that.
        attempts = self.settings.max_attempts if "." not in self.shard else 1
        held = self.process.leases.count() + 1
        claim = self.redis(lambda: self.ledger.claim(self.run, self.shard, self.owner, self.settings.lease_s,
                                                     attempts, size_of(source), held=held,
                                                     register=self.given_paths is not None), "claiming a shard")  # fmt: skip
        if claim.verdict in (Verdict.DONE, Verdict.SPLIT, Verdict.BUSY, Verdict.RUN_FAILED, Verdict.UNKNOWN):
            return Skipped(claim.verdict.value)
        if claim.verdict == Verdict.EXHAUSTED:
            return self._give_up(source, claim.attempts)
        self.holds_lease = True
        self.process.leases.hold(self.run, self.shard, self.owner)
        return self._label(source, claim.attempts)

    def _confine_output(self) -> Refused | None:
        """The dataset's folder or bucket prefix, only under a root this worker may write
        (LABELER_OUTPUT_ROOTS); a URL with `.`, `..` or empty segments is under none."""
        resolved = canonical_output(self.asked_output)
        roots = output_roots(self.settings)
        if is_url(resolved):
            if url_is_under(resolved, roots):
                self.output = ObjectPath(resolved)
                return None
        elif any(is_under(resolved, root) for root in roots):
            self.output = Path(resolved)
            return None
        return Refused(f"output {self.asked_output!r} is outside the output roots this worker may write "
                       f"({', '.join(roots)}): set LABELER_OUTPUT_ROOTS on the workers to cover it", whole_run=True)  # fmt: skip

    def _source(self) -> ShardSource | Refused:
        if self.given_paths is not None:  # a service's own shard: store its list so it can be recovered
            try:
                shard_source(self.output, self.shard)
            except ShardListError:
                write_shard_source(self.output, self.shard, self.given_paths, chain="")
            return self.given_paths
        try:
            return shard_source(self.output, self.shard)
        except ShardListError as exc:
            return Refused(f"{exc} (is the run's output folder shared with this worker?)", whole_run=True)

    def _label(self, source: ShardSource, attempt: int) -> Outcome:
        state = self.ledger.shard_state(self.run, self.shard)
        records: dict[str, Record] = {}
        seen: list[str] = []  # every sample's path, in source order: the rows the file must hold
        wanted: Callable[[str], bool] = lambda _path: True  # noqa: E731
        if state is not None and state.retry_codes is not None:  # a retry: relabel only those errors
            records = {r["path"]: r for r in iter_records(self.output, shard_ids=[self.shard])}
            codes = set(state.retry_codes)

            def wanted(path: str) -> bool:
                old = records.get(path)
                return old is None or (is_error(old) and (not codes or error_code(old) in codes))

        def todo() -> Iterator[SourceItem]:
            known: set[str] = set()  # a path stored twice in an old list is labeled once
            for item in iter_items(source, self.process.read_policy):
                if item.path in known:
                    continue
                known.add(item.path)
                seen.append(item.path)
                if wanted(item.path):
                    yield item

        features = self.wants_embeddings
        service = self._service(features)
        if not isinstance(service, LabelingService):
            return service
        refusal = self._other_model(service)
        if refusal is not None:
            return refusal
        try:
            done = label_with(self.process, service, todo(), features, lambda taken: self._keep(taken, records))
        except SourceUnavailable as exc:
            return HandedBack(f"cannot read the shard's container to its end: {exc}")
        unfinished = self._unfinished(service, done)
        if unfinished is not None:
            return unfinished
        paths = seen
        if not self.redis(lambda: self.process.leases.confirm(self.run, self.shard), "confirming a shard's lease"):
            log.warning("run %s shard %s: lease lost meanwhile; another worker labels it", self.run, self.shard)
            self.holds_lease = False
            return Skipped("lost")
        spec = self._spec(service)
        written = write_shard(self.output, self.shard, [records[p] for p in paths], spec,
                              worker=self.process.worker_name)  # fmt: skip
        self.process.leases.drop(self.run, self.shard)  # the heartbeat must not renew a shard finishing now
        finished = self.redis(lambda: self.ledger.finish(self.run, self.shard, self.owner, written.labeled,
                                                         written.failed), "finishing a shard")  # fmt: skip
        self.holds_lease = False
        if not finished:
            log.warning("run %s shard %s: finished by another worker too (same rows)", self.run, self.shard)
        self._manifest_if_last(spec)
        return Finished(images=len(paths), labeled=written.labeled, failed=written.failed, attempt=attempt)

    def _manifest_if_last(self, spec: DatasetSpec) -> None:
        """The worker that finishes a run's last shard writes its manifest (the reconciler writes
        it for a run whose last shard finished while nobody could)."""
        try:
            write_manifest_if_finished(self.ledger, self.run, self.queue, spec, self.settings.top_k)
        except DatasetError as exc:  # the rows stay; only the summary file is missing
            log.error("run %s: no manifest written: %s", self.run, exc)

    def _service(self, features: bool) -> LabelingService | Outcome:
        health = self.process.health
        if health.failure is not None:  # this worker is stopping; do not reload a broken engine
            return HandedBack(health.failure, worker_fault=True)
        try:
            service = self.process.service()
        except Exception as exc:
            log.critical("cannot load the model, handing job %s back: %s", self.job_id, exc)
            return HandedBack(f"model failed to load: {exc}", worker_fault=True, stop_worker=True)
        if features and not service.runner.spec.features_output:
            return Refused("the run asks for embeddings but this worker's bundle has no features output "
                           "(serve a bundle built from PyTorch weights, or enqueue without --embeddings)",
                           whole_run=True)  # fmt: skip
        return service

    def _keep(self, taken: list[Record], records: dict[str, Record]) -> None:
        kept = [r for r in taken if not is_engine_failure(r)]
        self.engine_failed += len(taken) - len(kept)
        for record in kept:
            records[record["path"]] = record
        if kept:
            self.process.note_activity(self.run, kept)

    def _unfinished(self, service: LabelingService, done: Labeled) -> Outcome | None:
        """How the job ends when not every image got its record (None: they all did)."""
        answered, wanted = done.answered, done.submitted + (0 if done.read_all else 1)
        if service.failure is not None:
            reason = f"labeling service gave up: {service.failure}"
            if self.engine_failed or answered < wanted:
                return HandedBack(reason, worker_fault=True, stop_worker=True)
            self.stop_worker(reason)  # this shard got all its records; the worker still stops
        if self.engine_failed:  # the engine's fault, not the images': no attempt is spent
            return HandedBack(f"{self.engine_failed} images met an engine failure; the shard goes back for them",
                              worker_fault=True)  # fmt: skip
        if answered < wanted:
            if self.process.stopping.is_set():
                return HandedBack("warm shutdown", worker_fault=True)
            return HandedBack(f"deadline of {self.settings.task_deadline_s:.0f} s passed with {wanted - answered} images left")
        return None

    def _give_up(self, source: ShardSource, attempts: int) -> Outcome:
        """Taken too often without finishing: bisect it, or give its one image an error row."""
        try:
            source = count_container(source, self.process.read_policy) if isinstance(source, Container) else source
        except (ImageError, OSError) as exc:  # cannot even be counted: the container's one row says why
            return self._error_row_claimed(ShardError(source.url, {"source_url": source.url}), attempts, str(exc))
        if size_of(source) > 1:
            first, second = halves(source)
            names = children(self.shard)
            if isinstance(source, Container):  # its halves cannot be derived from an uncounted parent
                for child, half in zip(names, (first, second), strict=True):
                    write_shard_source(self.output, child, half, chain="")
            parts = [(child, size_of(half), shard_message(self.run, child, str(self.output), self.queue, origin="labeler-split"))
                     for child, half in zip(names, (first, second), strict=True)]  # fmt: skip
            split = self.redis(lambda: self.ledger.split(self.run, self.queue, self.shard, parts), "splitting a shard")
            if not split:
                return self._not_split()
            log.error("run %s shard %s taken %d times without finishing: split in two", self.run, self.shard, attempts)
            return Split(attempts)
        return self._error_row_claimed(first_sample(source, self.process.read_policy), attempts)

    def _not_split(self) -> Outcome:
        """The ledger kept the shard whole: it finished, was split, or a living worker took it meanwhile."""
        state = self.redis(lambda: self.ledger.shard_state(self.run, self.shard), "reading a shard")
        verdict = Verdict.UNKNOWN
        if state is not None:
            verdict = {State.DONE: Verdict.DONE, State.SPLIT: Verdict.SPLIT}.get(state.state, Verdict.BUSY)
        log.warning("run %s shard %s: not split (%s)", self.run, self.shard, verdict.value)
        return Skipped(verdict.value)

    def _error_row_claimed(self, sample: ShardError, attempts: int, why: str = "") -> Outcome:
        claim = self.redis(lambda: self.ledger.claim(self.run, self.shard, self.owner, self.settings.lease_s,
                                                     self.settings.max_attempts, 1, force=True), "claiming a shard")  # fmt: skip
        if claim.verdict != Verdict.RUN:
            return Skipped(claim.verdict.value)
        self.holds_lease = True
        self.process.leases.hold(self.run, self.shard, self.owner)  # loading an engine may outlast a lease
        return self._write_error_row(sample, attempts, why)

    def _write_error_row(self, sample: ShardError, attempts: int, why: str = "") -> Outcome:
        path = sample.path
        reason = why or f"its worker was lost or failed {attempts} times labeling this image (it crashes or exhausts the worker)"
        record = error_record(path, ErrorCode.INTERNAL_ERROR, reason) | sample.source
        spec = DatasetSpec(model_sha256="0" * 64, precision=self.settings.precision)
        try:
            service = self.process.service()
            spec = self._spec(service)
        except Exception:  # noqa: BLE001 - the error row needs no engine
            log.exception("no engine to describe the model in the error row of %s", path)
        if not self.redis(lambda: self.process.leases.confirm(self.run, self.shard), "confirming a shard's lease"):
            self.holds_lease = False
            return Skipped("lost")
        write_shard(self.output, self.shard, [record], spec, worker=self.process.worker_name)
        self.process.leases.drop(self.run, self.shard)  # the heartbeat must not renew a shard finishing now
        finished = self.redis(lambda: self.ledger.finish(self.run, self.shard, self.owner, 0, 1), "finishing a shard")
        self.holds_lease = False
        if finished:
            self.redis(lambda: self.ledger.dead_letter(self.run, self.shard, f"{path}: {reason}"), "dead-lettering")
        log.error("run %s shard %s: %s gets an error row: %s", self.run, self.shard, path, reason)
        self._manifest_if_last(spec)
        return Finished(images=1, labeled=0, failed=1, attempt=attempts, gave_up=True)

    def _other_model(self, service: LabelingService) -> Refused | None:
        """A run that built on earlier datasets (enqueue --skip-done-in) left out what they hold
        labeled by one model: a worker serving another would give the chain two models' rows."""
        options = self.run_settings["options"]
        wanted = options.get("model_sha256")
        spec = self._spec(service)
        if not wanted or (spec.model_sha256, spec.precision) == (wanted, options.get("precision")):
            return None
        return Refused(f"run {self.run} builds on datasets labeled by model {wanted[:12]} at {options.get('precision')} "
                       f"(enqueue --skip-done-in); this worker serves {spec.model_sha256[:12]} at {spec.precision}: "
                       "start workers with that bundle and precision, or enqueue a new run", whole_run=True)  # fmt: skip

    def _spec(self, service: LabelingService) -> DatasetSpec:
        runner = service.runner
        dtype = self.run_settings["options"].get("embedding_dtype", "float32")
        return DatasetSpec.for_model(runner.spec, runner.precision, self.wants_embeddings, dtype)


class PathsJob:
    """A few paths labeled for a caller that wants the records back in the job's result."""

    def __init__(self, process: WorkerProcess, kwargs: dict[str, Any]) -> None:
        self.process = process
        self.paths = _paths(kwargs.get("paths"))
        if len(self.paths) > PATHS_JOB_LIMIT:
            raise BadJob(f"a labels-in-the-result job takes at most {PATHS_JOB_LIMIT} paths; use a run for more")
        self.features = bool(kwargs.get("embeddings", False))

    def label(self) -> dict[str, Any]:
        try:
            service = self.process.service()
        except Exception as exc:
            self.process.health.stop_worker(f"model failed to load: {exc}")
            raise Reject(f"model failed to load: {exc}", requeue=True) from exc  # no ledger: no outcome
        if self.features and not service.runner.spec.features_output:
            raise BadJob("embeddings asked for, but this worker's bundle has no features output")
        records: dict[str, Record] = {}
        engine_failed = 0

        def keep(taken: list[Record]) -> None:
            nonlocal engine_failed
            for record in taken:
                if is_engine_failure(record):
                    engine_failed += 1
                else:
                    records[record["path"]] = record

        unique = list(dict.fromkeys(self.paths))
        done = label_with(self.process, service, [SourceItem(path) for path in unique], self.features, keep)
        if service.failure is not None:
            self.process.health.stop_worker(f"labeling service gave up: {service.failure}")
        if engine_failed or done.answered < len(unique):
            raise Reject("the engine failed or the worker is stopping; the job goes back", requeue=True)
        ordered = [records[p] for p in unique]
        return {"images": len(ordered), "labeled": sum(1 for r in ordered if not is_error(r)),
                "failed": sum(1 for r in ordered if is_error(r)), "records": ordered}  # fmt: skip
