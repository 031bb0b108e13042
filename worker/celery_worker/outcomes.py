"""How one shard job ends, as one type, and the one place each ending becomes ledger and Celery
actions (`settle`). Helpers return an outcome; none of them raises to say how the job ended.

| outcome     | ledger                                            | Celery                            |
|-------------|---------------------------------------------------|-----------------------------------|
| Finished    | shard done (written before: file, then finish)    | success, acked                    |
| Skipped     | nothing (done, split, busy, run failed, lease lost)| success, acked                   |
| Split       | halves queued in its place (written before)       | success, acked                    |
| HandedBack  | lease released (a worker's fault spends no attempt)| Reject(requeue): back to the queue|
| Refused     | whole run: lease released, run marked failed      | failure, acked (the reason is read by the client) |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from celery.exceptions import Reject

from worker.ledger.states import Verdict

log = logging.getLogger(__name__)


class BadJob(ValueError):
    """A job this worker must refuse outright (requeueing it would only fail again)."""


@dataclass(frozen=True)
class Finished:
    images: int
    labeled: int
    failed: int
    attempt: int
    gave_up: bool = False  # its one image got an error row after it kept killing workers


@dataclass(frozen=True)
class Skipped:
    why: str  # done, split, busy, run_failed, lost


@dataclass(frozen=True)
class Split:
    attempts: int


@dataclass(frozen=True)
class HandedBack:
    reason: str
    worker_fault: bool = False  # the worker failed, not the shard: no attempt is spent
    stop_worker: bool = False  # the engine is broken: stop this worker so its supervisor restarts it


@dataclass(frozen=True)
class Refused:
    reason: str
    whole_run: bool  # true: the same refusal would meet every shard of the run (mark it failed)


Outcome = Finished | Skipped | Split | HandedBack | Refused


class SettlingJob(Protocol):
    """What `settle` needs of the job."""

    run: str
    shard: str
    holds_lease: bool

    def release(self, uncount: bool) -> None: ...
    def fail_run(self, reason: str) -> None: ...
    def stop_worker(self, reason: str) -> None: ...
    def result(self, **fields: Any) -> dict[str, Any]: ...


def settle(job: SettlingJob, outcome: Outcome) -> dict[str, Any]:
    """Apply `outcome` to the ledger, and return the job's result or raise what Celery needs."""
    match outcome:
        case Finished(images=images, labeled=labeled, failed=failed, attempt=attempt):
            return job.result(images=images, labeled=labeled, failed=failed, attempt=attempt)
        case Skipped(why=why):
            return job.result(skipped=why)
        case Split():
            return job.result(skipped=Verdict.SPLIT.value)
        case HandedBack(reason=reason, worker_fault=worker_fault, stop_worker=stop):
            log.warning("run %s shard %s handed back: %s", job.run, job.shard, reason)
            if job.holds_lease:
                job.release(uncount=worker_fault)
            if stop:
                job.stop_worker(reason)
            raise Reject(reason, requeue=True)
        case Refused(reason=reason, whole_run=whole_run):
            log.error("run %s shard %s refused%s: %s", job.run, job.shard, " (the run fails)" if whole_run else "", reason)
            if job.holds_lease:
                job.release(uncount=True)
            if whole_run:
                job.fail_run(reason)
            raise BadJob(reason)
    raise TypeError(f"not an outcome: {outcome!r}")
