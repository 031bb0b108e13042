"""Whole runs over real `celery worker` subprocesses and a real password-protected redis-server:
two workers sharing a run, SIGKILL with the default lease (back within a minute), warm shutdown,
a Redis restart and a longer outage. Every test ends with the exactly-once check: one row per
image in the run's Parquet dataset, the ledger's counts equal to the rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from distributed_helpers import (
    QUEUE,
    assert_exactly_once,
    enqueue,
    run_counts,
    run_output,
    wait_for,
    wait_run_done,
)

from worker.cli import main
from worker.ledger.ledger import RunLedger

pytestmark = pytest.mark.slow


def test_thousands_of_images_over_two_workers(redis_url, start_worker, small_jpegs, tiny_bundle, tmp_path) -> None:
    root = Path(small_jpegs[0]).parents[1]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    roots = ["--allowed-root", str(root), "--allowed-root", str(tmp_path)]
    start_worker(redis_url, "w1", roots)
    start_worker(redis_url, "w2", roots)
    bad = {"/etc/hostname": "outside_allowed_roots", str(root / "missing.jpg"): "not_found",
           str(corrupt): "decode_failed"}  # fmt: skip
    paths = small_jpegs + list(bad)
    client = redis.Redis.from_url(redis_url)
    summary = enqueue(client, "big", paths, shard_size=100)
    assert (summary.shards, summary.jobs, summary.seen) == (31, 31, 3003)
    wait_run_done(client, "big", 300)
    records = assert_exactly_once(client, "big", paths)
    for path, code in bad.items():
        assert records[path]["error"]["code"] == code
    assert all(len(records[p]["labels"]) == 5 for p in small_jpegs)

    # Both workers took part (job results and rows name their worker).
    results = [json.loads(client.get(key)) for key in client.scan_iter("celery-task-meta-*")]
    assert len(results) == 31 and all(r["status"] == "SUCCESS" for r in results)
    assert {r["result"]["worker"].split("@")[0] for r in results} == {"w1", "w2"}

    # Same labels as the local pipeline (same preprocessing and runner code).
    from worker.pipeline.service import LabelingService
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    local = {}
    with LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1)) as service:
        for path in small_jpegs[:40]:
            service.submit(path, lambda rec: local.__setitem__(rec["path"], rec))
        service.drain()
    for path, record in local.items():
        assert [lab["index"] for lab in records[path]["labels"]] == [lab["index"] for lab in record["labels"]]
        assert records[path]["labels"][0]["score"] == pytest.approx(record["labels"][0]["score"], abs=1e-4)

    # The folder reads as one table with no help from us; the CLI reads the same run.
    import duckdb

    labels = f"{run_output('big')}/labels/*.parquet"
    rows, distinct, failed, workers = duckdb.sql(
        f"SELECT count(*), count(DISTINCT path), count(error_code), count(DISTINCT worker) FROM '{labels}'"
    ).fetchall()[0]
    assert (rows, distinct, failed, workers) == (3003, 3003, 3, 2)
    top = duckdb.sql(f"SELECT top1_label, topk_label[1] FROM '{labels}' WHERE error_code IS NULL LIMIT 1").fetchall()[0]
    assert top[0] == top[1]
    cli = CliRunner()
    status = cli.invoke(main, ["status", "big", "--broker", redis_url, "--json"])
    assert status.exit_code == 0, status.output
    fields = json.loads(status.output)
    assert (fields["total"], fields["done"], fields["failed"], fields["pending"]) == (3003, 3003, 3, 0)
    assert (fields["shards"], fields["shards_done"]) == (31, 31)
    out = tmp_path / "big.parquet"
    exported = cli.invoke(main, ["results", "big", "--broker", redis_url, "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 3003
    manifest = json.loads((run_output("big") / "manifest.json").read_text())  # by the last shard's worker
    assert manifest["counts"] == {"rows": 3003, "labeled": 3000, "failed": 3, "bytes": manifest["counts"]["bytes"],
                                  "shards": 31}  # fmt: skip


def test_sigkill_with_default_settings_is_back_within_a_minute(redis_url, start_worker, small_jpegs) -> None:
    """The default lease (30 s), heartbeat and sweep: a SIGKILLed worker's shards are running on the
    other worker within 60 s of the kill, not after Celery's hour-long visibility timeout."""
    defaults = {"lease_s": 30, "heartbeat_s": 10, "sweep_interval_s": 5, "visibility_timeout_s": 3600,
                "task_deadline_s": 1800, "deadline_grace_s": 15}  # fmt: skip
    paths = small_jpegs[:1200]
    client = redis.Redis.from_url(redis_url)
    ledger = RunLedger(client)
    doomed = start_worker(redis_url, "k1", concurrency=2, **defaults)
    enqueue(client, "killed", paths, shard_size=100)
    wait_for(lambda: run_counts(client, "killed")["shards_done"] >= 1, 120, "a first shard done")

    def held_by_k1() -> list[str]:
        return [s.shard_id for s in ledger.shard_states("killed") if s.state == "running" and s.owner.startswith("k1@")]

    wait_for(held_by_k1, 30, "k1 to hold a shard")
    start_worker(redis_url, "k2", concurrency=2, **defaults)
    held = held_by_k1()
    doomed.kill()
    killed_at = time.monotonic()

    def taken_over() -> bool:
        states = {s.shard_id: s for s in ledger.shard_states("killed")}
        return all(states[i].state == "done" or (states[i].owner or "").startswith("k2@") for i in held)

    wait_for(taken_over, 75, "k2 to take over k1's shards")
    recovered_s = time.monotonic() - killed_at
    assert recovered_s < 60, f"took {recovered_s:.0f} s"
    wait_run_done(client, "killed", 240)
    assert_exactly_once(client, "killed", paths)
    assert client.hlen("unacked") > 0  # k1's own messages still wait for the visibility timeout...
    redone = [s for s in ledger.shard_states("killed") if s.shard_id in held]
    assert {s.losses for s in redone} == {1}  # ...redone once
    # k1 held several shards: a lost worker, not evidence against them, so the loss spent no
    # attempt (a shard claimed after k1's last heartbeat still counted it as held alone).
    assert all(s.attempts in (1, 2) for s in redone)
    assert len(held) < 2 or any(s.attempts == 1 for s in redone)


