"""Container shards on real workers (issue 19): WebDataset tars written by webdataset's ShardWriter,
one labeler shard each, labeled exactly once through a worker SIGKILLed mid-tar; a partial copy's
`truncated` rows relabeled by `labeler retry` once the copy is complete, the ledger's counts
following the rows; tars in a SeaweedFS bucket named in WebDataset's brace notation."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import pytest
import redis
from distributed_helpers import (
    QUEUE,
    assert_exactly_once,
    run_counts,
    run_output,
    small_crops,
    wait_for,
    wait_run_done,
)

from worker.client.enqueue import enqueue_run
from worker.dataset.manifest import read_manifest
from worker.ledger.ledger import RunLedger
from worker.pipeline.inputs import iter_input_paths

pytestmark = pytest.mark.slow
wds = pytest.importorskip("webdataset")


def labeler(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=timeout)


def write_tars(folder: Path, photos: dict, tars: int, per_tar: int, seed: int) -> list[str]:
    """`tars` shards of `per_tar` 64x64 JPEG samples (img2dataset-style keys), by webdataset's
    ShardWriter; returns the row paths the run must end with (URL#key)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = []
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_tar, verbose=0) as sink:
        for i, crop in enumerate(small_crops(photos, tars * per_tar, seed=seed)):
            key = f"{i // per_tar:05d}{i % per_tar:04d}"
            sink.write({"__key__": key, "jpg": cv2.imencode(".jpg", crop)[1].tobytes(), "txt": key})
            expected.append(f"{folder}/{i // per_tar:05d}.tar#{key}")
    return expected


def test_tar_shards_are_labeled_once_through_a_worker_killed_mid_tar(redis_url, start_worker, photos, tmp_path):
    folder = tmp_path / "laion"
    expected = write_tars(folder, photos, tars=4, per_tar=60, seed=3)
    client = redis.Redis.from_url(redis_url)
    ledger = RunLedger(client)
    slow = {"test_batch_sleep_s": 0.4, "batch_size": 8, "concurrency": 2}
    doomed = start_worker(redis_url, "t1", ["--include", "slow_gpu"], **slow)
    entries = list(iter_input_paths([str(folder)]))
    summary = enqueue_run(client, "tars", entries, str(run_output("tars")), QUEUE, shard_size=1000)
    assert summary.shards == 4 and summary.seen == 0  # one shard per tar; nothing inside a tar was listed

    def held_by_t1() -> list[str]:
        return [s.shard_id for s in ledger.shard_states("tars") if s.state == "running" and s.owner.startswith("t1@")]

    wait_for(lambda: held_by_t1() and "batch 3 " in doomed.log(), 90, "t1 mid-tar")
    doomed.kill()
    assert run_counts(client, "tars")["shards_done"] < 4
    start_worker(redis_url, "t2")
    wait_run_done(client, "tars", 240)
    records = assert_exactly_once(client, "tars", expected)
    assert all("labels" in row and row["source_key"] == path.rsplit("#", 1)[1] for path, row in records.items())
    wait_for(lambda: (run_output("tars") / "manifest.json").exists(), 30, "the manifest")
    assert read_manifest(run_output("tars"))["counts"]["rows"] == 240


def test_retry_relabels_a_completed_partial_copy_and_the_counts_follow(redis_url, start_worker, photos, tmp_path):
    folder = tmp_path / "partial"
    expected = write_tars(folder, photos, tars=2, per_tar=30, seed=4)
    tar = folder / "00001.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 3])  # the copy is still running
    start_worker(redis_url, "r1")
    output = str(run_output("partial"))
    done = labeler("enqueue", str(folder), "--run", "partial", "--broker", redis_url, "--queue", QUEUE, "--output",
                   output, "--wait", "--interval", "0.2", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = redis.Redis.from_url(redis_url)
    counts = run_counts(client, "partial")
    assert counts["failed"] == 1 and 30 < counts["images"] < 60, (counts, done.stderr[-2000:])  # read before the cut
    tar.write_bytes(whole)
    retried = labeler("retry", "partial", "--code", "truncated", "--broker", redis_url, "--wait", "--interval", "0.2")
    assert retried.returncode == 0, retried.stderr + retried.stdout
    wait_run_done(client, "partial", 120)
    assert_exactly_once(client, "partial", expected)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "objectstore"))
    from objectstore_helpers import running_server

    with running_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def test_tar_shards_in_a_bucket_named_in_brace_notation(redis_url, start_worker, photos, tmp_path, s3_server, monkeypatch):
    from objectstore_helpers import IMAGES_BUCKET, labeler_environment

    prefix = f"t-{uuid.uuid4().hex[:10]}"
    local = tmp_path / "tars"
    expected_local = write_tars(local, photos, tars=3, per_tar=25, seed=5)
    with labeler_environment(s3_server, monkeypatch):
        admin = s3_server.client()
        for tar in sorted(local.glob("*.tar")):
            admin.pipe_file(f"{IMAGES_BUCKET}/{prefix}/{tar.name}", tar.read_bytes())
        base = f"s3://{IMAGES_BUCKET}/{prefix}"
        start_worker(redis_url, "s1", ["--allowed-root", f"{base}/"], s3_endpoint_url=s3_server.endpoint)
        entries = list(iter_input_paths([f"{base}/{{00000..00002}}.tar"]))
        assert [entry.url for entry in entries] == [f"{base}/{i:05d}.tar" for i in range(3)]
        client = redis.Redis.from_url(redis_url)
        enqueue_run(client, "bucket-tars", entries, str(run_output("bucket-tars")), QUEUE, shard_size=1000)
        wait_run_done(client, "bucket-tars", 180)
        expected = [path.replace(str(local), base) for path in expected_local]
        records = assert_exactly_once(client, "bucket-tars", expected)
        assert all("labels" in row for row in records.values())
