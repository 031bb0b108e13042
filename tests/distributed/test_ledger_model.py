"""The ledger's model-based test (issue 18): random interleavings of claims, heartbeats, lapses,
sweeps, finishes, hand-backs, give-ups, splits, retries, re-enqueues, worker deaths, Redis
restarts and lost last writes against a real redis-server and real files, checked after every
step and drained at the end (tests/distributed/ledger_model.py says what is checked).

Bounded for CI: 25 examples of up to 30 steps, the same ones every run (derandomized);
bench/bench_ledger_model.py runs the same machine longer, at random. Below it, the sequences
that broke an invariant before the ledger was fixed, replayed step by step as Hypothesis prints
them: a claim registered a half whose split Redis forgot (claim.lua now registers only a
service's own shard), and a retry left a manifested run out of the reconciler's sight (reopen now
puts it back among the runs without a manifest).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed_helpers import RedisServer
from hypothesis.stateful import run_state_machine_as_test
from ledger_model import ci_settings, machine_for, replay

TAKE = ("deliver", {"pick": 0, "fate": 0})  # worker w0 takes the next message


@pytest.fixture(scope="module")
def model_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A private server: the machine restarts it and swaps its AOF directory."""
    server = RedisServer(tmp_path_factory.mktemp("model-redis")).start()
    yield server
    server.stop()


def test_the_ledger_keeps_every_image_once_under_any_interleaving(
    model_redis: RedisServer, tmp_path: Path
) -> None:
    run_state_machine_as_test(machine_for(model_redis, tmp_path), settings=ci_settings())


def test_a_half_whose_split_was_lost_is_not_registered_beside_its_parent(
    model_redis: RedisServer, tmp_path: Path
) -> None:
    """Shard 000000 (2 images, 1 attempt) is handed back and exhausted; it is split after a
    checkpoint and w0 takes the message of its half 000000.1; Redis then loses the split (and
    the message in the queue), but w0 still holds its copy. Its claim registers 000000.1 as a
    new shard while 000000 is queued again: the run counts 6 images of 5, and two shards hold
    the same image (left alone, the run is stuck at 5/6 after the parent is split again; had
    the parent an attempt left, that image would get two rows in the manifest's files)."""
    replay(machine_for(model_redis, tmp_path)(), [
        TAKE, ("claim", {"pick": 0}), ("hand_back", {"pick": 0, "uncount": False}),
        TAKE, TAKE, TAKE, ("claim", {"pick": 2}),  # exhausted
        ("checkpoint", {}), ("give_up", {"pick": 0}),  # split in two, at the front of the queue
        TAKE,  # w0 takes 000000.1
        ("lose_last_writes", {}),  # the split and the delivery are forgotten
        ("claim", {"pick": 2}),  # registers 000000.1 beside its parent
    ])  # fmt: skip


def test_a_retried_run_gets_its_manifest_again_when_its_finisher_dies(
    model_redis: RedisServer, tmp_path: Path
) -> None:
    """The run finishes with one error row and gets its manifest; `labeler retry` reopens the
    shard, a worker relabels it without error and marks it done, then dies before the
    manifest step. The run is finished, but the reconciler never looks at it again (it left
    `P:open` with its first manifest and the retry did not put it back): the manifest says
    1 failed, the file 0, for good."""
    replay(machine_for(model_redis, tmp_path)(), [
        TAKE, TAKE, TAKE, ("claim", {"pick": 0}), ("claim", {"pick": 0}), ("claim", {"pick": 0}),
        ("write_file", {"pick": 0, "errors": True}), ("write_file", {"pick": 0, "errors": False}),
        ("write_file", {"pick": 0, "errors": False}),
        ("finish", {"pick": 0, "fate": 0}), ("finish", {"pick": 0, "fate": 0}),
        ("finish", {"pick": 0, "fate": 0}),  # the run is finished: its manifest is written
        ("retry", {"run": "ra", "codes": ()}), TAKE, ("claim", {"pick": 0}),
        ("write_file", {"pick": 0, "errors": False}),
        ("finish", {"pick": 0, "fate": 3}),  # done, and the worker dies before the manifest step
    ])  # fmt: skip
