"""Everything the run report shows: counts and throughput from the ledger, errors and labels from
one pass over the run's dataset.

The rows are streamed batch by batch (constant memory: only counters are kept), so a report of a
run of millions of images costs one read of its Parquet files, like `labeler results`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from worker.dataset.files import iter_records
from worker.ledger import activity as activity_store
from worker.ledger.activity import WorkerActivity
from worker.ledger.ledger import RunLedger, RunStatus
from worker.records import error_code

MAX_POINTS = 240  # throughput chart resolution; longer runs are put into wider buckets


@dataclass
class ReportData:
    status: RunStatus
    workers: list[WorkerActivity]
    throughput: list[tuple[float, float]]  # (bucket start, images/s)
    bucket_s: int
    errors: Counter[str] = field(default_factory=Counter)  # error code -> images
    top_labels: Counter[str] = field(default_factory=Counter)  # top-1 label -> images
    generated_at: float = field(default_factory=time.time)


def collect_report(store: RunLedger, run: str, queue: str) -> ReportData:
    status = store.status(run, queue)
    buckets = activity_store.timeline(store.client, store.prefix, run)
    throughput, bucket_s = rebucket(buckets, activity_store.BUCKET_S)
    data = ReportData(
        status=status,
        workers=activity_store.worker_activity(store.client, store.prefix, run),
        throughput=throughput,
        bucket_s=bucket_s,
    )
    for record in iter_records(status.output) if status.output else ():
        code = error_code(record)
        if code is not None:
            data.errors[code] += 1
        elif record.get("labels"):
            data.top_labels[str(record["labels"][0].get("label", "?"))] += 1
    return data


def rebucket(
    buckets: list[tuple[int, int]], bucket_s: int, max_points: int = MAX_POINTS
) -> tuple[list[tuple[float, float]], int]:
    """Images per bucket -> images/s over at most `max_points` buckets, idle gaps filled with 0."""
    if not buckets:
        return [], bucket_s
    first, last = buckets[0][0], buckets[-1][0]
    width = bucket_s
    while (last - first) // width + 1 > max_points:
        width *= 2
    counts: dict[int, int] = {}
    for start, images in buckets:
        slot = first + (start - first) // width * width
        counts[slot] = counts.get(slot, 0) + images
    slots = range(first, last + 1, width)
    return [(float(slot), counts.get(slot, 0) / width) for slot in slots], width
