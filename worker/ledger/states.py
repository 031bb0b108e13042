"""The ledger's states and verdicts, named once for Python, the Lua scripts and the client.

A shard is `queued` (waiting for a worker: a message will deliver it), `running` (held under a
lease its worker renews), `done` (its Parquet file is durable) or `split` (bisected: its halves
replace it). A run is active until every shard is done, or `failed` when a job was refused for a
reason that holds for the whole run (the reason is in the ledger; enqueuing the run again clears it).

The Lua scripts (lua/*.lua) see these as constants (QUEUED, RUNNING, ...) that scripts.py writes
from the enums below, so a state's spelling lives here only.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where one shard is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SPLIT = "split"


class Verdict(StrEnum):
    """What a claim of a shard answers."""

    RUN = "run"  # taken: the caller holds its lease
    DONE = "done"  # nothing to do: its file is durable
    SPLIT = "split"  # nothing to do: its halves replace it
    BUSY = "busy"  # another living worker holds it (a duplicated or redelivered message)
    EXHAUSTED = "exhausted"  # taken too often without finishing: split it, or give its one image an error row
    RUN_FAILED = "run_failed"  # the run is failed: nothing runs until it is enqueued again
    UNKNOWN = "unknown"  # the ledger has no such shard (a forgotten split half, a deleted run): nothing to do


class Registered(StrEnum):
    """What registering a shard at enqueue found (the caller publishes QUEUED and LAPSED)."""

    QUEUED = "queued"
    LAPSED = "lapsed"  # running on a lease that ran out: its worker was lost
    RUNNING = "running"
    DONE = "done"
    SPLIT = "split"


def lua_constants() -> str:
    """`local QUEUED, RUNNING, ... = 'queued', 'running', ...` for every state and verdict."""
    names = [f"{member.name}" for member in State] + [f"V_{member.name}" for member in Verdict] + ["LAPSED"]
    values = [member.value for member in State] + [member.value for member in Verdict] + [Registered.LAPSED.value]
    return f"local {', '.join(names)} = {', '.join(repr(v) for v in values)}\n"
