"""What a Celery worker process reports about itself: Prometheus metrics and per-run activity.

Glue between Celery and worker/metrics.py + worker/activity_store.py, kept out of tasks.py:
the worker's node name comes from Celery's `celeryd_after_setup` signal, the /metrics endpoint
starts when the worker is ready (LABELER_METRICS_PORT; 0 leaves it off), and jobs call
`note_records` after each flush. Metrics live in the worker's main process, so they cover every
job with the `threads` (default) and `solo` pools; prefork children are not counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import redis
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from worker import activity_store
from worker.metrics import WorkerMetrics, default_hostname

log = logging.getLogger(__name__)

_lock = threading.Lock()
_node_name: str | None = None
_metrics: WorkerMetrics | None = None


def node_name() -> str:
    """The Celery node name (`labeler-gpu0@host`), as Flower shows it; host-pid outside Celery."""
    return _node_name or default_hostname()


def process_metrics() -> WorkerMetrics:
    """This process's metrics (one registry per process, created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = WorkerMetrics(node_name())
        return _metrics


def note_records(client: redis.Redis, prefix: str, run: str, records: Sequence[dict[str, Any]]) -> None:
    """Count a flush for per-worker throughput; telemetry never fails a job."""
    try:
        activity_store.note_records(client, prefix, run, node_name(), records)
    except redis.exceptions.RedisError as exc:
        log.warning("could not record worker activity for run %s: %s", run, exc)


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs: object) -> None:
    global _node_name
    _node_name = str(sender)


@worker_ready.connect
def _start_metrics_endpoint(**_kwargs: object) -> None:
    from worker.celery_app import app

    port = app.labeler_settings.metrics_port  # type: ignore[attr-defined]
    if port:
        process_metrics().serve(port)


@worker_shutdown.connect
def _mark_down(**_kwargs: object) -> None:
    if _metrics is not None:
        _metrics.up.labels(_metrics.hostname).set(0)
