"""Celery workers labeling images that live in a bucket (issue 12): real worker subprocesses, the
real Redis of these tests and a real SeaweedFS S3 server. Every object gets exactly one row, bad
ones their own error codes; the dataset goes to a local folder or to a bucket prefix, and a worker
SIGKILLed mid-run against the bucket still leaves exactly one row per image there."""

from __future__ import annotations

import base64
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from click.testing import CliRunner
from distributed_helpers import (
    QUEUE,
    assert_exactly_once,
    enqueue,
    run_counts,
    small_crops,
    wait_for,
    wait_run_done,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "objectstore"))
from objectstore_helpers import (  # noqa: E402
    IMAGES_BUCKET,
    LABELS_BUCKET,
    PRIVATE_BUCKET,
    SeaweedS3,
    labeler_environment,
    running_server,
)

from worker.cli import main  # noqa: E402
from worker.client.enqueue import enqueue_run  # noqa: E402
from worker.dataset.shard_list import shard_source  # noqa: E402
from worker.ledger.ledger import RunLedger  # noqa: E402
from worker.pipeline.inputs import iter_input_paths  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    with running_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def crops(photos: dict[str, np.ndarray], keys: str, count: int) -> dict[str, bytes]:
    """`count` distinct 64x64 JPEG crops of the test photographs, keyed `keys.format(i)`."""
    return {keys.format(i): cv2.imencode(".jpg", crop)[1].tobytes() for i, crop in enumerate(small_crops(photos, count, seed=1))}


@pytest.fixture
def as_labeler(s3_server: SeaweedS3, monkeypatch) -> Iterator[dict[str, str]]:
    """This process (the enqueueing client) and the workers it starts talk to the server as `labeler`."""
    with labeler_environment(s3_server, monkeypatch) as env:
        yield env


def test_workers_label_a_bucket_prefix_exactly_once(redis_url, start_worker, s3_server, photos, as_labeler):
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    objects = crops(photos, f"{IMAGES_BUCKET}/{prefix}/in/{{:03d}}.jpg", 60)
    good = next(iter(objects.values()))
    objects[f"{IMAGES_BUCKET}/{prefix}/in/zz-truncated.jpg"] = good[: len(good) // 2]
    objects[f"{IMAGES_BUCKET}/{prefix}/out/outside.jpg"] = good
    objects[f"{PRIVATE_BUCKET}/{prefix}/denied.jpg"] = good
    s3_server.client().pipe(objects)
    roots = ["--allowed-root", f"s3://{IMAGES_BUCKET}/{prefix}/in/", "--allowed-root", f"s3://{PRIVATE_BUCKET}/{prefix}/"]
    # worker_env passes no LABELER_ variable of this process: the endpoint goes as a setting.
    start_worker(redis_url, "w1", roots, s3_endpoint_url=s3_server.endpoint)
    start_worker(redis_url, "w2", roots, s3_endpoint_url=s3_server.endpoint)
    base = f"s3://{IMAGES_BUCKET}/{prefix}"
    bad = {
        f"{base}/in/zz-truncated.jpg": "decode_failed",
        f"{base}/in/missing.jpg": "not_found",
        f"{base}/out/outside.jpg": "outside_allowed_roots",
        f"s3://{PRIVATE_BUCKET}/{prefix}/denied.jpg": "permission_denied",
    }
    listed = list(iter_input_paths([f"{base}/in/"]))
    assert len(listed) == 61 and listed == sorted(listed)
    paths = listed + [p for p in bad if p not in listed]
    client = redis.Redis.from_url(redis_url)
    summary = enqueue(client, "from-bucket", paths, shard_size=16)
    assert summary.shards == 4  # 61 listed + 3 named, in shards of 16
    wait_run_done(client, "from-bucket", 180)
    records = assert_exactly_once(client, "from-bucket", paths)
    for path, code in bad.items():
        assert records[path]["error"]["code"] == code, records[path]
    assert all(len(records[p]["labels"]) == 5 for p in listed if p not in bad)
    secret = s3_server.labeler.secret_key
    assert not any(secret in str(record) for record in records.values())


def test_a_run_writes_its_dataset_to_a_bucket_through_a_worker_killed_mid_run(
    redis_url, start_worker, s3_server, photos, as_labeler, tmp_path
):
    """Images and dataset both in buckets: a worker SIGKILLed while it holds a shard, the run still
    ends with one object per shard (deterministic names, no temporaries) and exactly one row per
    image, read back with pyarrow from the bucket; the manifest counts them. An object missing
    then uploaded is labeled by `labeler retry`, its shard's object rewritten in the bucket."""
    import pyarrow.dataset as ds

    prefix = f"t-{uuid.uuid4().hex[:10]}"
    images = crops(photos, f"{IMAGES_BUCKET}/{prefix}/{{:04d}}.jpg", 240)
    late_key = f"{IMAGES_BUCKET}/{prefix}/0007.jpg"
    late_bytes = images.pop(late_key)  # named by the run, uploaded only before the retry
    s3_server.client().pipe(images)
    roots = ["--allowed-root", f"s3://{IMAGES_BUCKET}/{prefix}/"]
    settings = {"s3_endpoint_url": s3_server.endpoint, "output_roots": f"s3://{LABELS_BUCKET}/{prefix}/"}
    doomed = start_worker(redis_url, "b1", roots, concurrency=2, **settings)
    paths = sorted([*iter_input_paths([f"s3://{IMAGES_BUCKET}/{prefix}/"]), f"s3://{late_key}"])
    output = f"s3://{LABELS_BUCKET}/{prefix}/runs/bucket-run/"  # the trailing slash is dropped
    client = redis.Redis.from_url(redis_url)
    summary = enqueue_run(client, "bucket-run", paths, output, QUEUE, shard_size=20)
    assert (summary.output, summary.shards) == (output.rstrip("/"), 12)
    ledger = RunLedger(client)

    def held_by_b1() -> list[str]:
        return [s.shard_id for s in ledger.shard_states("bucket-run") if s.state == "running" and s.owner.startswith("b1@")]

    wait_for(lambda: run_counts(client, "bucket-run")["shards_done"] >= 1 and held_by_b1(), 120, "b1 mid-run")
    doomed.kill()
    lost = set(held_by_b1())
    assert lost and run_counts(client, "bucket-run")["shards_done"] < 12
    start_worker(redis_url, "b2", roots, concurrency=2, **settings)
    wait_run_done(client, "bucket-run", 180)
    admin = s3_server.client()
    key = f"{LABELS_BUCKET}/{prefix}/runs/bucket-run"
    wait_for(lambda: admin.exists(f"{key}/manifest.json"), 30, "the manifest")
    shard_objects = sorted(p.rsplit("/", 1)[-1] for p in admin.ls(f"{key}/labels"))
    assert shard_objects == [f"part-{i:06d}.parquet" for i in range(12)]  # nothing else: no temporaries
    table = ds.dataset(f"{key}/labels", filesystem=admin, format="parquet").to_table(columns=["path", "worker"])
    assert table.num_rows == 240
    by_worker = {row["path"]: row["worker"].split("@")[0] for row in table.to_pylist()}
    lost_paths = {p for shard in lost for p in shard_source(output, shard)}
    assert {by_worker[p] for p in lost_paths} == {"b2"}  # the killed worker's shards were redone
    assert_exactly_once(client, "bucket-run", paths, output=output)  # read through the labeler's own code
    manifest = json.loads(admin.cat_file(f"{key}/manifest.json"))
    assert (manifest["counts"]["rows"], manifest["counts"]["shards"]) == (240, 12)
    exported = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(main, ["results", "bucket-run", "--broker", redis_url, "--out", str(exported)])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in map(json.loads, exported.read_text().splitlines())}
    assert len(rows) == 240 and rows[f"s3://{late_key}"]["error"]["code"] == "not_found"
    admin.pipe_file(late_key, late_bytes)
    retried = CliRunner().invoke(main, ["retry", "bucket-run", "--broker", redis_url, "--queue", QUEUE])
    assert retried.exit_code == 0 and "1 shards with failed images" in retried.output, retried.output
    def relabeled() -> bool:
        counts = run_counts(client, "bucket-run")
        return counts["failed"] == 0 and counts["done"] == counts["images"]

    wait_for(relabeled, 60, "the retried shard")
    records = assert_exactly_once(client, "bucket-run", paths, output=output)
    assert len(records[f"s3://{late_key}"]["labels"]) == 5


