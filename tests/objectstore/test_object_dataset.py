"""`labeler run --out s3://bucket/prefix/`: the run's whole layout (shard lists, one Parquet object
per shard, manifest) in a bucket, against the real server; resume reads it back from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from objectstore_helpers import IMAGES_BUCKET, LABELS_BUCKET


def labeler(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--no-progress", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_a_dataset_written_to_a_bucket_and_resumed_from_it(
    s3_server, s3_admin, s3_prefix, photo_dir, tiny_bundle, labeler_s3_env
):
    from worker.dataset.files import iter_records
    from worker.dataset.object_path import ObjectPath

    names = sorted(p.name for p in photo_dir.glob("*.jpg") if "_large" not in p.name)
    s3_admin.pipe({f"{IMAGES_BUCKET}/{s3_prefix}/in/{n}": (photo_dir / n).read_bytes() for n in names})
    source = f"s3://{IMAGES_BUCKET}/{s3_prefix}/in/"
    out = f"s3://{LABELS_BUCKET}/{s3_prefix}/run/"
    args = [source, f"{source}missing.jpg", "--model", str(tiny_bundle), "--out", out, "--shard-size", "4"]
    first = labeler(s3_server.env(), *args)
    assert f"{out.rstrip('/')}/labels/*.parquet" in first.stderr

    keys = sorted(s3_admin.find(f"{LABELS_BUCKET}/{s3_prefix}/run"))
    prefix = f"{LABELS_BUCKET}/{s3_prefix}/run/"
    assert [k[len(prefix):] for k in keys] == [
        "labels/part-000000.parquet", "labels/part-000001.parquet", "labels/part-000002.parquet",
        "manifest.json", "shards/000000.json", "shards/000001.json", "shards/000002.json", "shards/index.json",
    ]  # fmt: skip  (9 inputs in shards of 4; no temporary objects)
    manifest = json.loads(s3_admin.cat_file(f"{prefix}manifest.json"))
    assert manifest["counts"]["rows"] == len(names) + 1 and manifest["counts"]["failed"] == 1
    records = list(iter_records(ObjectPath(out)))
    assert sorted(r["path"] for r in records) == sorted([f"{source}{n}" for n in names] + [f"{source}missing.jpg"])
    assert {r["error"]["code"] for r in records if "error" in r} == {"not_found"}

    before = {k: s3_admin.info(k)["ETag"] for k in keys if "/labels/" in k}
    again = labeler(s3_server.env(), *args, "--resume")
    assert {k: s3_admin.info(k)["ETag"] for k in before} == before, "resume rewrote finished shards"
    assert f"skipped (already done) {len(names) + 1}" in again.stderr
