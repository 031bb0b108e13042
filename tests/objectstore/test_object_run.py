"""`labeler run` from a bucket, end to end against the real server: the labels match the same
images read from local disk, every bad object gets its own error record and nothing else stops,
and no credential reaches a record or the command's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET, Credentials


def run_labeler(env: dict[str, str], *args: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    out = Path(args[args.index("--out") + 1])
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--no-progress", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()], result


@pytest.fixture
def photo_objects(s3_admin, s3_prefix, photo_dir) -> dict[str, Path]:
    """The session's photos (not the upscaled copies) uploaded under PREFIX/photos/: name -> file."""
    files = {p.name: p for p in sorted(photo_dir.glob("*.jpg")) if "_large" not in p.name}
    s3_admin.pipe({f"{IMAGES_BUCKET}/{s3_prefix}/photos/{name}": path.read_bytes() for name, path in files.items()})
    return files


def test_labels_from_a_bucket_with_every_bad_object_recorded(
    s3_server, s3_admin, s3_prefix, photo_objects, tiny_bundle, tmp_path, photos
):
    good = cv2.imencode(".jpg", photos["cat"][..., ::-1])[1].tobytes()
    cap = max(len(p.read_bytes()) for p in photo_objects.values()) + 1000
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    s3_admin.pipe({
        f"{IMAGES_BUCKET}/{s3_prefix}/photos/zz-truncated.jpg": good[: len(good) // 2],
        f"{IMAGES_BUCKET}/{s3_prefix}/photos/zz-big.jpg": good + b"\0" * cap,
        f"{IMAGES_BUCKET}/{s3_prefix}/other/outside.jpg": good,
        f"{PRIVATE_BUCKET}/{s3_prefix}/denied.jpg": good,
    })  # fmt: skip
    expected_errors = {
        f"{base}/photos/zz-truncated.jpg": "decode_failed",
        f"{base}/photos/zz-big.jpg": "too_large",
        f"{base}/photos/missing.jpg": "not_found",
        f"{base}/other/outside.jpg": "outside_allowed_roots",
        f"{base}/photos/../other/outside.jpg": "outside_allowed_roots",
        f"s3://{PRIVATE_BUCKET}/{s3_prefix}/denied.jpg": "permission_denied",
    }
    records, result = run_labeler(
        s3_server.env(),
        f"{base}/photos/", *[url for url in expected_errors if "truncated" not in url and "big" not in url],
        "--model", str(tiny_bundle), "--out", str(tmp_path / "bucket.jsonl"), "--max-bytes", str(cap),
        "--allowed-root", f"{base}/photos/", "--allowed-root", f"s3://{PRIVATE_BUCKET}/{s3_prefix}/",
    )  # fmt: skip
    by_path = {r["path"]: r for r in records}
    assert len(by_path) == len(records) == len(photo_objects) + len(expected_errors), "one record per input"
    for url, code in expected_errors.items():
        assert by_path[url].get("error", {}).get("code") == code, (url, by_path[url])
    local, _ = run_labeler(
        {}, *map(str, photo_objects.values()), "--model", str(tiny_bundle), "--out", str(tmp_path / "disk.jsonl")
    )
    assert {Path(r["path"]).name: r["labels"] for r in local} == {
        url.rsplit("/", 1)[1]: r["labels"] for url, r in by_path.items() if url not in expected_errors
    }, "the same labels from the bucket as from local disk"
    secrets = (s3_server.labeler.secret_key, s3_server.admin.secret_key)
    text = (tmp_path / "bucket.jsonl").read_text() + result.stdout + result.stderr
    assert not any(secret in text for secret in secrets)


def test_wrong_credentials_give_records_not_a_stop(s3_server, photo_objects, s3_prefix, tiny_bundle, tmp_path):
    wrong = Credentials(s3_server.labeler.access_key, "wrong-" + s3_server.labeler.secret_key[:8])
    urls = [f"s3://{IMAGES_BUCKET}/{s3_prefix}/photos/{name}" for name in photo_objects]
    records, result = run_labeler(
        s3_server.env(wrong), *urls, "--model", str(tiny_bundle), "--out", str(tmp_path / "r.jsonl")
    )
    assert sorted(r["path"] for r in records) == sorted(urls)
    assert {r["error"]["code"] for r in records} == {"permission_denied"}
    text = (tmp_path / "r.jsonl").read_text() + result.stdout + result.stderr
    assert wrong.secret_key not in text and s3_server.labeler.secret_key not in text


def test_a_bucket_prefix_into_a_parquet_dataset(s3_server, photo_objects, s3_prefix, tiny_bundle, tmp_path):
    import duckdb

    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    out = tmp_path / "ds"
    run = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--no-progress", f"{base}/photos/", f"{base}/photos/missing.jpg",
         "--model", str(tiny_bundle), "--out", f"{out}/", "--shard-size", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **s3_server.env()},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = duckdb.sql(f"select path, error_code from read_parquet('{out}/labels/*.parquet')").fetchall()
    assert sorted(rows) == sorted(
        [(f"{base}/photos/{name}", None) for name in photo_objects] + [(f"{base}/photos/missing.jpg", "not_found")]
    )
