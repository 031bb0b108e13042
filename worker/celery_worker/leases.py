"""Leases of the shards a worker process runs, and the sweep that gives a lost worker's shards back.

Each running shard is held under a lease in Redis (ledger/ledger.py). The keeper's heartbeat thread
renews every lease this process holds each `heartbeat_s`, however slowly its images go, so a
living worker never loses a shard to a second one; a shard whose renewal is refused (its lease
lapsed while this worker was cut off, and another took it) is marked lost, and its job then
writes nothing. Every worker also sweeps: each `sweep_interval_s` it puts shards whose lease ran
out (their worker was SIGKILLed, lost its node, or is cut off from Redis) back at the front of the
queue, so another worker relabels them within `lease_s` + `sweep_interval_s`, not after Celery's
hour-long visibility timeout. Each `reconcile_interval_s` the sweeper also runs the reconciler
(reconcile.py): queued shards whose message was lost are published again, and finished runs
without a manifest get one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from worker.celery_worker.reconcile import Reconciler
from worker.ledger.ledger import RunLedger
from worker.ledger.protocol import shard_message
from worker.setting_table import default

log = logging.getLogger(__name__)


class LeaseKeeper:
    """The leases this process holds: (run, shard) -> owner token."""

    def __init__(self, ledger: Callable[[], RunLedger], lease_s: float, heartbeat_s: float) -> None:
        self._ledger = ledger
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], str] = {}
        self._lost: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def new_owner(worker: str) -> str:
        """A token per claim: a second delivery of a shard to the same process is another owner."""
        return f"{worker}#{uuid.uuid4().hex[:12]}"

    def hold(self, run: str, shard: str, owner: str) -> None:
        with self._lock:
            self._held[(run, shard)] = owner
            self._lost.discard((run, shard))
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
                self._thread.start()

    def drop(self, run: str, shard: str) -> None:
        with self._lock:
            self._held.pop((run, shard), None)
            self._lost.discard((run, shard))

    def count(self) -> int:
        """Shards this process holds now."""
        with self._lock:
            return len(self._held)

    def confirm(self, run: str, shard: str) -> bool:
        """Whether this process still holds the shard's lease, asked of Redis now (and renewed).
        The heartbeat hears of a lost lease only when a renewal gets through: a worker cut off
        from Redis while the sweeper gave its shard to another must ask before it writes the
        shard's file. Raises Redis errors (the job retries)."""
        with self._lock:
            owner = self._held.get((run, shard))
            if owner is None or (run, shard) in self._lost:
                return False
        if self._ledger().renew(run, owner, [shard], self.lease_s, held=self.count()):
            log.warning("run %s: lease lost on shard %s: another worker has it now", run, shard)
            with self._lock:
                self._lost.add((run, shard))
            return False
        return True

    def renew_now(self) -> None:
        """Renew every held lease once (the heartbeat does this each `heartbeat_s`)."""
        with self._lock:
            held = len(self._held)
            by_run: dict[tuple[str, str], list[str]] = {}
            for (run, shard), owner in self._held.items():
                if (run, shard) not in self._lost:
                    by_run.setdefault((run, owner), []).append(shard)
        for (run, owner), shards in by_run.items():
            lost = self._ledger().renew(run, owner, shards, self.lease_s, held=held)
            with self._lock:  # a shard dropped meanwhile was finished by its own job, not lost
                lost = [shard for shard in lost if self._held.get((run, shard)) == owner]
            if lost:
                log.warning("run %s: lease lost on shard(s) %s: another worker has them now", run, ", ".join(lost))
                with self._lock:
                    self._lost.update((run, shard) for shard in lost)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew_now()
            except redis.exceptions.RedisError as exc:  # cut off: the lease may lapse; the job checks
                log.warning("could not renew shard leases: %s", exc)

    def close(self) -> None:
        self._stop.set()


class Sweeper:
    """Requeues lapsed shards of every run and runs the reconciler; one per worker process, all
    racing safely (Lua)."""

    def __init__(self, ledger: Callable[[], RunLedger], queue: str, interval_s: float,
                 reconciler: Reconciler | None = None, reconcile_interval_s: float = default("reconcile_interval_s")) -> None:  # fmt: skip
        self._ledger = ledger
        self.queue = queue
        self.interval_s = interval_s
        self.reconciler = reconciler
        self.reconcile_interval_s = reconcile_interval_s
        self._next_reconcile = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lease-sweeper", daemon=True)
            self._thread.start()

    def sweep_once(self) -> list[tuple[str, str]]:
        """Requeue what has lapsed now; returns the (run, shard) pairs requeued."""
        ledger = self._ledger()
        by_run: dict[str, list[str]] = {}
        for run, shard in ledger.lapsed():
            by_run.setdefault(run, []).append(shard)
        requeued = []
        for run, shards in by_run.items():
            settings = ledger.run_settings(run)
            if settings is None:  # a run deleted by hand: its entries would block the oldest-first scan
                ledger.drop_lease_entries(run, shards)
                ledger.forget_run(run)
                continue
            queue = settings["queue"] or self.queue
            messages = [(shard, shard_message(run, shard, settings["output"], queue, origin="labeler-sweeper"))
                        for shard in shards]  # fmt: skip
            for shard in ledger.requeue_lapsed(run, queue, messages):
                log.warning("run %s: shard %s lost its worker; queued again", run, shard)
                requeued.append((run, shard))
        return requeued

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_once()
                if self.reconciler is not None and time.monotonic() >= self._next_reconcile:
                    self._next_reconcile = time.monotonic() + self.reconcile_interval_s
                    self.reconciler.reconcile_once()
            except redis.exceptions.RedisError as exc:
                log.warning("lease sweep failed: %s", exc)
            except Exception:  # noqa: BLE001 - the sweeper must outlive any one bad run
                log.exception("lease sweep failed")

    def close(self) -> None:
        self._stop.set()
