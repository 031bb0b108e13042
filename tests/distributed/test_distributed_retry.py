"""`labeler retry`: a run's failed images labeled again once their cause is fixed, against a real
redis-server and a real Celery worker; every image still ends with exactly one row."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from distributed_helpers import QUEUE, assert_exactly_once, enqueue, run_counts, wait_run_done

from worker.cli import main

pytestmark = pytest.mark.slow


def test_retry_labels_an_image_restored_after_the_run(redis_url, start_worker, small_jpegs, tmp_path):
    restored = tmp_path / "restored.jpg"  # missing during the run: a mount that was down
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    paths = [*small_jpegs[400:405], str(restored), str(corrupt)]
    jpeg_root = str(Path(small_jpegs[0]).parents[1])
    start_worker(redis_url, "w1", ["--allowed-root", str(tmp_path), "--allowed-root", jpeg_root])
    client = redis.Redis.from_url(redis_url)
    enqueue(client, "retry-run", paths, shard_size=4)
    wait_run_done(client, "retry-run", 90)
    assert run_counts(client, "retry-run") == {"images": 7, "done": 7, "failed": 2, "shards": 2, "shards_done": 2}

    failures = tmp_path / "failures.csv"  # triage first: which images failed, and why
    listed = CliRunner().invoke(main, ["results", "retry-run", "--out", str(failures), "--errors-only",
                                       "--broker", redis_url])  # fmt: skip
    assert listed.exit_code == 0, listed.output
    rows = {row["path"]: row["error_code"] for row in csv.DictReader(failures.open())}
    assert rows == {str(restored): "not_found", str(corrupt): "decode_failed"}

    shutil.copy(small_jpegs[0], restored)
    result = CliRunner().invoke(main, ["retry", "retry-run", "--code", "not_found", "--broker", redis_url,
                                       "--queue", QUEUE])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 shards with failed images (not_found relabeled) queued again" in result.output
    wait_run_done(client, "retry-run", 90)

    records = assert_exactly_once(client, "retry-run", paths)
    assert "labels" in records[str(restored)]
    assert records[str(corrupt)]["error"]["code"] == "decode_failed"  # not asked for: left as it was
    assert all("labels" in records[p] for p in small_jpegs[400:405])  # the shard's other rows kept
    assert run_counts(client, "retry-run")["failed"] == 1

    again = CliRunner().invoke(main, ["retry", "retry-run", "--code", "not_found", "--broker", redis_url,
                                      "--queue", QUEUE])  # fmt: skip
    assert again.exit_code == 0, again.output
    wait_run_done(client, "retry-run", 90)  # the corrupt file's shard is reopened; it stays decode_failed
    assert assert_exactly_once(client, "retry-run", paths)[str(corrupt)]["error"]["code"] == "decode_failed"
