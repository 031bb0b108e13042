"""Celery workers labeling images that live in a bucket (issue 12): real worker subprocesses, the
real Redis of these tests and a real SeaweedFS S3 server. The run's dataset is written to a local
folder (object output is `labeler run --out s3://...` only, so far); every object gets exactly one
row, bad ones their own error codes."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from distributed_helpers import assert_exactly_once, enqueue, wait_run_done

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "objectstore"))
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET, SeaweedS3, running_server  # noqa: E402

from worker.pipeline.inputs import iter_input_paths  # noqa: E402
from worker.runs import storage  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    with running_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def test_workers_label_a_bucket_prefix_exactly_once(redis_url, start_worker, s3_server, photos, monkeypatch):
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    rng = np.random.default_rng(1)
    objects = {}
    for i in range(60):
        photo = list(photos.values())[i % len(photos)]
        y, x = int(rng.integers(0, photo.shape[0] - 64)), int(rng.integers(0, photo.shape[1] - 64))
        objects[f"{IMAGES_BUCKET}/{prefix}/in/{i:03d}.jpg"] = cv2.imencode(".jpg", photo[y : y + 64, x : x + 64, ::-1])[1].tobytes()
    good = next(iter(objects.values()))
    objects[f"{IMAGES_BUCKET}/{prefix}/in/zz-truncated.jpg"] = good[: len(good) // 2]
    objects[f"{IMAGES_BUCKET}/{prefix}/out/outside.jpg"] = good
    objects[f"{PRIVATE_BUCKET}/{prefix}/denied.jpg"] = good
    s3_server.client().pipe(objects)
    for name, value in s3_server.env().items():  # the workers inherit this process's environment
        monkeypatch.setenv(name, value)
    storage.clear_cache()
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
