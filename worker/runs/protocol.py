"""Celery protocol v2 messages for `labeler.label_chunk`, written without Celery.

The exact bytes a Celery producer would LPUSH onto the queue's Redis list: a JSON envelope whose
`body` is base64 of the JSON `[args, kwargs, embed]`. Building them here lets the client pipeline
thousands of jobs per round trip, and documents the contract other languages follow.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence

from worker.records import compact_json

TASK_NAME = "labeler.label_chunk"  # stable: part of the queue contract
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def job_message(
    run: str,
    paths: Sequence[str],
    queue: str,
    task_id: str | None = None,
    return_records: bool = False,
    origin: str = "labeler-enqueue",
) -> tuple[str, str]:
    """(task id, message JSON) for one job. The task id is also the Celery result id."""
    task_id = task_id or str(uuid.uuid4())
    kwargs: dict[str, object] = {"run": run, "paths": list(paths)}
    if return_records:
        kwargs["return_records"] = True
    body = compact_json([[], kwargs, _EMBED])
    envelope = {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": f"{{'run': {run!r}, 'paths': <{len(paths)} paths>}}",
            "origin": origin,
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return task_id, compact_json(envelope)
