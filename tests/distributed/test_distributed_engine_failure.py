"""A worker whose engine breaks mid-run (FAKE GPU fault: tests/distributed/faulty_gpu.py) must not
turn the rest of the run into `inference_failed` rows. It hands its shards back without spending
their attempts, stops itself with exit status 70 so a supervisor restarts it, and a healthy
worker then labels every image exactly once. Real redis-server and real Celery workers."""

from __future__ import annotations

import pytest
import redis
from distributed_helpers import assert_exactly_once, dataset_records, enqueue, wait_for, wait_run_done

from worker.celery_worker.health import EXIT_ENGINE_BROKEN
from worker.ledger.ledger import RunLedger

pytestmark = pytest.mark.slow


def test_fake_gpu_fault_stops_the_worker_and_hands_the_jobs_back(redis_url, start_worker, small_jpegs):
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[:96]
    broken = start_worker(
        redis_url, "broken", ["--include", "faulty_gpu"], batch_size=8, concurrency=2, test_good_batches=2
    )
    enqueue(client, "gpu-lost", paths, shard_size=24)

    status = wait_for(lambda: broken.process.poll(), 90, "the broken worker to stop itself")
    log = broken.log()
    assert status == EXIT_ENGINE_BROKEN, log[-3000:]
    assert "labeling service gives up: 3 batches in a row failed" in log
    assert "stopping this worker, its engine is broken" in log

    kept = dataset_records("gpu-lost")
    assert not [r for r in kept if "error" in r], "an engine failure must not become an image's row"
    assert len(kept) <= 2 * 8  # at most the two good batches' shard was written before the fault

    start_worker(redis_url, "healthy", batch_size=8)
    wait_run_done(client, "gpu-lost", 120)
    records = assert_exactly_once(client, "gpu-lost", paths)
    assert all("labels" in r for r in records.values())
    assert client.llen("labeler:run:gpu-lost:dead") == 0


@pytest.mark.parametrize(("pool", "expected_status"), [("threads", EXIT_ENGINE_BROKEN), ("prefork", 0)])
def test_a_worker_whose_model_cannot_load_stops_and_leaves_the_job_queued(
    redis_url, start_worker, small_jpegs, tiny_bundle, tmp_path, pool, expected_status
):
    """A bundle corrupted after the start check (checksum mismatch at load): the first shard goes back
    untouched, without an attempt spent, and the worker stops instead of spinning on the queue
    (status 70; with prefork the pool child stops the main process, which exits 0)."""
    import shutil

    corrupted = tmp_path / "corrupted"
    shutil.copytree(tiny_bundle, corrupted)
    with open(corrupted / "model.onnx", "ab") as model:
        model.write(b"\0")
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[200:210]
    broken = start_worker(redis_url, "cannot-load", ["--pool", pool], model=corrupted)
    enqueue(client, "bad-bundle", paths, shard_size=10)

    wait_for(lambda: broken.process.poll() is not None, 90, "the worker to stop itself")
    status = broken.process.returncode
    assert status == expected_status, broken.log()[-3000:]
    assert "does not match the checksum" in broken.log()
    assert dataset_records("bad-bundle") == []
    state = RunLedger(client).shard_state("bad-bundle", "000000")
    assert (state.state, state.attempts) == ("queued", 0)  # taken once, handed back uncounted

    start_worker(redis_url, "healthy", batch_size=8)
    wait_run_done(client, "bad-bundle", 90)
    assert_exactly_once(client, "bad-bundle", paths)


def test_one_failed_batch_sends_its_job_back_and_the_retry_labels_it(redis_url, start_worker, small_jpegs):
    """A transient engine fault (FAKE: the second batch fails once): no row for its images, the
    shard goes back without spending an attempt (the engine failed, not its images), the same
    worker labels it on redelivery, and the worker stays up."""
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[300:340]
    worker = start_worker(
        redis_url, "hiccup", ["--include", "faulty_gpu"], batch_size=8, concurrency=1, test_failing_calls="3"
    )
    enqueue(client, "hiccup", paths, shard_size=20)
    wait_run_done(client, "hiccup", 120)
    records = assert_exactly_once(client, "hiccup", paths)
    assert all("labels" in r for r in records.values())
    log = worker.log()
    [handed_back] = [line for line in log.splitlines() if "handed back: " in line]
    assert "images met an engine failure; the shard goes back for them" in handed_back
    assert log.count("] received") == 3  # two shards, one of them delivered twice
    attempts = sorted(state.attempts for state in RunLedger(client).shard_states("hiccup"))
    assert attempts == [1, 1]  # the failed batch's shard was taken twice but spent no attempt
    assert worker.alive()
