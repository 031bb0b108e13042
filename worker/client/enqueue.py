"""Publishing a run: paths -> claimed in the run's hash -> chunked jobs, pipelined onto the queue.

Two round trips per `claim_batch` paths, however many jobs that makes: one pipeline claims the
paths (a Lua script marks new ones as queued and says which already have records, so a repeated
enqueue resumes) and reads the queue length; one LPUSH carries every job that filled up. Claiming
before publishing means a crash in between leaves paths marked queued, which the next enqueue of
the run publishes again. Duplicate paths are not tracked in client memory (a million-path run would
need a huge set); a duplicate published twice just rewrites the same record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import redis

from worker.runs.keys import check_run_name
from worker.runs.protocol import job_message
from worker.runs.store import RunStore

CLAIM_SCRIPT_PATHS = 5000  # paths per Lua call (each call blocks Redis for a few milliseconds)
ENQUEUE_LEASE_S = 60.0  # renewed every claim batch and backpressure poll; a killed enqueue lapses


@dataclass
class EnqueueSummary:
    run: str
    seen: int = 0
    skipped: int = 0  # already had a record (resume)
    queued: int = 0
    jobs: int = 0
    waited_s: float = 0.0  # time spent waiting for the queue to drain (backpressure)
    seconds: float = 0.0


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def enqueue_paths(
    client: redis.Redis,
    run: str,
    paths: Iterable[str],
    queue: str,
    chunk_size: int = 500,
    max_queued_jobs: int = 2000,
    prefix: str = "labeler",
    claim_batch: int = 20000,
    on_progress: Callable[[EnqueueSummary], None] | None = None,
    poll_s: float = 0.5,
) -> EnqueueSummary:
    """Publish every path of `paths` that has no record yet in `run`, `chunk_size` paths per job."""
    check_run_name(run)
    store = RunStore(client, prefix)
    store.register_run(run)
    store.renew_enqueue_lease(run, ENQUEUE_LEASE_S)
    try:
        return _enqueue(client, store, run, paths, queue, chunk_size, max_queued_jobs, claim_batch,
                        on_progress, poll_s)  # fmt: skip
    finally:
        store.end_enqueue_lease(run)


def _enqueue(
    client: redis.Redis,
    store: RunStore,
    run: str,
    paths: Iterable[str],
    queue: str,
    chunk_size: int,
    max_queued_jobs: int,
    claim_batch: int,
    on_progress: Callable[[EnqueueSummary], None] | None,
    poll_s: float,
) -> EnqueueSummary:
    summary = EnqueueSummary(run=run)
    started = time.monotonic()
    pending: list[str] = []
    for batch in _batches(paths, claim_batch):
        store.renew_enqueue_lease(run, ENQUEUE_LEASE_S)
        batch = list(dict.fromkeys(batch))
        pipe = client.pipeline(transaction=False)
        for part in _batches(batch, CLAIM_SCRIPT_PATHS):
            store.claim_paths(pipe, run, part)
        pipe.llen(queue)
        *flags, queue_length = pipe.execute()
        claimed = "".join(flag.decode() if isinstance(flag, bytes) else flag for flag in flags)
        summary.skipped += claimed.count("0")
        pending += [path for path, flag in zip(batch, claimed, strict=True) if flag == "1"]
        summary.seen += len(batch)
        full = len(pending) - len(pending) % chunk_size
        if full:
            summary.waited_s += _wait_for_room(
                client, queue, queue_length, max_queued_jobs, poll_s,
                lambda: store.renew_enqueue_lease(run, ENQUEUE_LEASE_S),
            )  # fmt: skip
            _publish(client, store, run, queue, pending[:full], chunk_size, summary)
            pending = pending[full:]
        if on_progress:
            on_progress(summary)
    if pending:
        _publish(client, store, run, queue, pending, chunk_size, summary)
    summary.seconds = time.monotonic() - started
    if on_progress:
        on_progress(summary)
    return summary


def _wait_for_room(
    client: redis.Redis, queue: str, length: int, limit: int, poll_s: float, still_here: Callable[[], None]
) -> float:
    """Backpressure: Redis lists have no size limit, so wait while the queue is over `limit`."""
    waited = 0.0
    while length > limit:
        still_here()
        time.sleep(poll_s)
        waited += poll_s
        length = client.llen(queue)
    return waited


def _publish(
    client: redis.Redis,
    store: RunStore,
    run: str,
    queue: str,
    paths: list[str],
    chunk_size: int,
    summary: EnqueueSummary,
) -> None:
    messages = [job_message(run, chunk, queue)[1] for chunk in _batches(paths, chunk_size)]
    pipe = client.pipeline(transaction=False)
    pipe.lpush(queue, *messages)
    pipe.hincrby(store.keys(run).meta, "jobs", len(messages))
    pipe.execute()
    summary.jobs += len(messages)
    summary.queued += len(paths)
