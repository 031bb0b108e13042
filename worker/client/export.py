"""`labeler results`: a run's dataset as one JSONL, CSV or Parquet file, never holding the run in memory.

Rows come shard by shard, by path within a shard, as the dataset stores them (with its lineage:
newest dataset first, each path once). A Parquet export is the dataset's own schema
(docs/dataset.md) and its rows as the shard files hold them, so the file and the run's
`labels/*.parquet` read the same way; JSONL and CSV carry the records (worker/records.py) those
rows give back.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.dataset.files import ROWS_PER_GROUP, WRITE_OPTIONS, iter_batches
from worker.dataset.schema import batch_to_records, conform_batch, schema_of_rows
from worker.delta.union import iter_union_batches
from worker.records import compact_json

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CSV_COLUMNS = ["path", "top1_index", "top1_label", "top1_score", "labels", "error_code", "error_message"]


class ExportError(ValueError):
    """The output file name names no format we write, or there are no rows to give a Parquet file its schema."""


def format_for(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: use a .jsonl, .csv or .parquet file name")
    return fmt


def export_run(location: str, out_path: Path, *, errors_only: bool = False, with_lineage: bool = False) -> int:
    """Write the dataset at `location` (a folder or URL) to `out_path` in the format its extension
    names; returns the count of rows. `errors_only`: only the rows of images that failed;
    `with_lineage`: the datasets it built on too, each path's newest row."""
    fmt = format_for(out_path)
    batches = _rows(location, errors_only, with_lineage)
    if fmt == "parquet":
        return _write_parquet(batches, out_path, location)
    return export_records((record for batch in batches for record in batch_to_records(batch)), out_path)


def _rows(location: str, errors_only: bool, with_lineage: bool) -> Iterator[pa.RecordBatch]:
    for batch in iter_union_batches(location) if with_lineage else iter_batches(location):
        yield batch.filter(pc.is_valid(batch.column("error_code"))) if errors_only else batch


def export_records(records: Iterable[dict[str, Any]], out_path: Path) -> int:
    """Write `records` as JSONL or CSV (by the extension); returns the count. Parquet is written
    from the dataset's rows (`export_run`): records no longer say which shard, worker and time."""
    fmt = format_for(out_path)
    if fmt == "jsonl":
        return _write_jsonl(records, out_path)
    if fmt == "csv":
        return _write_csv(records, out_path)
    raise ExportError(f"{out_path}: Parquet is written from a run's dataset, not from records")


def _write_jsonl(records: Iterable[dict[str, Any]], out_path: Path) -> int:
    count = 0
    with open(out_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(compact_json(record) + "\n")
            count += 1
    return count


def _flat_row(record: dict[str, Any]) -> dict[str, Any]:
    labels = record.get("labels") or []
    error = record.get("error") or {}
    top = labels[0] if labels else {}
    return {
        "path": record["path"],
        "top1_index": top.get("index"),
        "top1_label": top.get("label"),
        "top1_score": top.get("score"),
        "labels": compact_json(labels) if labels else None,
        "error_code": error.get("code"),
        "error_message": error.get("message"),
    }


def _write_csv(records: Iterable[dict[str, Any]], out_path: Path) -> int:
    count = 0
    with open(out_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(_flat_row(record))
            count += 1
    return count


def _write_parquet(batches: Iterator[pa.RecordBatch], out_path: Path, location: str) -> int:
    """The rows into one file of this version's schema, with the first file's embedding column (a
    file of another embedding is refused, DatasetError), in row groups as large as a shard file's
    (a reader holds one at a time). A failed export leaves no file that looks whole."""
    first = next(batches, None)
    if first is None:
        raise ExportError(f"{location}: no shard file yet, so no rows to give a Parquet file its schema")
    schema = schema_of_rows(first.schema)
    count = 0
    try:
        with pq.ParquetWriter(str(out_path), schema, **WRITE_OPTIONS) as writer:
            for group in _row_groups((conform_batch(batch, schema) for batch in chain([first], batches)), schema):
                writer.write_table(group, row_group_size=ROWS_PER_GROUP)
                count += group.num_rows
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return count


def _row_groups(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.Table]:
    """Batches regrouped into tables of ROWS_PER_GROUP rows (the last one: what is left), so small
    shards do not make small row groups; at most two groups' rows are held."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        held.append(batch)
        rows += batch.num_rows
        if rows >= ROWS_PER_GROUP:
            table = pa.Table.from_batches(held, schema)
            full = rows - rows % ROWS_PER_GROUP
            yield table.slice(0, full)
            held, rows = table.slice(full).to_batches(), rows - full
    if rows:
        yield pa.Table.from_batches(held, schema)
