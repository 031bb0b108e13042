"""`labeler retry RUN`: label a run's failed images again, after their cause is fixed.

A mount that was down (`not_found`), files restored (`decode_failed`), a dead-lettered job
(`internal_error`): their records are final, so enqueueing the run again skips them. Retrying
reopens each such record atomically (back to the queued placeholder, out of the done and failed
counts; a record rewritten meanwhile is left alone) and publishes the paths through the normal
enqueue, so every image still ends with exactly one record and the counts stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import redis

from worker.client.enqueue import EnqueueSummary, enqueue_paths
from worker.runs.store import RunStore


def retry_failed(
    client: redis.Redis,
    run: str,
    queue: str,
    codes: Iterable[str] = (),
    chunk_size: int = 500,
    max_queued_jobs: int = 2000,
    prefix: str = "labeler",
) -> EnqueueSummary:
    """Reopen and publish every failed image of `run` (only those with `codes`, if given)."""
    reopened = chain.from_iterable(RunStore(client, prefix).iter_failed(run, frozenset(codes)))
    return enqueue_paths(client, run, reopened, queue, chunk_size, max_queued_jobs, prefix)
