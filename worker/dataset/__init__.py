"""The run's dataset on storage (local disk or an object store): the fixed shard list, one
Parquet file per shard (docs/dataset.md), the manifest, and the storage they live on.

Storage is the record of what is done: a shard with a complete file needs no labeling, whatever
the ledger says. No Celery and no OpenCV here: a machine that only reads results needs neither.
"""
