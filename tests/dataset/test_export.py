"""`labeler results --out FILE.parquet` writes the dataset's own schema: the exported file and the
run's shard files read the same way, row for row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_records import MODEL_SHA, make_records

from worker.client.export import ExportError, export_records, export_run
from worker.dataset.files import ROWS_PER_GROUP, iter_records, shard_files, shard_path, write_shard
from worker.dataset.schema import VERSION_KEY, DatasetError, DatasetSpec, batch_to_records, records_to_table
from worker.records import SOURCE_COLUMNS

SPEC = DatasetSpec(MODEL_SHA, "fp16", embedding_size=8, embedding_dtype="float16")


def write_run(out, shards: int = 3, rows: int = 3000) -> list:
    for number in range(shards):
        write_shard(out, f"{number:06d}", make_records(rows, seed=number, embedding_size=8), SPEC, worker=f"w{number}")
    return list(shard_files(out).values())


def test_a_parquet_export_has_the_shards_schema_and_rows(tmp_path):
    shards = write_run(tmp_path / "run")
    out = tmp_path / "export.parquet"
    assert export_run(tmp_path / "run", out) == 9000
    exported = pq.read_table(out)
    assert exported.schema.equals(pq.read_schema(shards[0]), check_metadata=True)
    assert exported.equals(pa.concat_tables(pq.read_table(path) for path in shards))
    groups = pq.ParquetFile(out).metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [ROWS_PER_GROUP] * 2 + [808]
    records = [record for batch in exported.to_batches() for record in batch_to_records(batch)]
    assert json.dumps(records, default=list) == json.dumps(list(iter_records(tmp_path / "run")), default=list)


def test_errors_only_keeps_the_schema_and_the_error_rows(tmp_path):
    shards = write_run(tmp_path / "run", shards=2, rows=70)
    out = tmp_path / "errors.parquet"
    assert export_run(tmp_path / "run", out, errors_only=True) == 20
    exported = pq.read_table(out)
    assert exported.schema.equals(pq.read_schema(shards[0]), check_metadata=True)
    everything = pa.concat_tables(pq.read_table(path) for path in shards)
    assert exported.equals(everything.filter(everything["error_code"].is_valid()))


def test_a_shard_of_an_earlier_minor_version_comes_back_with_null_new_columns(tmp_path):
    """A run resumed across 1.0 -> 1.1: its old files lack the source columns; the export has
    them, null, as a 1.1 reader reads the old file."""
    run = tmp_path / "run"
    write_run(run, shards=1, rows=10)
    when = pq.read_table(shard_path(run, "000000"))["labeled_at"][0].as_py()
    old = records_to_table(make_records(5, seed=9, embedding_size=8), SPEC, shard_id="000001", worker="old",
                           labeled_at=when).drop_columns(list(SOURCE_COLUMNS))  # fmt: skip
    old = old.replace_schema_metadata({VERSION_KEY: b"1.0"})
    pq.write_table(old, shard_path(run, "000001"))
    out = tmp_path / "export.parquet"
    assert export_run(run, out) == 15
    exported = pq.read_table(out)
    assert exported.schema.equals(pq.read_schema(shard_path(run, "000000")), check_metadata=True)
    tail = exported.slice(10)
    assert all(tail[name].null_count == 5 for name in SOURCE_COLUMNS)
    assert tail.drop_columns(list(SOURCE_COLUMNS)).equals(old.replace_schema_metadata(exported.schema.metadata))


def test_a_shard_of_another_embedding_is_refused(tmp_path):
    run = tmp_path / "run"
    write_run(run, shards=1, rows=10)
    other = DatasetSpec(MODEL_SHA, "fp16", embedding_size=4, embedding_dtype="float16")
    write_shard(run, "000001", make_records(10, seed=3, embedding_size=4), other, worker="w")
    with pytest.raises(DatasetError, match="embedding"):
        export_run(run, tmp_path / "export.parquet")
    assert not (tmp_path / "export.parquet").exists(), "a failed export left a file that looks whole"


def test_a_run_without_a_shard_file_has_no_parquet_to_export(tmp_path):
    with pytest.raises(ExportError, match="no shard file"):
        export_run(tmp_path / "run", tmp_path / "export.parquet")
    assert export_run(tmp_path / "run", tmp_path / "export.jsonl") == 0


def test_jsonl_is_the_records_and_parquet_is_never_made_from_records(tmp_path):
    write_run(tmp_path / "run", shards=2, rows=30)
    out = tmp_path / "export.jsonl"
    assert export_run(tmp_path / "run", out, errors_only=True) == 8
    wanted = [record for record in iter_records(tmp_path / "run") if "error" in record]
    assert [json.loads(line) for line in out.read_text().splitlines()] == wanted
    with pytest.raises(ExportError, match="not from records"):
        export_records(iter(wanted), tmp_path / "records.parquet")
