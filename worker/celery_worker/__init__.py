"""The Celery worker: the app, the thin task, the job, the per-process state, health and metrics."""
