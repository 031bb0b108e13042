"""Issue 18's findings on a real redis-server and real workers: a run every worker must refuse
fails loudly and resumes once fixed; a worker keeps its leases while its engine loads; a wiped
ledger finishes a run from what storage holds. Each failed (or hung) on main at af27960."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import redis
from distributed_helpers import QUEUE, assert_exactly_once, enqueue, run_output, wait_for, wait_run_done

import worker.celery_worker.process as process_module
from worker.celery_worker.app import create_app
from worker.celery_worker.process import WorkerProcess
from worker.celery_worker.startup_checks import configuration_warnings
from worker.dataset.manifest import read_manifest
from worker.ledger.ledger import RunLedger
from worker.settings import Settings

pytestmark = pytest.mark.slow


def labeler(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """The `labeler` command as a user runs it; a hang fails the test after `timeout`."""
    return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=timeout)


def test_a_run_every_worker_refuses_fails_and_the_waiting_client_hears_why(
    redis_url, start_worker, small_jpegs, tmp_path
) -> None:
    """Finding 2: workers whose output roots do not cover the run's output refused every shard,
    and the client waited forever. Now the run fails with the reason, `enqueue --wait` and
    `status` exit 1 within seconds, and enqueuing it again after the fix resumes it."""
    paths = small_jpegs[600:630]
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    misconfigured = start_worker(redis_url, "misconfigured", output_roots=elsewhere)
    enqueue_args = ["enqueue", f"@{listing}", "--run", "refused", "--broker", redis_url, "--queue", QUEUE,
                    "--output", str(run_output("refused")), "--shard-size", "10", "--wait", "--interval", "0.2",
                    "--no-progress"]  # fmt: skip
    waited = labeler(*enqueue_args)
    assert waited.returncode == 1, waited.stderr
    assert "run refused failed: output" in waited.stderr and "LABELER_OUTPUT_ROOTS" in waited.stderr
    status = labeler("status", "refused", "--broker", redis_url, "--json")
    assert status.returncode == 1 and "outside the output roots" in json.loads(status.stdout)["failed_reason"]
    text = labeler("status", "refused", "--broker", redis_url)
    assert text.returncode == 1 and "FAILED: output" in text.stdout

    misconfigured.stop()
    start_worker(redis_url, "fixed")
    resumed = labeler(*enqueue_args)
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(redis.Redis.from_url(redis_url), "refused", paths)
    assert read_manifest(run_output("refused"))["counts"]["rows"] == 30


def test_a_worker_says_at_start_up_what_it_will_refuse(tiny_bundle, tmp_path) -> None:
    """No output roots, a root it cannot write, a bundle without a features output: said once at
    start-up (the worker logs each line), not discovered as a failed run later."""
    import shutil

    no_features = tmp_path / "no-features"
    shutil.copytree(tiny_bundle, no_features)
    sidecar = json.loads((no_features / "model.json").read_text())
    sidecar["features_output"] = None
    (no_features / "model.json").write_text(json.dumps(sidecar))
    assert configuration_warnings(Settings(model=str(tiny_bundle), output_roots=(str(tmp_path),))) == []
    (tmp_path / "a-file").write_text("not a folder")
    assert configuration_warnings(Settings(model=str(tiny_bundle), output_roots=(str(tmp_path / "made-later"),))) == []
    warnings = configuration_warnings(Settings(model=str(no_features), output_roots=(str(tmp_path / "a-file" / "runs"),)))
    assert len(warnings) == 2
    assert "is not a folder this worker can write" in warnings[0] and "--embeddings will be failed" in warnings[1]
    assert "LABELER_OUTPUT_ROOTS is not set" in configuration_warnings(Settings())[0]


def test_a_run_whose_shard_list_is_missing_fails_instead_of_waiting(redis_url, start_worker, small_jpegs) -> None:
    """A worker that cannot read a shard's path list (the output folder not shared with it)."""
    client = redis.Redis.from_url(redis_url)
    enqueue(client, "no-list", small_jpegs[640:660], shard_size=10)
    (run_output("no-list") / "shards" / "000001.json").unlink()
    start_worker(redis_url, "w1")
    ledger = RunLedger(client)
    status = wait_for(lambda: ledger.status("no-list", QUEUE).failed_reason, 60, "the run to fail")
    assert "000001 has no path list" in status and "shared with this worker" in status


def test_the_heartbeat_and_the_sweeper_reach_redis_while_the_engine_loads(redis_url, tiny_bundle, monkeypatch):
    """Finding 3: a slow engine load (a large TensorRT engine, a first build) held the lock the
    heartbeat needs, so a healthy worker's leases lapsed. Stand-in for the slow load: the real
    build, held back until the test lets it go."""
    loading, let_go = threading.Event(), threading.Event()
    real_build = process_module.build_service

    def slow_build(*args, **kwargs):
        loading.set()
        let_go.wait(60)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(process_module, "build_service", slow_build)
    process = WorkerProcess(create_app(Settings(broker_url=redis_url, model=str(tiny_bundle))))
    loader = threading.Thread(target=process.service, daemon=True)
    loader.start()
    assert loading.wait(30)
    heartbeat = threading.Thread(target=lambda: (process.leases.renew_now(), process.sweeper.sweep_once()), daemon=True)
    heartbeat.start()
    heartbeat.join(20)
    reached = not heartbeat.is_alive()
    let_go.set()
    loader.join(60)
    process.close()
    assert reached, "the heartbeat waited for the engine load"


def test_a_wiped_redis_finishes_the_run_from_what_storage_holds(redis_url, start_worker, small_jpegs) -> None:
    """Storage is the record of what is done: after the ledger is lost entirely, enqueuing the
    same run again relabels only the shard whose file is gone, and the run ends exactly once."""
    client = redis.Redis.from_url(redis_url)
    paths = small_jpegs[700:730]
    enqueue(client, "wiped", paths, shard_size=10)
    start_worker(redis_url, "w1")
    wait_run_done(client, "wiped", 90)
    (run_output("wiped") / "labels" / "part-000002.parquet").unlink()
    client.flushall()
    again = enqueue(client, "wiped", paths, shard_size=10)
    assert (again.from_storage, again.jobs) == (20, 1)
    wait_run_done(client, "wiped", 90)
    assert_exactly_once(client, "wiped", paths)
    wait_for(lambda: read_manifest(run_output("wiped")), 30, "the manifest")
