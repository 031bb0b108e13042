"""Leases against real workers: a slow but living worker keeps its shard however long it takes
(its heartbeat renews the lease), and a frozen worker (SIGSTOP: no heartbeat, no progress, as a
stalled node) loses its shard to another worker; once thawed it learns it lost the lease and
writes nothing, so the shard ends with one file, one row per path, counted once."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from distributed_helpers import assert_exactly_once, enqueue, run_output, wait_for, wait_run_done

from worker.ledger.ledger import RunLedger

pytestmark = pytest.mark.slow

LEASES = {"lease_s": 4, "heartbeat_s": 1, "sweep_interval_s": 0.5, "task_deadline_s": 60, "visibility_timeout_s": 120}
SLOW = {**LEASES, "batch_size": 2, "concurrency": 1, "test_batch_sleep_s": 1.0}


def test_a_slow_living_worker_keeps_its_shard(redis_url, start_worker, small_jpegs) -> None:
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[500:524]  # 12 batches of 2 at >= 1 s each: three times the 4 s lease
    slow = start_worker(redis_url, "slow", ["--include", "slow_gpu"], **SLOW)
    enqueue(client, "slow", paths, shard_size=24)
    wait_for(lambda: RunLedger(client).shard_state("slow", "000000").state == "running", 60, "the shard taken")
    started = time.monotonic()
    start_worker(redis_url, "idle", concurrency=1, **LEASES)
    wait_run_done(client, "slow", 120)
    assert time.monotonic() - started > 2 * SLOW["lease_s"]  # it ran well past its lease...
    assert RunLedger(client).shard_state("slow", "000000").attempts == 1  # ...and was never taken again
    assert {row["worker"] for row in dataset_records_with_worker("slow")} == {f"slow@{os.uname().nodename}"}
    assert_exactly_once(client, "slow", paths)
    assert "lost its worker" not in slow.log()


def test_a_frozen_worker_loses_its_shard_and_its_late_finish_writes_nothing(redis_url, start_worker, small_jpegs):
    client = redis.Redis.from_url(redis_url)
    ledger = RunLedger(client)
    paths = small_jpegs[520:536]
    frozen = start_worker(redis_url, "frozen", ["--include", "slow_gpu"], **SLOW)
    enqueue(client, "frozen", paths, shard_size=16)
    wait_for(lambda: (ledger.shard_state("frozen", "000000").owner or "").startswith("frozen@"), 60, "frozen's shard")
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        start_worker(redis_url, "rescuer", concurrency=1, **LEASES)
        wait_run_done(client, "frozen", 90)
        counts_before = ledger.status("frozen", "q")
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    wait_for(lambda: "lease lost" in frozen.log(), 60, "the thawed worker to learn it lost the lease")
    time.sleep(3)  # let it run to the end of its (abandoned) shard
    assert_exactly_once(client, "frozen", paths)
    after = ledger.status("frozen", "q")
    assert (after.done, after.shards_done) == (counts_before.done, counts_before.shards_done) == (16, 1)
    assert {row["worker"] for row in dataset_records_with_worker("frozen")} == {f"rescuer@{os.uname().nodename}"}
    assert ledger.shard_state("frozen", "000000").attempts == 2 and frozen.alive()


def dataset_records_with_worker(run: str) -> list[dict]:
    """The rows with their `worker` column (the record dicts leave it out)."""
    import pyarrow.dataset as ds

    return ds.dataset(run_output(run) / "labels", format="parquet").to_table(columns=["path", "worker"]).to_pylist()