def test_warm_shutdown_finishes_in_flight_and_hands_back_the_rest(redis_url, start_worker, small_jpegs) -> None:
    paths = small_jpegs[:1200]
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(redis_url, "s1", concurrency=1)
    summary = enqueue(client, "warm", paths, shard_size=1200)
    assert summary.jobs == 1
    def labeled_some() -> bool:
        activity = client.hgetall("labeler:run:warm:workers")
        return any(key.endswith(b"|images") and int(value) >= 100 for key, value in activity.items())

    wait_for(labeled_some, 120, "100 images labeled")
    assert worker.terminate(timeout=60) == 0
    assert "handed back: warm shutdown" in worker.log()
    assert run_counts(client, "warm")["done"] == 0  # it stopped early: the shard went back, unwritten
    assert client.llen(QUEUE) == 1 and client.hlen("unacked") == 0  # handed back, not stranded
    state = RunLedger(client).shard_state("warm", "000000")
    assert (state.state, state.attempts) == ("queued", 0)  # a clean handback spends no attempt
    start_worker(redis_url, "s2")
    wait_run_done(client, "warm", 180)
    assert_exactly_once(client, "warm", paths)


def test_redis_restart_mid_run_workers_reconnect_and_finish(own_redis, start_worker, small_jpegs) -> None:
    paths = small_jpegs[:1500]
    client = own_redis.client()
    worker = start_worker(own_redis.url, "r1")
    enqueue(client, "restart", paths, shard_size=50)
    wait_for(lambda: run_counts(client, "restart")["shards_done"] >= 4, 120, "4 shards")
    own_redis.restart(down_s=2.0)
    client = own_redis.client()
    assert run_counts(client, "restart")["shards_done"] >= 4  # AOF kept the ledger
    wait_run_done(client, "restart", 240)
    assert_exactly_once(client, "restart", paths)
    log = worker.log()
    assert "Connection to broker lost" in log and worker.alive()


def test_redis_down_longer_than_jobs_retry_hands_jobs_back(own_redis, start_worker, small_jpegs) -> None:
    """Jobs give up on Redis after LABELER_REDIS_RETRY_S; their shards come back, none is dropped."""
    paths = small_jpegs[:600]
    client = own_redis.client()
    worker = start_worker(own_redis.url, "g1", redis_retry_s=1)
    enqueue(client, "outage", paths, shard_size=50)
    wait_for(lambda: run_counts(client, "outage")["shards_done"] >= 2, 120, "2 shards")
    own_redis.restart(down_s=4.0)
    client = own_redis.client()
    wait_run_done(client, "outage", 240)
    assert_exactly_once(client, "outage", paths)
    assert "handing the job back" in worker.log() and worker.alive()
