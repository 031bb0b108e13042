"""The result dataset on real files: what a worker writes, every reader reads back the same.

Real pyarrow, real DuckDB, real processes for kills and concurrent writers; no mocks of the file
system. Records have today's shape (worker/records.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from dataset_records import MODEL_SHA, make_records, write_repeatedly

from worker.dataset.files import (
    ROWS_PER_GROUP,
    DatasetError,
    iter_batches,
    iter_records,
    remove_shard,
    remove_stale_temps,
    shard_files,
    shard_path,
    write_shard,
)
from worker.dataset.manifest import read_manifest, write_manifest
from worker.dataset.schema import SCHEMA_VERSION, VERSION_KEY, DatasetSpec, dataset_schema

HERE = Path(__file__).parent
REPO = HERE.parents[1]
WHEN = datetime(2026, 12, 1, 15, 30, tzinfo=UTC)


def by_path(records):
    return sorted(records, key=lambda record: record["path"])


def write_run(out, spec, shards: dict[str, list[dict]], worker="node-a"):
    return {
        shard_id: write_shard(out, shard_id, records, spec, worker=worker)
        for shard_id, records in shards.items()
    }


# --- schema and round trip -------------------------------------------------------------------------


def test_records_come_back_as_written_sorted_by_path(tmp_path, spec):
    records = make_records(50, seed=1)
    random.Random(3).shuffle(records)
    written = write_shard(tmp_path, "000001", records, spec, worker="node-a", labeled_at=WHEN)
    assert list(iter_records(tmp_path)) == by_path(records)
    assert (written.rows, written.failed, written.labeled) == (50, 7, 43)
    assert written.path == tmp_path / "labels" / "part-000001.parquet"
    assert written.bytes == written.path.stat().st_size


def test_schema_has_the_documented_types_and_version(tmp_path, spec):
    write_shard(tmp_path, "000001", make_records(10), spec, worker="node-a", labeled_at=WHEN)
    schema = pq.read_schema(shard_path(tmp_path, "000001"))
    assert schema.metadata[VERSION_KEY] == SCHEMA_VERSION.encode()
    assert {field.name: str(field.type) for field in schema} == {
        "path": "string",
        "top1_index": "int32",
        "top1_label": "string",
        "top1_score": "float",
        "topk_index": "list<element: int32>",
        "topk_label": "list<element: string>",
        "topk_score": "list<element: float>",
        "error_code": "string",
        "error_message": "string",
        "model_sha256": "string",
        "precision": "string",
        "worker": "string",
        "labeled_at": "timestamp[us, tz=UTC]",
        "shard_id": "string",
        "source_url": "string",  # 1.1: container samples (null for loose files)
        "source_key": "string",
        "source_row": "int64",
        "source_version": "string",  # 1.2: what was read (size:mtime_ns, an ETag)
    }
    required = {field.name for field in schema if not field.nullable}
    assert required == {"path", "model_sha256", "precision", "worker", "labeled_at", "shard_id"}


def test_labeled_and_error_rows_fill_exactly_their_own_columns(tmp_path, spec):
    records = make_records(14, seed=2)
    write_shard(tmp_path, "000007", records, spec, worker="gpu-node-3", labeled_at=WHEN)
    table = pq.read_table(shard_path(tmp_path, "000007"))
    rows = {row["path"]: row for row in table.to_pylist()}
    for record in records:
        row = rows[record["path"]]
        assert (row["shard_id"], row["worker"], row["precision"]) == ("000007", "gpu-node-3", "fp32")
        assert row["model_sha256"] == MODEL_SHA and row["labeled_at"] == WHEN
        if "error" in record:
            assert row["error_code"] == record["error"]["code"]
            assert row["error_message"] == record["error"]["message"]
            nulls = ["top1_index", "top1_label", "top1_score", "topk_index", "topk_label", "topk_score"]
            assert all(row[name] is None for name in nulls)
        else:
            labels = record["labels"]
            assert row["error_code"] is None and row["error_message"] is None
            assert (row["top1_index"], row["top1_label"]) == (labels[0]["index"], labels[0]["label"])
            assert row["top1_score"] == pytest.approx(labels[0]["score"], abs=1e-7)
            assert row["topk_label"] == [item["label"] for item in labels]
            assert row["topk_index"] == [item["index"] for item in labels]


def test_labeled_at_is_stored_in_utc_and_must_carry_a_zone(tmp_path, spec):
    paris = timezone(timedelta(hours=1))
    write_shard(tmp_path, "000001", make_records(3), spec, worker="n", labeled_at=WHEN.astimezone(paris))
    assert set(pq.read_table(shard_path(tmp_path, "000001"))["labeled_at"].to_pylist()) == {WHEN}
    with pytest.raises(DatasetError, match="time zone"):
        write_shard(tmp_path, "000002", make_records(3), spec, worker="n", labeled_at=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "dtype, tolerance, arrow_type", [("float32", 1e-6, "float"), ("float16", 4e-3, "halffloat")]
)
def test_embeddings_round_trip_in_the_requested_float_type(tmp_path, dtype, tolerance, arrow_type):
    spec = DatasetSpec(MODEL_SHA, "fp16", embedding_size=64, embedding_dtype=dtype)
    records = make_records(30, seed=4, embedding_size=64)
    records[0]["embedding"] = np.asarray(records[0]["embedding"], dtype=np.float32)  # a worker's NumPy row
    write_shard(tmp_path, "000001", records, spec, worker="n")
    column = pq.read_table(shard_path(tmp_path, "000001"))["embedding"]
    assert str(column.type) == f"fixed_size_list<element: {arrow_type}>[64]"
    assert column.null_count == sum("error" in record for record in records)
    back = {record["path"]: record for record in iter_records(tmp_path)}
    for record in records:
        if "error" in record:
            assert "embedding" not in back[record["path"]]
        else:
            assert back[record["path"]]["labels"] == record["labels"]
            assert np.allclose(
                back[record["path"]]["embedding"], record["embedding"], rtol=tolerance, atol=1e-6
            )


def test_float16_embeddings_take_about_half_the_bytes(tmp_path):
    records = make_records(300, seed=5, error_every=0, embedding_size=256)
    sizes = {}
    for dtype in ("float32", "float16"):
        spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=256, embedding_dtype=dtype)
        sizes[dtype] = write_shard(tmp_path / dtype, "000001", records, spec, worker="n").bytes
    assert 0.4 < sizes["float16"] / sizes["float32"] < 0.65


def test_no_embedding_column_unless_the_run_asked(tmp_path, spec):
    write_shard(tmp_path, "000001", make_records(5), spec, worker="n")
    assert "embedding" not in pq.read_schema(shard_path(tmp_path, "000001")).names


@pytest.mark.parametrize(
    "embedding_size, change, message",
    [
        (8, lambda record: record.pop("embedding"), "needs an embedding"),
        (8, lambda record: record.update(embedding=[0.0] * 9), "feature size is 8"),
        (None, lambda record: record.update(embedding=[0.0] * 8), "asked for none"),
    ],
)
def test_a_record_that_disagrees_with_the_runs_embeddings_is_refused(
    tmp_path, embedding_size, change, message
):
    spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=embedding_size)
    records = make_records(4, error_every=0, embedding_size=8)
    change(records[2])
    with pytest.raises(DatasetError, match=message):
        write_shard(tmp_path, "000001", records, spec, worker="n")
    assert shard_files(tmp_path) == {}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"path": "/a.jpg"}, "either labels or an error"),
        (
            {"path": "/a.jpg", "labels": [], "error": {"code": "x", "message": "y"}},
            "either labels or an error",
        ),
        ({"path": "/a.jpg", "labels": []}, "at least one label"),
        ({"path": "/a.jpg", "error": {"code": None, "message": "y"}}, "needs a code"),
        ({"path": "", "labels": [{"index": 1, "label": "x", "score": 0.5}]}, "path"),
        ({"path": "/a.jpg", "labels": [{"index": "one", "label": "x", "score": 0.5}]}, "does not fit"),
        ({"path": "/a.jpg", "labels": [{"label": "x", "score": 0.5}]}, "does not fit"),
    ],
)
def test_malformed_records_are_refused_and_nothing_is_written(tmp_path, spec, record, message):
    with pytest.raises(DatasetError, match=message):
        write_shard(tmp_path, "000001", [*make_records(3), record], spec, worker="n")
    assert shard_files(tmp_path) == {}


def test_two_records_for_one_path_are_refused(tmp_path, spec):
    records = make_records(5)
    with pytest.raises(DatasetError, match="two records"):
        write_shard(tmp_path, "000001", [*records, dict(records[3])], spec, worker="n")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_sha256": "abc"}, "64 lowercase hex"),
        ({"model_sha256": MODEL_SHA.upper()}, "64 lowercase hex"),
        ({"precision": ""}, "precision"),
        ({"embedding_size": 0}, "positive"),
        ({"embedding_size": 8, "embedding_dtype": "float64"}, "embedding_dtype"),
    ],
)
def test_a_bad_spec_is_refused(fields, message):
    with pytest.raises(DatasetError, match=message):
        DatasetSpec(**{"model_sha256": MODEL_SHA, "precision": "fp32", **fields})


def test_the_dataset_modules_load_without_celery_or_the_engine():
    probe = (
        "import sys, worker.dataset.files, worker.dataset.manifest; "
        "print(sorted(m for m in ('celery', 'worker.pipeline', 'worker.celery_worker', 'cv2', 'onnxruntime') "
        "if m in sys.modules))"
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == "[]"


# --- shard ids and file names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shard_id",
    ["", "123", "00012a", "000123.2", "000123.", "000123..0", "../000123", "000123/1", " 000123", 123],
)
def test_bad_shard_ids_are_refused_before_anything_is_written(tmp_path, spec, shard_id):
    with pytest.raises(DatasetError, match="bad shard id"):
        write_shard(tmp_path, shard_id, make_records(2), spec, worker="n")
    with pytest.raises(DatasetError, match="bad shard id"):
        shard_path(tmp_path, shard_id)
    assert not (tmp_path / "labels").exists() or not any((tmp_path / "labels").iterdir())


def test_shard_files_lists_shards_in_numeric_order_and_nothing_else(tmp_path, spec):
    for shard_id in ["000010", "000002.1", "000002.0.1", "1000000", "000009"]:
        write_shard(tmp_path, shard_id, make_records(2, seed=int(shard_id[:6])), spec, worker="n")
    folder = tmp_path / "labels"
    for junk in ["notes.txt", "part-abc.parquet", "part-000001.parquet.bak", ".part-000003.parquet.1-ab.tmp"]:
        (folder / junk).write_bytes(b"not a shard")
    (folder / "part-000004.parquet").mkdir()
    assert list(shard_files(tmp_path)) == ["000002.0.1", "000002.1", "000009", "000010", "1000000"]
    assert shard_files(tmp_path / "nothing-here") == {}


# --- the folder as one table, read with no help from us --------------------------------------------


@pytest.fixture
def run_dir(tmp_path, spec) -> Path:
    """Three shards (one bisected into halves), 7 records in 7 are errors, plus a stale temp file."""
    shards = {
        "000001": make_records(40, seed=1),
        "000002.0": make_records(21, seed=2),
        "000003": make_records(7, seed=3),
    }
    write_run(tmp_path, spec, shards)
    (tmp_path / "labels" / ".part-000004.parquet.99-dead.tmp").write_bytes(b"PAR1 half a file")
    return tmp_path


def test_the_folder_reads_as_one_table_in_pyarrow_dataset(run_dir):
    table = ds.dataset(run_dir / "labels", format="parquet").to_table()
    assert table.num_rows == 68
    assert sorted(set(table["shard_id"].to_pylist())) == ["000001", "000002.0", "000003"]
    assert table["error_code"].null_count == 68 - (5 + 3 + 1)
    assert table.schema.field("topk_score").type == pa.list_(pa.float32())


def test_the_folder_reads_as_one_table_in_pandas(run_dir):
    import pandas as pd
    frame = pd.read_parquet(run_dir / "labels")
    assert len(frame) == 68 and frame["path"].is_unique
    assert int(frame["error_code"].notna().sum()) == 9


def test_duckdb_reads_the_glob_with_no_help(run_dir):
    duckdb = pytest.importorskip("duckdb")
    glob = f"'{run_dir}/labels/*.parquet'"
    rows, failed, paths = duckdb.sql(
        f"SELECT count(*), count(error_code), count(DISTINCT path) FROM {glob}"
    ).fetchall()[0]
    assert (rows, failed, paths) == (68, 9, 68)
    top1 = duckdb.sql(
        f"SELECT top1_label, top1_score, topk_label[1], len(topk_index), labeled_at FROM {glob} "
        "WHERE error_code IS NULL ORDER BY path LIMIT 1"
    ).fetchall()[0]
    first = min((record for record in iter_records(run_dir) if "labels" in record), key=lambda r: r["path"])
    assert top1[0] == top1[2] == first["labels"][0]["label"]
    assert top1[1] == pytest.approx(first["labels"][0]["score"], abs=1e-7)
    assert top1[3] == 5 and top1[4].utcoffset() == timedelta(0)


def test_duckdb_reads_float16_and_float32_embeddings(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    for dtype in ("float32", "float16"):
        spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=16, embedding_dtype=dtype)
        records = make_records(10, embedding_size=16)
        write_shard(tmp_path / dtype, "000001", records, spec, worker="n")
        got = duckdb.sql(
            f"SELECT path, embedding FROM '{tmp_path / dtype}/labels/*.parquet' WHERE embedding IS NOT NULL ORDER BY path"
        ).fetchall()
        want = [(r["path"], r["embedding"]) for r in by_path(records) if "labels" in r]
        assert [path for path, _ in got] == [path for path, _ in want]
        assert np.allclose(
            [e for _, e in got], [e for _, e in want], rtol=4e-3 if dtype == "float16" else 1e-6
        )


# --- atomic, deterministic rewrites -----------------------------------------------------------------


def test_a_rewritten_shard_has_the_same_bytes_whatever_the_record_order(tmp_path, spec):
    records = make_records(60, seed=8)
    first = write_shard(tmp_path, "000005", records, spec, worker="n", labeled_at=WHEN)
    before = first.path.read_bytes()
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    again = write_shard(tmp_path, "000005", shuffled, spec, worker="n", labeled_at=WHEN)
    assert again.path.read_bytes() == before
    assert list(shard_files(tmp_path)) == ["000005"]
    assert [p.name for p in (tmp_path / "labels").iterdir()] == ["part-000005.parquet"]


KILL_BEFORE_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime
    import worker.dataset.atomic as atomic
    from dataset_records import MODEL_SHA, make_records, write_repeatedly
    from worker.dataset.files import write_shard
    from worker.dataset.schema import DatasetSpec

    atomic.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
    write_shard(sys.argv[1], "000001", make_records(500, seed=9), DatasetSpec(MODEL_SHA, "fp32"), worker="killed")
    """
)


