"""`celery -A worker.app worker`: the spelling of the docs; the app lives in worker.celery_worker.app."""

from worker.celery_worker.app import app

__all__ = ["app"]
