"""Which shards have a message that will deliver them: the queue lists, and kombu's `unacked`
hash (messages a worker took and has not acked; a live worker acks or requeues them soon).

Read by the reconciler only, for the few queued shards that have waited long: it costs one LRANGE
of each queue (bounded by the enqueue's backpressure) and one scan of `unacked`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

import redis

from worker.ledger.protocol import SHARD_TASK

UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # delivery tag -> when it was delivered
_PAGE = 1000


def shard_of(envelope: dict) -> tuple[str, str] | None:
    """(run, shard) of a shard job's message (protocol v2 envelope); None for any other message."""
    try:
        if envelope.get("headers", {}).get("task") != SHARD_TASK:
            return None
        body = json.loads(base64.b64decode(envelope["body"]))
        kwargs = body[1]
        return str(kwargs["run"]), str(kwargs["shard"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _decode(raw: bytes | str) -> dict | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def shards_with_messages(client: redis.Redis, queues: Iterable[str], delivered_after: float) -> set[tuple[str, str]]:
    """(run, shard) of every shard job waiting in `queues`, or taken by a worker after
    `delivered_after` and not yet acked (an older unacked message belongs to a worker that is
    gone: Celery restores it only after its visibility timeout)."""
    found: set[tuple[str, str]] = set()
    for queue in set(queues):
        start = 0
        while True:
            page = client.lrange(queue, start, start + _PAGE - 1)
            for raw in page:
                envelope = _decode(raw)
                shard = shard_of(envelope) if envelope else None
                if shard:
                    found.add(shard)
            if len(page) < _PAGE:
                break
            start += _PAGE
    fresh = {tag for tag, _ in client.zrangebyscore(UNACKED_INDEX, delivered_after, "+inf", withscores=True)}
    for tag, raw in client.hscan_iter(UNACKED, count=_PAGE):
        if tag not in fresh:
            continue
        try:
            envelope = json.loads(raw)[0]
        except (ValueError, IndexError, TypeError):
            continue
        shard = shard_of(envelope) if isinstance(envelope, dict) else None
        if shard:
            found.add(shard)
    return found
