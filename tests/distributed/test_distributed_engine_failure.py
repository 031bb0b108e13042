"""A worker whose engine breaks mid-run (FAKE GPU fault: tests/distributed/faulty_gpu.py) must not
turn the rest of the run into `inference_failed` records. It hands its jobs back without spending
their deliveries, stops itself with exit status 70 so a supervisor restarts it, and a healthy
worker then labels every image exactly once. Real redis-server and real Celery workers."""

from __future__ import annotations

import json
import re

import pytest
import redis
from distributed_helpers import QUEUE, run_counts, wait_for, wait_run_done

from worker.celery_worker.health import EXIT_ENGINE_BROKEN
from worker.client.enqueue import enqueue_paths

pytestmark = pytest.mark.slow


def test_fake_gpu_fault_stops_the_worker_and_hands_the_jobs_back(redis_url, start_worker, small_jpegs):
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[:96]
    broken = start_worker(
        redis_url, "broken", ["--include", "faulty_gpu"], batch_size=8, concurrency=2, test_good_batches=2
    )
    enqueue_paths(client, "gpu-lost", paths, QUEUE, chunk_size=24)

    status = wait_for(lambda: broken.process.poll(), 90, "the broken worker to stop itself")
    log = broken.log()
    assert status == EXIT_ENGINE_BROKEN, log[-3000:]
    assert "labeling service gives up: 3 batches in a row failed" in log
    assert "stopping this worker, its engine is broken" in log

    kept = [json.loads(v) for v in client.hvals("labeler:run:gpu-lost:records") if v]
    assert not [r for r in kept if "error" in r], "an engine failure must not become an image's record"
    assert len(kept) <= 2 * 8  # at most the two good batches were labeled before the fault

    start_worker(redis_url, "healthy", batch_size=8)
    wait_run_done(client, "gpu-lost", 120)
    records = [json.loads(v) for v in client.hvals("labeler:run:gpu-lost:records")]
    assert sorted(r["path"] for r in records) == sorted(paths)
    assert all("labels" in r for r in records)
    assert run_counts(client, "gpu-lost") == {"total": 96, "done": 96, "failed": 0}
    assert client.llen("labeler:run:gpu-lost:dead") == 0  # the worker's fault spent no deliveries


@pytest.mark.parametrize(("pool", "expected_status"), [("threads", EXIT_ENGINE_BROKEN), ("prefork", 0)])
def test_a_worker_whose_model_cannot_load_stops_and_leaves_the_job_queued(
    redis_url, start_worker, small_jpegs, tiny_bundle, tmp_path, pool, expected_status
):
    """A bundle corrupted after the start check (checksum mismatch at load): the first job goes back
    untouched, without a delivery spent, and the worker stops instead of spinning on the queue
    (status 70; with prefork the pool child stops the main process, which exits 0)."""
    import shutil

    corrupted = tmp_path / "corrupted"
    shutil.copytree(tiny_bundle, corrupted)
    with open(corrupted / "model.onnx", "ab") as model:
        model.write(b"\0")
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[200:210]
    broken = start_worker(redis_url, "cannot-load", ["--pool", pool], model=corrupted)
    enqueue_paths(client, "bad-bundle", paths, QUEUE, chunk_size=10)

    wait_for(lambda: broken.process.poll() is not None, 90, "the worker to stop itself")
    status = broken.process.returncode
    assert status == expected_status, broken.log()[-3000:]
    assert "does not match the checksum" in broken.log()
    assert not [v for v in client.hvals("labeler:run:bad-bundle:records") if v]
    deliveries = client.hgetall("labeler:run:bad-bundle:deliveries")
    assert list(deliveries.values()) == [b"0"]  # one job, delivered once, handed back uncounted

    start_worker(redis_url, "healthy", batch_size=8)
    wait_run_done(client, "bad-bundle", 90)
    assert run_counts(client, "bad-bundle") == {"total": 10, "done": 10, "failed": 0}


def test_one_failed_batch_sends_its_job_back_and_the_retry_labels_it(redis_url, start_worker, small_jpegs):
    """A transient engine fault (FAKE: the second batch fails once): no record for its images, the
    job goes back with one delivery spent, the same worker labels them on redelivery, and the
    worker stays up."""
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[300:340]
    worker = start_worker(
        redis_url, "hiccup", ["--include", "faulty_gpu"], batch_size=8, concurrency=1, test_failing_calls="3"
    )
    enqueue_paths(client, "hiccup", paths, QUEUE, chunk_size=20)
    wait_run_done(client, "hiccup", 120)
    records = [json.loads(v) for v in client.hvals("labeler:run:hiccup:records")]
    assert sorted(r["path"] for r in records) == sorted(paths) and all("labels" in r for r in records)
    assert run_counts(client, "hiccup") == {"total": 40, "done": 40, "failed": 0}
    log = worker.log()
    [requeued] = [line for line in log.splitlines() if "reject requeue=True" in line]
    failed_batch = int(re.search(r"(\d+) images met an engine failure; the job goes back", requeued)[1])
    assert 1 <= failed_batch <= 8
    assert log.count("] received") == 3  # two jobs, one of them delivered twice
    # the redelivery redid only the failed batch's images
    assert f"'skipped': {20 - failed_batch}, 'labeled': {failed_batch}" in log
    assert worker.alive()
