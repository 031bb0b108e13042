"""A finished run gets its manifest: written by the worker that finishes its last shard, or by the
reconciler for a run whose last shard finished while nobody could (a re-enqueue held its enqueue
lease, a worker died between its finish and its manifest, Redis lost the write), or by the enqueue that
held the run's enqueue lease when its last shard finished."""

from __future__ import annotations

import logging

from worker.dataset.files import DatasetSpec, shard_files
from worker.dataset.manifest import spec_of_shard_file, write_manifest
from worker.dataset.shard_list import read_index
from worker.delta.lineage import stored_lineage
from worker.ledger.ledger import RunLedger
from worker.ledger.states import State

log = logging.getLogger(__name__)


def write_manifest_if_finished(ledger: RunLedger, run: str, queue: str, spec: DatasetSpec | None,
                               top_k: int | None) -> bool:  # fmt: skip
    """Write the run's manifest if every shard is done and its listing is complete; True if
    written. `spec` None: read the model and columns from one of the run's shard files;
    `top_k` None: not known here (a client)."""
    status = ledger.status(run, queue)
    if status.failed_run or not status.finished(ledger.clock()) or status.output is None:
        return False
    index = read_index(status.output)
    if index is None:  # the listing is not complete: more shards are coming
        return False
    done = [s.shard_id for s in ledger.shard_states(run) if s.state == State.DONE]
    stored = ledger.run_settings(run) or {"options": {}}
    if spec is None:
        files = shard_files(status.output)
        if files:
            spec = spec_of_shard_file(next(iter(files.values())))
        elif stored["options"].get("model_sha256"):  # an incremental run with nothing new: its chain goes on
            spec = DatasetSpec(model_sha256=stored["options"]["model_sha256"], precision=stored["options"]["precision"])
        else:
            return False
    settings = {"shard_size": index["shard_size"], **stored["options"]}
    if top_k is not None:
        settings["top_k"] = top_k
    write_manifest(status.output, run_id=run, shard_ids=done, spec=spec, remove_strays=True, settings=settings,
                   lineage=stored_lineage(status.output))  # fmt: skip
    ledger.mark_manifested(run)
    return True
