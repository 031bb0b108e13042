"""The one way the labeler opens Redis: from the URL, which carries password, ACL user and TLS.

Timeouts: a connection attempt gives up after 5 s (a partitioned node learns quickly), a reply may
take up to 60 s (a Lua claim of thousands of paths, a Redis busy rewriting its AOF), and an idle
pooled connection is checked before reuse, so a restarted Redis costs one retry, not a stuck job.
"""

from __future__ import annotations

import redis


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=60, health_check_interval=15)
