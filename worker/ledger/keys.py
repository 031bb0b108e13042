"""The Redis key schema of a run: every key the labeler keeps, named in one place.

Keys (prefix `P`, default `labeler`; run name `R`):

- `P:runs`              set of run names.
- `P:leases`            sorted set, `R|shard` -> when the lease of the worker running it runs out
  (running shards of every run, so one sweep of one key finds the lost ones of the whole fleet).
- `P:queued`            sorted set, `R|shard` -> when the queued shard was last given a message (or
  last seen to have one): the reconciler finds queued shards whose message was lost.
- `P:open`              set of runs without a manifest yet: the reconciler writes a finished run's.
- `P:run:R:meta`        hash: created_at, output (the dataset's folder), shard_size, options (JSON),
  images, shards, done, failed, shards_done, first_record_at, last_record_at, enqueuing_until
  (while an enqueue runs: a lease it renews, removed when done), failed_reason and failed_at (a
  job refused for a reason that holds for the whole run), manifest_at. Counts move only when a shard is
  marked done, in Lua, atomically: exact under redelivery.
- `P:run:R:shards`      hash, shard id -> the shard's state, a small JSON (ledger/ledger.py).
- `P:run:R:dead`        list of shards given up on (JSON: shard, run, reason, at).
- `P:run:R:workers`     hash, `<worker>|images`, `<worker>|failed`, `<worker>|first_at`,
  `<worker>|last_at` (worker = Celery node name): per-worker throughput (ledger/activity.py).
- `P:run:R:timeline`    hash, bucket start (epoch seconds) -> images written: the report's chart.

Every key of a run shares `P:run:R:`, so deleting `P:run:R:*` removes the run; its entries left in
`P:leases`, `P:queued` and `P:open` are dropped by the next sweep that meets them.
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


def leases_key(prefix: str) -> str:
    return f"{prefix}:leases"


def queued_key(prefix: str) -> str:
    return f"{prefix}:queued"


def open_runs_key(prefix: str) -> str:
    return f"{prefix}:open"


def lease_member(run: str, shard: str) -> str:
    return f"{run}|{shard}"  # run names cannot hold "|"


def parse_lease_member(member: str) -> tuple[str, str]:
    run, _, shard = member.rpartition("|")
    return run, shard


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run."""

    prefix: str
    run: str

    def _part(self, part: str) -> str:
        return f"{self.prefix}:run:{self.run}:{part}"

    @property
    def meta(self) -> str:
        return self._part("meta")

    @property
    def shards(self) -> str:
        return self._part("shards")

    @property
    def dead(self) -> str:
        return self._part("dead")

    @property
    def workers(self) -> str:
        return self._part("workers")

    @property
    def timeline(self) -> str:
        return self._part("timeline")
