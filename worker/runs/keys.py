"""The Redis key schema of a run: every key the labeler keeps, named in one place.

Keys (prefix `P`, default `labeler`; run name `R`):

- `P:runs`              set of run names.
- `P:run:R:records`     hash, image path -> record JSON; "" marks a path that is queued but has no
  record yet. Writes are idempotent: a redelivered job rewrites the same field, so each image has
  exactly one record however often its job runs. HLEN is the run's total.
- `P:run:R:meta`        hash: created_at, done, failed, first_record_at, last_record_at, jobs,
  enqueuing_until (while an enqueue runs: a lease it renews, removed when done). `done`/`failed`
  change only when a field goes from no record to a record (in Lua, atomically), so counters stay
  exact under redelivery.
- `P:run:R:deliveries`  hash, job id -> times delivered; `<job id>:error` -> last error seen.
- `P:run:R:dead`        list of dead-lettered jobs (JSON: job_id, run, paths, deliveries, reason).
- `P:run:R:workers`     hash, `<worker>|images`, `<worker>|failed`, `<worker>|first_at`,
  `<worker>|last_at` (worker = Celery node name): per-worker throughput (runs/activity.py).
- `P:run:R:timeline`    hash, bucket start (epoch seconds) -> images written: the report's chart.

Every key of a run shares `P:run:R:`, so deleting `P:run:R:*` removes the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,199}$")


class RunNameError(ValueError):
    """A run name that cannot be used as part of a Redis key."""


def check_run_name(run: str) -> str:
    if not RUN_NAME.match(run):
        raise RunNameError(
            f"run name {run!r}: use 1-200 letters, digits and _ . : @ + - (starting with a letter or digit)"
        )
    return run


def runs_key(prefix: str) -> str:
    return f"{prefix}:runs"


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run."""

    prefix: str
    run: str

    def _part(self, part: str) -> str:
        return f"{self.prefix}:run:{self.run}:{part}"

    @property
    def records(self) -> str:
        return self._part("records")

    @property
    def meta(self) -> str:
        return self._part("meta")

    @property
    def deliveries(self) -> str:
        return self._part("deliveries")

    @property
    def dead(self) -> str:
        return self._part("dead")

    @property
    def workers(self) -> str:
        return self._part("workers")

    @property
    def timeline(self) -> str:
        return self._part("timeline")
