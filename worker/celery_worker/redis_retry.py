"""A job's Redis calls ride through a Redis restart or failover, then hand the job back.

acks_late acks a failed task, so a job whose Redis write raised would silently lose its chunk: each
call is retried with backoff for `limit_s`, and past it the job is rejected back to the queue
(its redelivery skips what was written).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from celery.exceptions import Reject

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def with_redis_retry(action: Callable[[], T], what: str, limit_s: float) -> T:
    """`action()`, retried through Redis connection errors for `limit_s`; then requeue the job."""
    limit = time.monotonic() + limit_s
    delay = 0.2
    while True:
        try:
            return action()
        except REDIS_ERRORS as exc:
            if time.monotonic() + delay > limit:
                log.error("Redis unavailable for %s, handing the job back: %s", what, exc)
                raise Reject(f"Redis unavailable: {exc}", requeue=True) from exc
            log.warning("Redis error during %s (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
