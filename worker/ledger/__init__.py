"""The run ledger in Redis: the key schema, shard states and their Lua transitions, the job
messages of the queue contract, and per-worker activity.

No Celery and no OpenCV here: a machine that only enqueues and follows runs needs neither.
"""
