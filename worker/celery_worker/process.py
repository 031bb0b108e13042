"""Everything one worker process holds: its settings, Redis ledger, labeling service, metrics,
shard leases and their sweeper, engine health and whether it is stopping.

Celery keeps per-process resources on the Task class; the labeler's task base class owns one
`WorkerProcess`, created when the task module is imported by the main worker process (so prefork
children inherit the main process id their health reports to). Nothing here touches Redis, CUDA or
the model until first use, which happens on the side that infers, after any fork.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from worker.celery_worker.health import EngineHealth
from worker.celery_worker.leases import LeaseKeeper, Sweeper
from worker.celery_worker.metrics import WorkerMetrics, default_hostname
from worker.celery_worker.reconcile import Reconciler
from worker.ledger import activity
from worker.ledger.ledger import RunLedger
from worker.ledger.redis_client import connect
from worker.pipeline.build import ServiceConfig, build_service
from worker.pipeline.reading import ReadPolicy
from worker.pipeline.service import LabelingService
from worker.settings import Settings

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """The worker was started without a bundle to serve."""


class WorkerProcess:
    """One per worker process; every job of the process shares its store and its service."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._lock = threading.Lock()  # the Redis parts: quick to make, never held through a load
        self._service_lock = threading.Lock()  # the engine: its load may take minutes
        self._ledger: RunLedger | None = None
        self._service: LabelingService | None = None
        self._metrics: WorkerMetrics | None = None
        self.health = EngineHealth()
        self.stopping = threading.Event()  # set on warm shutdown: jobs hand back what they have not sent
        self.node_name: str | None = None  # the Celery node name, once the worker has set up
        self._leases: LeaseKeeper | None = None
        self._sweeper: Sweeper | None = None

    @property
    def settings(self) -> Settings:
        return self._app.labeler_settings  # type: ignore[attr-defined]

    @property
    def ledger(self) -> RunLedger:
        """One Redis client (and connection pool) per worker process."""
        with self._lock:
            if self._ledger is None:
                self._ledger = RunLedger(connect(self.settings.broker_url), self.settings.key_prefix)
            return self._ledger

    @property
    def leases(self) -> LeaseKeeper:
        with self._lock:
            if self._leases is None:
                self._leases = LeaseKeeper(lambda: self.ledger, self.settings.lease_s, self.settings.heartbeat_s)
            return self._leases

    @property
    def sweeper(self) -> Sweeper:
        with self._lock:
            if self._sweeper is None:
                settings = self.settings
                reconciler = Reconciler(lambda: self.ledger, settings.queue, settings.orphan_after_s, settings.top_k)
                self._sweeper = Sweeper(lambda: self.ledger, settings.queue, settings.sweep_interval_s, reconciler,
                                        settings.reconcile_interval_s)  # fmt: skip
            return self._sweeper

    @property
    def metrics(self) -> WorkerMetrics:
        with self._lock:
            if self._metrics is None:
                self._metrics = WorkerMetrics(self.node_name or default_hostname())
            return self._metrics

    @property
    def read_policy(self) -> ReadPolicy:
        """Where this worker may read and how much (the service's policy, without loading it):
        container shards are opened on the job's thread with it."""
        config = ServiceConfig.pick(self.settings)
        return ReadPolicy.create(list(config.allowed_roots), config.max_bytes)

    def service(self) -> LabelingService:
        """The process's labeling service, loaded on first use (after any fork, on the worker's side).
        Its own lock: the heartbeat and the sweeper reach the ledger while an engine loads."""
        metrics = self.metrics
        with self._service_lock:
            if self._service is None:
                self._service = self._start_service(metrics)
            return self._service

    def _start_service(self, metrics: WorkerMetrics) -> LabelingService:
        config = self.settings
        if not config.model:
            raise NoModelError(
                "no model bundle to serve: set LABELER_MODEL (or start with `labeler worker`, which "
                "builds the embedded default when --model is not given)"
            )
        service = build_service(Path(config.model), ServiceConfig.pick(config), observer=metrics).start()
        log.warning("labeling service ready: %s (%s)", config.model, service.runner.describe())
        return service

    def note_activity(self, run: str, records: Sequence[dict[str, Any]]) -> None:
        """Count a flush for per-worker throughput; telemetry never fails a job."""
        try:
            ledger = self.ledger
            activity.note_records(ledger.client, ledger.prefix, run, self.worker_name, records)
        except redis.exceptions.RedisError as exc:
            log.warning("could not record worker activity for run %s: %s", run, exc)

    @property
    def worker_name(self) -> str:
        """The Celery node name (`labeler-gpu0@host`), as Flower shows it; host-pid outside Celery."""
        return self.node_name or default_hostname()

    def close(self) -> None:
        """Worker shutdown: stop the service (its images in flight finish first) and mark it down."""
        with self._service_lock:
            service, self._service = self._service, None
        with self._lock:
            for part in (self._leases, self._sweeper):
                if part is not None:
                    part.close()
            self._leases = self._sweeper = None
            if self._metrics is not None:
                self._metrics.up.labels(self._metrics.hostname).set(0)
        if service is not None:
            service.close()
