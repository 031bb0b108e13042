"""The reconciler: finds what no other step will, so every run ends.

- A queued shard whose message is gone (Redis lost its last second of writes, a failover to a
  replica that missed them, a message taken by a worker that died before claiming it) is given a
  new message. A duplicate is harmless: a claim skips a shard that is done or held.
- A finished run without a manifest gets one.
- Entries of runs deleted by hand (their keys gone) are dropped from the fleet-wide sets.

Every worker's sweeper runs it each `reconcile_interval_s`; they race safely (Lua, idempotent
files).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.dataset.schema import DatasetError
from worker.ledger.ledger import RunLedger
from worker.ledger.messages import shards_with_messages
from worker.ledger.protocol import shard_message
from worker.ledger.run_manifest import write_manifest_if_finished

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    republished: list[tuple[str, str]] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)  # runs deleted by hand


class Reconciler:
    def __init__(self, ledger: Callable[[], RunLedger], default_queue: str, orphan_after_s: float, top_k: int) -> None:
        self._ledger = ledger
        self.default_queue = default_queue
        self.orphan_after_s = orphan_after_s
        self.top_k = top_k

    def reconcile_once(self) -> Reconciled:
        ledger = self._ledger()
        done = Reconciled()
        self._republish_orphans(ledger, done)
        self._write_missing_manifests(ledger, done)
        return done

    def _republish_orphans(self, ledger: RunLedger, done: Reconciled) -> None:
        candidates: dict[str, list[str]] = {}
        for run, shard in ledger.queued_since(self.orphan_after_s):
            candidates.setdefault(run, []).append(shard)
        if not candidates:
            return
        runs = {}
        for run, shards in candidates.items():
            settings = ledger.run_settings(run)
            if settings is None:  # deleted by hand
                ledger.drop_lease_entries(run, shards)
                ledger.forget_run(run)
                done.forgotten.append(run)
                continue
            status = ledger.status(run, settings["queue"] or self.default_queue)
            if status.failed_run or status.enqueuing(ledger.clock()):  # waits for a person, or the enqueue publishes
                continue
            runs[run] = settings
        if not runs:
            return
        queues = [settings["queue"] or self.default_queue for settings in runs.values()]
        present = shards_with_messages(ledger.client, queues, ledger.clock() - self.orphan_after_s)
        for run, settings in runs.items():
            queue = settings["queue"] or self.default_queue
            shards = candidates[run]
            ledger.seen_with_message(run, [s for s in shards if (run, s) in present])
            missing = [s for s in shards if (run, s) not in present]
            messages = [(s, shard_message(run, s, settings["output"], queue, origin="labeler-reconciler")) for s in missing]
            for shard in ledger.republish(run, queue, messages):
                log.warning("run %s: shard %s was queued without a message; published again", run, shard)
                done.republished.append((run, shard))

    def _write_missing_manifests(self, ledger: RunLedger, done: Reconciled) -> None:
        for run in ledger.runs_without_manifest():
            settings = ledger.run_settings(run)
            if settings is None:
                ledger.forget_run(run)
                done.forgotten.append(run)
                continue
            try:
                if write_manifest_if_finished(ledger, run, settings["queue"] or self.default_queue, None, self.top_k):
                    log.warning("run %s: finished without a manifest; written now", run)
                    done.manifests.append(run)
            except (DatasetError, OSError) as exc:
                log.error("run %s: no manifest written: %s", run, exc)
