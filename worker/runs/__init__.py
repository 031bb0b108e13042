"""The run's contract: the Redis key schema, stores, the job message protocol, the settings, and
the result dataset (one Parquet file per shard, docs/dataset.md).

No Celery and no OpenCV here: a machine that only enqueues and reads results needs neither.
"""
