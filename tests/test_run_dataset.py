"""`labeler run INPUTS --out DIR/`: the one-process run writes the distributed run's layout (a
fixed shard list, one Parquet file per shard, a manifest), reads as one table in DuckDB, resumes
after an engine failure without a row twice, and relabels only error rows on --retry-errors. An
image named twice gets one row; a shard that cannot be written stops the run with one clear line,
no manifest and a non-zero status, and --resume finishes it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from test_service import lost_gpu_runner

from worker.cli import main
from worker.dataset.files import iter_records, shard_files
from worker.dataset.shard_list import GENESIS, chain_hash, write_index, write_shard_source
from worker.local.dataset_run import DatasetExists, run_local_dataset
from worker.pipeline.service import LabelingService, ServiceOptions
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

OPTIONS = ServiceOptions(max_batch_size=2, max_wait_s=0.0, decode_threads=1, max_in_flight=4)


def rows(out) -> list[dict]:
    return list(iter_records(out))


def test_cli_writes_a_dataset_that_reads_as_one_table(tiny_bundle, image_paths, tmp_path) -> None:
    out = tmp_path / "ds"
    args = ["run", *image_paths, str(tmp_path / "missing.jpg"), "--out", f"{out}/", "--shard-size", "5",
            "--model", str(tiny_bundle), "--threads", "1", "--embeddings", "--embedding-dtype", "float16"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    total = len(image_paths) + 1
    assert len(shard_files(out)) == -(-total // 5)
    count, distinct, failed, width = duckdb.sql(
        f"SELECT count(*), count(DISTINCT path), count(error_code), max(len(embedding)) FROM '{out}/labels/*.parquet'"
    ).fetchall()[0]
    assert (count, distinct, failed) == (total, total, 1) and width > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == total and manifest["embedding"]["dtype"] == "float16"
    again = CliRunner().invoke(main, args)  # not asked to resume: refused, nothing touched
    assert again.exit_code == 1 and "--resume" in again.output


def test_an_engine_failure_leaves_its_shards_unwritten_and_resume_finishes(tiny_bundle, image_paths, tmp_path):
    out = tmp_path / "ds"
    broken = run_local_dataset(image_paths, LabelingService(lost_gpu_runner(tiny_bundle, from_call=4), OPTIONS),
                               out, shard_size=4)  # fmt: skip
    assert not broken.complete and broken.engine_failure is not None
    assert not (out / "manifest.json").exists()
    written = rows(out)
    assert all("labels" in r for r in written)  # an engine failure is never an image's row
    with pytest.raises(DatasetExists):
        run_local_dataset(image_paths, LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), OPTIONS),
                          out, shard_size=4)  # fmt: skip
    healthy = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), OPTIONS)
    resumed = run_local_dataset(image_paths, healthy, out, resume=True, shard_size=4)
    assert resumed.complete and resumed.skipped == len(written)
    assert sorted(r["path"] for r in rows(out)) == sorted(image_paths)  # each once, none lost
    assert (out / "manifest.json").exists()


def test_retry_errors_relabels_only_the_error_rows(tiny_bundle, image_paths, tmp_path) -> None:
    out = tmp_path / "ds"
    restored = tmp_path / "restored.jpg"
    paths = [*image_paths[:5], str(restored)]
    service = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), OPTIONS)
    first = run_local_dataset(paths, service, out, shard_size=3)
    assert first.complete and dict(first.errors) == {"not_found": 1}
    before = {r["path"]: r for r in rows(out)}
    shutil.copy(image_paths[0], restored)
    service = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), OPTIONS)
    retried = run_local_dataset(paths, service, out, retry_errors=True, shard_size=3)
    assert retried.labeled == 1 and retried.skipped == 5
    after = {r["path"]: r for r in rows(out)}
    assert sorted(after) == sorted(paths) and "labels" in after[str(restored)]
    assert all(after[p] == before[p] for p in image_paths[:5])  # the other rows kept as they were


def run_cli(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def test_an_image_named_twice_in_one_shard_gets_one_row(tiny_bundle, photo_dir, image_paths, tmp_path) -> None:
    out = tmp_path / "ds"
    result = run_cli(str(photo_dir), str(photo_dir), "--out", f"{out}/", "--model", str(tiny_bundle), "--threads", "1")
    assert result.exit_code == 0, result.output
    assert sorted(r["path"] for r in rows(out)) == image_paths
    assert json.loads((out / "manifest.json").read_text())["counts"]["rows"] == len(image_paths)
    assert f"repeats dropped {len(image_paths)}" in result.output


def test_repeats_across_shards_get_one_row(tiny_bundle, photo_dir, image_paths, tmp_path) -> None:
    """A folder and a list that overlaps it, cut into shards of 3: each image in one shard only."""
    out = tmp_path / "ds"
    missing = str(tmp_path / "missing.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*image_paths[3:9], missing, missing]) + "\n")
    result = run_cli(str(photo_dir), f"@{listing}", "--out", f"{out}/", "--shard-size", "3",
                     "--model", str(tiny_bundle), "--threads", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    (count, distinct), = duckdb.sql(f"SELECT count(*), count(DISTINCT path) FROM '{out}/labels/*.parquet'").fetchall()
    assert count == distinct == len(image_paths) + 1
    assert "repeats dropped 7" in result.output


def test_a_shard_that_cannot_be_written_stops_the_run_and_resume_finishes(tiny_bundle, image_paths, tmp_path):
    """Shard 000002's file name is taken by a folder: the write fails mid-run. The run stops soon
    (the listing is not finished), says why in one line, exits 1 without a manifest and keeps the
    shards written before; once the folder is gone, --resume labels the rest, each image once."""
    out = tmp_path / "ds"
    blocker = out / "labels" / "part-000002.parquet"
    blocker.mkdir(parents=True)
    paths = [*image_paths, *(str(tmp_path / f"missing-{i:02d}.jpg") for i in range(44))]  # 60 one-image shards
    args = [*paths, "--out", f"{out}/", "--shard-size", "1", "--model", str(tiny_bundle), "--threads", "1",
            "--batch-size", "2", "--decode-threads", "1", "--fetch-concurrency", "0"]  # 8 in flight  # fmt: skip
    failed = run_cli(*args)
    assert failed.exit_code == 1, failed.output
    assert "shard 000002 could not be written" in failed.output and "--resume" in failed.output
    assert "Traceback" not in failed.output
    assert not (out / "manifest.json").exists()
    assert set(shard_files(out)) == {"000000", "000001"}  # written before the failure, kept
    assert len(list((out / "shards").glob("0*.json"))) < len(paths) / 2  # no more submissions after it
    blocker.rmdir()
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "skipped (already done) 2" in resumed.output
    assert sorted(r["path"] for r in rows(out)) == sorted(paths)
    assert json.loads((out / "manifest.json").read_text())["counts"]["rows"] == len(paths)


def test_out_dir_that_is_a_file_is_one_line_error(tiny_bundle, image_paths, tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out in (f"{taken}/", f"{taken}/ds/"):
        result = run_cli(image_paths[0], "--out", out, "--model", str(tiny_bundle))
        assert result.exit_code == 1 and f"{taken} is a file, not a folder" in result.output, result.output


def test_resume_of_a_list_stored_with_repeats_writes_each_path_once(tiny_bundle, image_paths, tmp_path) -> None:
    """A shard list stored before repeats were left out (paths twice in one shard) still resumes."""
    out = tmp_path / "ds"
    stored = [*image_paths[:3], image_paths[0]]
    write_shard_source(out, "000000", stored, chain_hash(GENESIS, stored))
    write_index(out, 5000, ["000000"], len(stored), chain_hash(GENESIS, stored))
    service = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), OPTIONS)
    summary = run_local_dataset(stored, service, out, resume=True)
    assert summary.complete and summary.labeled == 3
    assert sorted(r["path"] for r in rows(out)) == image_paths[:3]


def test_a_slow_writer_holds_the_producer_back_and_a_failed_one_never_blocks_it() -> None:
    """At most `depth` finished shards wait in memory; after a failed write puts return at once
    (the shards are dropped), so the inference thread handing them over cannot hang."""
    from worker.local.shard_writer import ShardWriter

    release = threading.Event()
    writer = ShardWriter(Path("unused"), depth=2)
    writer.put("000000", release.wait)  # taken by the writer thread, which then waits
    writer.put("000001", lambda: None)
    writer.put("000002", lambda: None)
    fourth = threading.Thread(target=writer.put, args=("000003", lambda: None))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive()  # the queue is full: the producer waits for the writer
    release.set()
    fourth.join(5)
    writer.close()
    assert writer.written == ["000000", "000001", "000002", "000003"] and not writer.failed

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writer = ShardWriter(Path("unused"), depth=1)
    writer.put("000000", full_disk)
    for index in range(1, 20):
        writer.put(f"{index:06d}", lambda: None)  # would block forever if the failed writer stopped taking
    writer.close()
    assert writer.written == [] and writer.failed_shard == "000000"
    assert "No space left on device" in str(writer.error()) and "--resume" in str(writer.error())
