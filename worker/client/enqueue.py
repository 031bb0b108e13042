"""Publishing a run: inputs -> a fixed shard list stored with the run's output -> one job per shard.

Paths are streamed: each shard's path list is written (atomically) to `OUTPUT/shards/` as soon as
it fills, then registered in the ledger and published, so memory holds one shard, whatever the
run's size. Redis holds a few bytes per shard, and the queue at most `max_queued_jobs` shards
(backpressure). Enqueueing a run again uses its stored list and publishes only shards that are not
done (or whose worker was lost); an interrupted enqueue resumes its listing where it stopped.

Storage is the record of what is done: a shard the ledger does not know (a new or wiped Redis)
whose Parquet file already holds one row per image is registered done, its counts read from the
file's footer, and not labeled again. Enqueueing a failed run clears its failure. A run whose last
shard finished while this enqueue held its lease gets its manifest here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import redis

from worker.dataset.files import shard_files
from worker.dataset.manifest import file_counts
from worker.dataset.object_path import as_location, canonical_output
from worker.dataset.schema import DatasetError
from worker.dataset.shard_list import CutShard, cut_shards
from worker.delta.counts import DeltaCounts
from worker.delta.lineage import EarlierDataset
from worker.delta.skip import delta_entries
from worker.ledger.keys import check_run_name
from worker.ledger.ledger import RunLedger
from worker.ledger.protocol import shard_message
from worker.ledger.run_manifest import write_manifest_if_finished
from worker.ledger.states import Registered
from worker.setting_table import default
from worker.sources.container import Container

ENQUEUE_LEASE_S = 60.0  # renewed every batch and backpressure poll; a killed enqueue lapses
PUBLISH_BATCH = 16  # shards per ledger round trip (80k paths at the default size: workers start early)


class EnqueueError(ValueError):
    """The run exists with other settings than this enqueue asks for."""


@dataclass
class EnqueueSummary:
    run: str
    output: str = ""
    seen: int = 0  # images in the run's shard list (where known: a container is counted when read)
    containers: int = 0  # shards that are a tar or Parquet file (or a range of one)
    shards: int = 0
    queued: int = 0  # images published now
    jobs: int = 0  # shards published now
    skipped: int = 0  # images of shards already done (or running on a living worker)
    from_storage: int = 0  # images of shards the ledger did not know, done according to their files
    waited_s: float = 0.0  # time spent waiting for the queue to drain (backpressure)
    seconds: float = 0.0
    reused_list: bool = False  # the stored shard list was used (an enqueue of this run before)
    states: dict[str, int] = field(default_factory=dict)
    delta: DeltaCounts = field(default_factory=DeltaCounts)  # what --skip-done-in left out


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def enqueue_run(
    client: redis.Redis,
    run: str,
    paths: Iterable[str | Container],
    output: str,
    queue: str,
    shard_size: int = default("shard_size"),
    max_queued_jobs: int = default("max_queued_jobs"),
    prefix: str = default("key_prefix"),
    options: dict | None = None,
    on_progress: Callable[[EnqueueSummary], None] | None = None,
    poll_s: float = 0.5,
    skip_done_in: list[EarlierDataset] | None = None,
    skip_failed: bool = False,
) -> EnqueueSummary:
    """Cut `paths` (loose paths and containers) into the run's shards (or reuse its stored list) and
    publish those not done. A container's samples are counted when a worker reads it.

    `skip_done_in`: earlier datasets (worker/delta/); what they hold labeled by the model the run's
    options name (`model_sha256`, `precision`: workers serving another refuse the run) from the
    same source version is left out of the shard list."""
    check_run_name(run)
    ledger = RunLedger(client, prefix)
    output = canonical_output(output)
    stored = ledger.create_run(run, output, shard_size, options or {}, queue)
    if stored["output"] != output:
        raise EnqueueError(f"run {run} writes into {stored['output']}, not {output}: drop --output to resume it")
    shard_size = int(stored["shard_size"])
    summary = EnqueueSummary(run=run, output=output)
    paths, _chain = delta_entries(as_location(output), paths, skip_done_in, skip_failed,
                                  lambda: _delta_model(run, stored["options"]), summary.delta)  # fmt: skip
    started = time.monotonic()
    ledger.renew_enqueue_lease(run, ENQUEUE_LEASE_S)
    written = shard_files(output)
    try:
        for batch in _batches(cut_shards(as_location(output), paths, shard_size), PUBLISH_BATCH):
            ledger.renew_enqueue_lease(run, ENQUEUE_LEASE_S)
            summary.reused_list = summary.reused_list or all(shard.stored for shard in batch)
            on_storage = _done_on_storage(ledger, run, batch, written)
            states = ledger.register_shards(run, [(shard.shard_id, shard.size) for shard in batch], on_storage)
            publish = []
            for shard, state in zip(batch, states, strict=True):
                summary.seen += shard.size
                summary.containers += isinstance(shard.source, Container)
                summary.shards += 1
                summary.states[state] = summary.states.get(state, 0) + 1
                if state in (Registered.QUEUED, Registered.LAPSED):
                    publish.append(shard)
                else:
                    summary.skipped += shard.size
                    if shard.shard_id in on_storage and state == Registered.DONE:
                        summary.from_storage += shard.size
            if publish:
                summary.waited_s += _wait_for_room(
                    client, queue, max_queued_jobs, poll_s, lambda: ledger.renew_enqueue_lease(run, ENQUEUE_LEASE_S)
                )
                messages = [shard_message(run, shard.shard_id, output, queue) for shard in publish]
                client.lpush(queue, *messages)
                summary.jobs += len(messages)
                summary.queued += sum(shard.size for shard in publish)
            if on_progress:
                on_progress(summary)
    finally:
        ledger.end_enqueue_lease(run)
    # Its last shard may have finished while this enqueue held the lease, when no worker would
    # write the manifest; if this fails, the workers' reconciler writes it.
    with contextlib.suppress(DatasetError, OSError):
        write_manifest_if_finished(ledger, run, queue, None, None)
    summary.seconds = time.monotonic() - started
    if on_progress:
        on_progress(summary)
    return summary


def _delta_model(run: str, options_json: str) -> tuple[str, str]:
    """The (checksum, precision) whose earlier rows count as done: the run's, as first enqueued."""
    options = json.loads(options_json)
    if not options.get("model_sha256") or not options.get("precision"):
        raise EnqueueError(f"run {run} builds on earlier datasets but names no model: enqueue it with --model or "
                           "--skip-done-in (whose manifest names one)")  # fmt: skip
    return str(options["model_sha256"]), str(options["precision"])


def _done_on_storage(ledger: RunLedger, run: str, batch: list[CutShard], written: dict) -> dict[str, tuple[int, int]]:
    """(rows, failed) of the batch's shards that the ledger does not know and that have a file
    on storage (footers only; a damaged file is relabeled)."""
    unknown = [shard for shard, known in zip(batch, ledger.known_shards(run, [s.shard_id for s in batch]), strict=True)
               if not known and shard.shard_id in written]  # fmt: skip
    found = {}
    for shard in unknown:
        try:
            found[shard.shard_id] = file_counts(written[shard.shard_id])
        except (DatasetError, OSError, ValueError):
            continue
    return found


def _wait_for_room(client: redis.Redis, queue: str, limit: int, poll_s: float, still_here: Callable[[], None]) -> float:
    """Backpressure: Redis lists have no size limit, so wait while the queue is over `limit`."""
    waited = 0.0
    while client.llen(queue) > limit:
        still_here()
        time.sleep(poll_s)
        waited += poll_s
    return waited
