"""The run's contract in Redis: key schema, stores, the job message protocol and the settings.

No Celery and no OpenCV here: a machine that only enqueues and reads results needs neither.
"""
