"""The job messages of the queue contract (docs/queue-contract.md), written without Celery.

The exact bytes a Celery producer would LPUSH onto the queue's Redis list (protocol v2): a JSON
envelope whose `body` is base64 of the JSON `[args, kwargs, embed]`. Building them here lets the
client pipeline thousands of jobs per round trip, lets a sweeper requeue a lost shard in the same
Lua step that changes its state, and documents the contract other languages follow.

Two jobs (a task name carries its version: a job whose arguments change gets a new name):

- `labeler.label_shard.v2` `{"run", "shard", "output", "paths"?}`: label one shard of a run into
  the run's dataset (`output/labels/part-<shard>.parquet`); the ledger tracks it. `paths` is for
  services that submit their own shards: the worker stores it as the shard's path list first.
- `labeler.label_paths.v2` `{"paths", "embeddings"?}`: label a few paths and return their records
  in the job's result (`celery-task-meta-<id>`); no run, no dataset, no shared storage.

The first protocol's `labeler.label_chunk` is answered with a clear failure, never dropped.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

from worker.records import compact_json

SHARD_TASK = "labeler.label_shard.v2"
PATHS_TASK = "labeler.label_paths.v2"
RETIRED_TASKS = {"labeler.label_chunk": "protocol 1 (one Redis hash of records per run)"}
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def shard_message(
    run: str,
    shard: str,
    output: str,
    queue: str,
    paths: Sequence[str] | None = None,
    task_id: str | None = None,
    origin: str = "labeler-enqueue",
) -> str:
    """The message of one shard job."""
    kwargs: dict[str, Any] = {"run": run, "shard": shard, "output": output}
    if paths is not None:
        kwargs["paths"] = list(paths)
    return task_message(SHARD_TASK, kwargs, queue, task_id, origin,
                        kwargsrepr=f"{{'run': {run!r}, 'shard': {shard!r}}}")[1]  # fmt: skip


def paths_message(
    paths: Sequence[str], queue: str, embeddings: bool = False, task_id: str | None = None,
    origin: str = "labeler-client",
) -> tuple[str, str]:  # fmt: skip
    """(task id, message) of a job whose records come back in its result."""
    kwargs: dict[str, Any] = {"paths": list(paths)}
    if embeddings:
        kwargs["embeddings"] = True
    return task_message(PATHS_TASK, kwargs, queue, task_id, origin, kwargsrepr=f"{{'paths': <{len(paths)} paths>}}")


def task_message(
    task: str, kwargs: dict[str, Any], queue: str, task_id: str | None, origin: str, kwargsrepr: str
) -> tuple[str, str]:
    """(task id, message JSON) for one job. The task id is also the Celery result id."""
    task_id = task_id or str(uuid.uuid4())
    body = compact_json([[], kwargs, _EMBED])
    envelope = {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
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
            "kwargsrepr": kwargsrepr,
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