@pytest.mark.parametrize("earlier_file", [False, True])
def test_a_writer_killed_between_temp_write_and_rename_leaves_nothing_partial(tmp_path, spec, earlier_file):
    duckdb = pytest.importorskip("duckdb")
    earlier = make_records(20, seed=1)
    if earlier_file:
        write_shard(tmp_path, "000001", earlier, spec, worker="earlier")
    child = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_RENAME, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])},
    )
    assert child.returncode == -9
    temps = list((tmp_path / "labels").glob(".part-000001.parquet.*.tmp"))
    assert len(temps) == 1 and pq.read_metadata(temps[0]).num_rows == 500  # whole, fsynced, never renamed
    expected = by_path(earlier) if earlier_file else []
    assert list(iter_records(tmp_path)) == expected
    assert list(shard_files(tmp_path)) == (["000001"] if earlier_file else [])
    assert ds.dataset(tmp_path / "labels", format="parquet").count_rows() == len(expected)
    if earlier_file:
        assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/labels/*.parquet'").fetchall()[0][0] == 20
    assert remove_stale_temps(tmp_path) == []  # young: it could be a live writer's
    assert remove_stale_temps(tmp_path, older_than_s=0) == temps
    assert not temps[0].exists()


def test_a_shards_stale_temp_files_are_cleaned_by_its_next_write_but_not_a_live_writers(tmp_path, spec):
    folder = tmp_path / "labels"
    folder.mkdir()
    stale = folder / ".part-000001.parquet.123-aaaa.tmp"
    live = folder / ".part-000001.parquet.456-bbbb.tmp"
    other = folder / ".part-000002.parquet.789-cccc.tmp"
    for temp in (stale, live, other):
        temp.write_bytes(b"partial")
    old = time.time() - 3600
    for temp in (stale, other):
        os.utime(temp, (old, old))
    write_shard(tmp_path, "000001", make_records(3), spec, worker="n")
    assert (stale.exists(), live.exists(), other.exists()) == (False, True, True)
    assert remove_stale_temps(tmp_path) == [other]


def test_concurrent_writers_of_one_shard_end_with_one_whole_file(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    writers = [
        context.Process(target=write_repeatedly, args=(str(tmp_path), f"node-{n}", start, 12))
        for n in range(2)
    ]
    for process in writers:
        process.start()
    start.wait()
    path = shard_path(tmp_path, "000042")
    reads = set()
    while any(process.is_alive() for process in writers):
        try:
            table = pq.read_table(path, columns=["path", "worker"])
        except FileNotFoundError:
            continue  # before the first rename
        assert table.num_rows == 2000  # never a partial file
        reads.add(table["worker"][0].as_py())
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    assert [p.name for p in (tmp_path / "labels").iterdir()] == ["part-000042.parquet"]
    table = pq.read_table(path)
    assert table.num_rows == 2000 and len(set(table["worker"].to_pylist())) == 1
    assert table["path"].to_pylist() == [record["path"] for record in by_path(make_records(2000, seed=11))]
    assert reads, "the reader never saw the file while the writers ran"


def test_remove_shard_deletes_only_that_shard(tmp_path, spec):
    write_run(tmp_path, spec, {"000001": make_records(3), "000001.0": make_records(2, seed=2)})
    assert remove_shard(tmp_path, "000001") is True
    assert remove_shard(tmp_path, "000001") is False
    assert list(shard_files(tmp_path)) == ["000001.0"]


# --- reading back: streaming, versions --------------------------------------------------------------


def _peak_arrow_bytes(batches) -> tuple[int, int]:
    """(rows, the most Arrow memory held at once) while consuming `batches`."""
    pool = pa.default_memory_pool()
    baseline, peak, rows = pool.bytes_allocated(), 0, 0
    for batch in batches:
        assert batch.num_rows <= 1000
        rows += batch.num_rows
        peak = max(peak, pool.bytes_allocated() - baseline)
    return rows, peak


def test_iter_batches_holds_a_row_group_at_a_time_however_big_the_dataset(tmp_path):
    spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=256)
    block = np.random.default_rng(0).random((8192, 256), dtype=np.float32)  # 8 MiB: two row groups
    records = make_records(8192, error_every=0)
    for record, row in zip(records, block, strict=True):
        record["embedding"] = row
    write_run(tmp_path, spec, {shard_id: records for shard_id in ("000001", "000002", "000003", "000004")})
    one_rows, one_peak = _peak_arrow_bytes(iter_batches(tmp_path, shard_ids=["000001"], batch_rows=1000))
    all_rows, all_peak = _peak_arrow_bytes(iter_batches(tmp_path, batch_rows=1000))
    assert (one_rows, all_rows) == (8192, 4 * 8192)
    row_group = ROWS_PER_GROUP * 256 * 4
    assert all_peak < 3 * row_group, f"{all_peak / 2**20:.1f} MiB held for 32 MiB of embeddings"
    assert all_peak < 1.2 * one_peak + 2**20, (one_peak, all_peak)


def test_iter_records_reads_only_the_shards_asked_for_and_all_must_exist(run_dir):
    assert {record["path"] for record in iter_records(run_dir, shard_ids=["000003"])} == {
        record["path"] for record in make_records(7, seed=3)
    }
    with pytest.raises(DatasetError, match="no file for shard"):
        list(iter_records(run_dir, shard_ids=["000001", "000099"]))


@pytest.mark.parametrize("metadata", [None, {VERSION_KEY: b"2.0"}])
def test_a_file_of_another_schema_major_or_not_ours_is_refused(tmp_path, spec, metadata):
    write_shard(tmp_path, "000001", make_records(3), spec, worker="n")
    table = pq.read_table(shard_path(tmp_path, "000001")).replace_schema_metadata(metadata)
    pq.write_table(table, shard_path(tmp_path, "000002"))
    assert len(list(iter_records(tmp_path, shard_ids=["000001"]))) == 3
    with pytest.raises(
        DatasetError, match="schema version 2.0" if metadata else "not a resnet-labeler shard"
    ):
        list(iter_records(tmp_path))


def test_a_new_minor_version_with_an_added_column_still_reads(tmp_path, spec):
    write_shard(tmp_path, "000001", make_records(3), spec, worker="n")
    table = pq.read_table(shard_path(tmp_path, "000001"))
    table = table.append_column("future_column", pa.array([1, 2, 3]))
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"1.7"}), shard_path(tmp_path, "000001"))
    assert list(iter_records(tmp_path)) == by_path(make_records(3))


# --- manifest ---------------------------------------------------------------------------------------


def test_the_manifest_counts_what_the_files_hold(run_dir, spec):
    manifest = write_manifest(
        run_dir,
        run_id="photos-2026-12",
        shard_ids=["000003", "000001", "000002.0"],
        spec=spec,
        settings={"top_k": 5, "shard_size": 40},
        model={"name": "resnet50"},
    )
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert on_disk == manifest == read_manifest(run_dir)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["run_id"] == "photos-2026-12"
    assert manifest["model"] == {"name": "resnet50", "sha256": MODEL_SHA, "precision": "fp32"}
    assert manifest["settings"] == {"top_k": 5, "shard_size": 40} and manifest["embedding"] is None
    assert [shard["id"] for shard in manifest["shards"]] == ["000001", "000002.0", "000003"]
    assert manifest["counts"] == {
        "rows": 68,
        "labeled": 59,
        "failed": 9,
        "shards": 3,
        "bytes": sum(path.stat().st_size for path in shard_files(run_dir).values()),
    }
    assert manifest["shards"][0] == {
        "id": "000001",
        "file": "labels/part-000001.parquet",
        "rows": 40,
        "labeled": 35,
        "failed": 5,
        "bytes": shard_path(run_dir, "000001").stat().st_size,
    }
    assert [p.name for p in run_dir.glob("*manifest*")] == ["manifest.json"]


def test_no_manifest_before_the_run_ends(run_dir):
    assert read_manifest(run_dir) is None


def test_the_manifest_refuses_a_missing_shard_and_a_stray_file_unless_told_to_remove_it(run_dir, spec):
    with pytest.raises(DatasetError, match="without a file: 000004"):
        write_manifest(
            run_dir, run_id="r", shard_ids=["000001", "000002.0", "000003", "000004"], spec=spec, settings={}
        )
    with pytest.raises(DatasetError, match="not in the run: 000003"):
        write_manifest(run_dir, run_id="r", shard_ids=["000001", "000002.0"], spec=spec, settings={})
    assert read_manifest(run_dir) is None
    manifest = write_manifest(
        run_dir, run_id="r", shard_ids=["000001", "000002.0"], spec=spec, settings={}, remove_strays=True
    )
    assert manifest["counts"]["rows"] == 61 and list(shard_files(run_dir)) == ["000001", "000002.0"]


def test_the_manifest_refuses_shards_of_another_model_or_embedding(tmp_path, spec):
    other = DatasetSpec("0" * 64, "fp32")
    write_run(tmp_path, spec, {"000001": make_records(3)})
    write_shard(tmp_path, "000002", make_records(3, seed=2), other, worker="n")
    with pytest.raises(DatasetError, match="labeled by model 000000000000"):
        write_manifest(tmp_path, run_id="r", shard_ids=["000001", "000002"], spec=spec, settings={})
    remove_shard(tmp_path, "000002")
    with_embedding = DatasetSpec(MODEL_SHA, "fp32", embedding_size=4)
    with pytest.raises(DatasetError, match="columns differ"):
        write_manifest(tmp_path, run_id="r", shard_ids=["000001"], spec=with_embedding, settings={})
    assert read_manifest(tmp_path) is None


def test_dataset_schema_is_the_files_schema(tmp_path):
    spec = DatasetSpec(MODEL_SHA, "int8", embedding_size=2048, embedding_dtype="float16")
    write_shard(tmp_path, "000001", [], spec, worker="n")
    assert pq.read_schema(shard_path(tmp_path, "000001")).equals(dataset_schema(spec), check_metadata=True)
    assert list(iter_records(tmp_path)) == []
