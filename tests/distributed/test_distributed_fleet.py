"""Whole runs over real `celery worker` subprocesses and a real password-protected redis-server:
two workers sharing a run, SIGKILL and restart, warm shutdown, and a Redis restart mid-run.
Every test ends with the exactly-once check: one record per image, counters equal to the records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from distributed_helpers import QUEUE, run_counts, wait_for, wait_run_done

from worker.cli import main
from worker.client.enqueue import enqueue_paths
from worker.runs.store import RunStore

pytestmark = pytest.mark.slow


def assert_exactly_once(client: redis.Redis, run: str, paths: list[str]) -> dict[str, dict]:
    """Every path has exactly one finished record, and the counters agree with the records."""
    records = {}
    for field, value in client.hscan_iter(f"labeler:run:{run}:records", count=1000):
        assert value, f"{field!r} still has no record"
        record = json.loads(value)
        assert record["path"] == field.decode()
        records[record["path"]] = record
    assert sorted(records) == sorted(set(paths))
    counts = run_counts(client, run)
    assert counts["total"] == counts["done"] == len(set(paths))
    assert counts["failed"] == sum(1 for r in records.values() if "error" in r)
    assert client.llen(f"labeler:run:{run}:dead") == 0
    return records


def test_thousands_of_images_over_two_workers(
    redis_url, start_worker, small_jpegs, tiny_bundle, tmp_path
) -> None:
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
    summary = enqueue_paths(client, "big", paths, QUEUE, chunk_size=100)
    assert summary.jobs == 31
    wait_run_done(client, "big", 300)
    records = assert_exactly_once(client, "big", paths)
    for path, code in bad.items():
        assert records[path]["error"]["code"] == code
    assert all(len(records[p]["labels"]) == 5 for p in small_jpegs)

    # Both workers took part (job results name their worker).
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

    # The CLI reads the same run: status and a Parquet export of every record.
    cli = CliRunner()
    status = cli.invoke(main, ["status", "big", "--broker", redis_url, "--json"])
    assert status.exit_code == 0, status.output
    fields = json.loads(status.output)
    assert (fields["total"], fields["done"], fields["failed"], fields["pending"]) == (3003, 3003, 3, 0)
    out = tmp_path / "big.parquet"
    exported = cli.invoke(main, ["results", "big", "--broker", redis_url, "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 3003


def test_sigkill_mid_run_then_restart_labels_each_image_once(redis_url, start_worker, small_jpegs) -> None:
    paths = small_jpegs[:1500]
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(redis_url, "k1")
    enqueue_paths(client, "killed", paths, QUEUE, chunk_size=50)
    wait_for(lambda: run_counts(client, "killed")["done"] >= 300, 120, "300 records")
    worker.kill()
    at_kill = run_counts(client, "killed")
    assert at_kill["done"] < len(paths)
    assert client.hlen("unacked") > 0  # the dead worker's jobs wait for the visibility timeout
    start_worker(redis_url, "k2")
    wait_run_done(client, "killed", 180)
    assert_exactly_once(client, "killed", paths)
    wait_for(lambda: client.hlen("unacked") == 0, 30, "no unacked jobs")


def test_warm_shutdown_finishes_in_flight_and_hands_back_the_rest(
    redis_url, start_worker, small_jpegs
) -> None:
    paths = small_jpegs[:1200]
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(redis_url, "s1", concurrency=1)
    summary = enqueue_paths(client, "warm", paths, QUEUE, chunk_size=1200)
    assert summary.jobs == 1
    wait_for(lambda: run_counts(client, "warm")["done"] >= 100, 120, "100 records")
    assert worker.terminate(timeout=60) == 0
    assert "warm shutdown: job" in worker.log()
    done = run_counts(client, "warm")["done"]
    assert 100 <= done < len(paths)  # it stopped early: the rest went back, not all 1200 finished
    assert client.llen(QUEUE) == 1 and client.hlen("unacked") == 0  # handed back, not stranded
    assert RunStore(client).client.hvals("labeler:run:warm:deliveries") in ([], [b"0"])
    start_worker(redis_url, "s2")
    wait_run_done(client, "warm", 180)
    assert_exactly_once(client, "warm", paths)


def test_redis_restart_mid_run_workers_reconnect_and_finish(own_redis, start_worker, small_jpegs) -> None:
    paths = small_jpegs[:1500]
    client = own_redis.client()
    worker = start_worker(own_redis.url, "r1")
    enqueue_paths(client, "restart", paths, QUEUE, chunk_size=50)
    wait_for(lambda: run_counts(client, "restart")["done"] >= 200, 120, "200 records")
    own_redis.restart(down_s=2.0)
    client = own_redis.client()
    assert run_counts(client, "restart")["done"] >= 200  # AOF kept the records
    wait_run_done(client, "restart", 240)
    assert_exactly_once(client, "restart", paths)
    log = worker.log()
    assert "Connection to broker lost" in log and worker.alive()
    assert "Redis error during" in log  # jobs in flight retried their writes instead of dropping the chunk


def test_redis_down_longer_than_jobs_retry_hands_jobs_back(own_redis, start_worker, small_jpegs) -> None:
    """Jobs give up on Redis after LABELER_REDIS_RETRY_S; their chunks come back, none is dropped."""
    paths = small_jpegs[:600]
    client = own_redis.client()
    worker = start_worker(own_redis.url, "g1", redis_retry_s=1)
    enqueue_paths(client, "outage", paths, QUEUE, chunk_size=50)
    wait_for(lambda: run_counts(client, "outage")["done"] >= 100, 120, "100 records")
    own_redis.restart(down_s=4.0)
    client = own_redis.client()
    wait_run_done(client, "outage", 240)
    assert_exactly_once(client, "outage", paths)
    assert "handing the job back" in worker.log() and worker.alive()
