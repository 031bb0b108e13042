"""`celery -A worker.app worker`: the spelling of the docs; the app lives in worker.celery_app."""

from worker.celery_app import app

__all__ = ["app"]
