"""Who labeled how much of a run, and when: per-worker throughput and the report's timeline.

Records carry no timestamps and the run's meta hash only counts totals, so workers add, with each
flush of records (one extra round trip per `LABELER_FLUSH_RECORDS` records), to the run's
`workers` and `timeline` hashes (ledger/keys.py). These count work done, so a job redelivered after
a crash counts its rewritten records again; the run's own `done`/`failed` stay exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.ledger.keys import RunKeys
from worker.records import is_error

BUCKET_S = 10


@dataclass(frozen=True)
class WorkerActivity:
    worker: str
    images: int
    failed: int
    first_at: float
    last_at: float

    @property
    def rate(self) -> float:
        """Images per second over the span this worker wrote records for the run."""
        span = self.last_at - self.first_at
        return self.images / span if span > 0 else 0.0


def note_records(
    client: redis.Redis,
    prefix: str,
    run: str,
    worker: str,
    records: Sequence[dict[str, Any]],
    now: float | None = None,
) -> None:
    """Count one flush of `records` for `worker` (one pipelined round trip)."""
    if not records:
        return
    now = time.time() if now is None else now
    failed = sum(1 for record in records if is_error(record))
    keys = RunKeys(prefix, run)
    workers, timeline = keys.workers, keys.timeline
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(workers, f"{worker}|images", len(records))
    if failed:
        pipe.hincrby(workers, f"{worker}|failed", failed)
    pipe.hsetnx(workers, f"{worker}|first_at", repr(now))
    pipe.hset(workers, f"{worker}|last_at", repr(now))
    pipe.hincrby(timeline, str(int(now // BUCKET_S * BUCKET_S)), len(records))
    pipe.execute()


def worker_activity(client: redis.Redis, prefix: str, run: str) -> list[WorkerActivity]:
    """Every worker that wrote records for `run`, busiest first."""
    fields: dict[str, dict[str, str]] = {}
    for key, value in client.hgetall(RunKeys(prefix, run).workers).items():
        worker, _, name = key.decode().rpartition("|")
        fields.setdefault(worker, {})[name] = value.decode()
    out = [
        WorkerActivity(
            worker=worker,
            images=int(values.get("images", 0)),
            failed=int(values.get("failed", 0)),
            first_at=float(values.get("first_at", 0.0)),
            last_at=float(values.get("last_at", 0.0)),
        )
        for worker, values in fields.items()
    ]
    return sorted(out, key=lambda item: (-item.images, item.worker))


def timeline(client: redis.Redis, prefix: str, run: str) -> list[tuple[int, int]]:
    """(bucket start, images) pairs in time order; buckets with no records are absent."""
    items = client.hgetall(RunKeys(prefix, run).timeline)
    return sorted((int(k), int(v)) for k, v in items.items())


def format_workers(workers: Sequence[WorkerActivity], now: float | None = None) -> list[str]:
    """Lines for `labeler status`: one per worker, busiest first."""
    if not workers:
        return []
    now = time.time() if now is None else now
    width = max(len(w.worker) for w in workers)
    lines = [f"  workers ({len(workers)}):"]
    for w in workers:
        ago = max(0.0, now - w.last_at)
        lines.append(
            f"    {w.worker:<{width}}  {w.images} images  {w.failed} failed  {w.rate:.1f} images/s  "
            f"last record {ago:.0f} s ago"
        )
    return lines
