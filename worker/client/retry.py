"""`labeler retry RUN`: label a run's failed images again, after their cause is fixed.

A mount that was down (`not_found`), files restored (`decode_failed`), a shard given up on
(`internal_error`): their rows are final, so enqueueing the run again skips their shards. Retrying
reopens each done shard that has failed images (atomically: back to queued, out of the run's
counts, remembering which codes to retry) and publishes it; its worker relabels only those rows
and rewrites the shard's file with the rest kept, so every image still has exactly one row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import redis

from worker.ledger.ledger import RunLedger
from worker.ledger.protocol import shard_message
from worker.ledger.states import State
from worker.setting_table import default


@dataclass
class RetrySummary:
    run: str
    shards: int = 0
    images: int = 0  # failed images in the reopened shards (of any code: a shard's count is per shard)


def retry_failed(client: redis.Redis, run: str, queue: str, codes: Iterable[str] = (), prefix: str = default("key_prefix"),
                 batch: int = 500) -> RetrySummary:  # fmt: skip
    """Reopen and publish every done shard of `run` with failed images (only those with `codes`,
    if given, are relabeled)."""
    ledger = RunLedger(client, prefix)
    settings = ledger.run_settings(run)
    summary = RetrySummary(run)
    if settings is None:
        return summary
    codes = sorted(set(codes))
    candidates = (state for state in ledger.shard_states(run) if state.state == State.DONE and state.failed)
    while chunk := list(islice(candidates, batch)):
        failed = {state.shard_id: state.failed for state in chunk}
        reopened = ledger.reopen(run, list(failed), codes)
        if reopened:
            client.lpush(queue, *[shard_message(run, shard, settings["output"], queue, origin="labeler-retry")
                                  for shard in reopened])  # fmt: skip
        summary.shards += len(reopened)
        summary.images += sum(failed[shard] for shard in reopened)
    return summary
