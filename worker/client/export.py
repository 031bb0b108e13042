"""`labeler results`: stream a run's records to JSONL, CSV or Parquet, never holding the run in memory.

Records come from HSCAN in batches; CSV and Parquet rows are written as they arrive (Parquet in row
groups of `rows_per_group`). Order is Redis's hash order, not input order.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.records import compact_json

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CSV_COLUMNS = ["path", "top1_index", "top1_label", "top1_score", "labels", "error_code", "error_message"]


class ExportError(ValueError):
    """The output file name names no format we write."""


def format_for(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: use a .jsonl, .csv or .parquet file name")
    return fmt


def export_records(records: Iterable[dict[str, Any]], out_path: Path, rows_per_group: int = 10000) -> int:
    """Write `records` to `out_path` in the format its extension names; returns the count."""
    fmt = format_for(out_path)
    if fmt == "jsonl":
        return _write_jsonl(records, out_path)
    if fmt == "csv":
        return _write_csv(records, out_path)
    return _write_parquet(records, out_path, rows_per_group)


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


def _write_parquet(records: Iterable[dict[str, Any]], out_path: Path, rows_per_group: int) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError("Parquet export needs pyarrow: pip install 'resnet-labeler[parquet]'") from None
    label = pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())])
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("labels", pa.list_(label)),
            ("error_code", pa.string()),
            ("error_message", pa.string()),
        ]
    )
    count = 0
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(str(out_path), schema) as writer:

        def write_group() -> None:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            rows.clear()

        for record in records:
            error = record.get("error") or {}
            rows.append(
                {
                    "path": record["path"],
                    "labels": record.get("labels"),
                    "error_code": error.get("code"),
                    "error_message": error.get("message"),
                }
            )
            count += 1
            if len(rows) >= rows_per_group:
                write_group()
        if rows or count == 0:
            write_group()
    return count
