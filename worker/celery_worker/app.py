"""The Celery app: `celery -A worker.celery_worker.app worker` (or `-A worker.app`), or `labeler worker`.

Configured from `worker.settings` only. The choices that make "every image labeled exactly once"
hold are here: JSON only (a pickled message is rejected unread), late acks with a prefetch of one,
requeue when a worker is lost, one visibility timeout for broker and result backend, and a threads
pool so every job of a process shares one engine (and no CUDA context ever meets a fork).
"""

from __future__ import annotations

from celery import Celery

from worker.settings import Settings

__all__ = ["app", "create_app"]


def transport_options(settings: Settings) -> dict[str, object]:
    """Broker and result backend must agree: Redis applies the shortest visibility timeout."""
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": settings.restore_throttle,
    }


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("labeler", include=["worker.celery_worker.tasks"])
    return configure(app, settings or Settings.from_env())


def configure(app: Celery, settings: Settings) -> Celery:
    """Apply `settings` to `app` (again, when `labeler worker` flags override the environment)."""
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Celery cannot tell `-P prefork` from its default, so the pool is a setting (LABELER_POOL).
        worker_pool=settings.pool,
        worker_concurrency=settings.concurrency,
        broker_transport_options=transport_options(settings),
        result_backend_transport_options=transport_options(settings),
        result_expires=settings.result_expires_s,
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A lost broker connection must not cancel running jobs: they finish, and if their ack is
        # lost with the connection, the visibility timeout redelivers them and they skip done paths.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_heartbeat=0,
        # Task events, so Flower (and celery-exporter) see workers and jobs; tiny next to the images.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    app.labeler_settings = settings  # type: ignore[attr-defined]
    return app


app = create_app()