def test_cli_enqueue_takes_bucket_inputs_and_a_bucket_output(redis_url, s3_server, photos, as_labeler, tmp_path):
    """`labeler enqueue` with a prefix listing, an @list and a Parquet manifest that live in a bucket
    (naming some objects twice), into `--output s3://...`: each object once in the shard lists
    stored in the bucket, one message per shard naming the canonical output URL, and no secret
    in what it prints or publishes. Enqueueing again reuses the stored list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prefix = f"t-{uuid.uuid4().hex[:10]}"
    base = f"s3://{IMAGES_BUCKET}/{prefix}"
    admin = s3_server.client()
    admin.pipe(crops(photos, f"{IMAGES_BUCKET}/{prefix}/img/{{:03d}}.jpg", 30))
    named = [f"{base}/img/{i:03d}.jpg" for i in (3, 4, 5, 40)]  # 40 does not exist: its row says so later
    admin.pipe_file(f"{IMAGES_BUCKET}/{prefix}/lists/list.txt", ("\n".join(named[:2]) + "\n").encode())
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": named[2:]}), manifest)
    admin.put_file(str(manifest), f"{IMAGES_BUCKET}/{prefix}/lists/m.parquet")
    output = f"s3a://{LABELS_BUCKET}/{prefix}/runs/cli/"
    argv = ["enqueue", f"{base}/img/", f"@{base}/lists/list.txt", f"{base}/lists/m.parquet", "--run", "cli",
            "--output", output, "--broker", redis_url, "--queue", QUEUE, "--shard-size", "8", "--no-progress"]  # fmt: skip
    first = CliRunner().invoke(main, argv)
    assert first.exit_code == 0, first.output
    assert "31 images in 4 shards" in first.output and "31 queued" in first.output
    canonical = f"s3://{LABELS_BUCKET}/{prefix}/runs/cli"
    listed = [p for shard in ("000000", "000001", "000002", "000003") for p in shard_source(canonical, shard)]
    assert listed == [f"{base}/img/{i:03d}.jpg" for i in range(30)] + [named[3]]
    client = redis.Redis.from_url(redis_url)
    messages = client.lrange(QUEUE, 0, -1)
    assert len(messages) == 4
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in messages]
    assert {body[1]["output"] for body in bodies} == {canonical}
    secret = s3_server.labeler.secret_key
    assert secret not in first.output and not any(secret.encode() in m for m in messages)
    again = CliRunner().invoke(main, argv)
    assert again.exit_code == 0, again.output
    assert "(the run's stored shard list)" in again.output
