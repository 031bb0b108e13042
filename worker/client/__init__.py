"""Client side of the distributed labeler: publish jobs, follow a run, export its records.

Needs only redis-py (no Celery): jobs are written as Celery protocol-v2 messages directly, which
is also what the queue contract (docs/queue-contract.md) tells other services to do.
"""
