"""The run's result dataset: one Parquet file per shard under `DIR/labels/`, written atomically.

A shard's file has a deterministic name and its rows a deterministic order (by path), so a
redelivered, duplicated or concurrent run of the same shard replaces the file with the same rows
instead of adding rows. The folder is a plain Parquet dataset: pyarrow, pandas and DuckDB
(`SELECT ... FROM 'DIR/labels/*.parquet'`) read it without this module. Schema: docs/dataset.md.

Needs only pyarrow (and NumPy): it loads on a client machine without Celery or the engine.
DIR may be an object URL (`s3://bucket/prefix/`): each file is then one PUT (worker/dataset/object_path.py).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from worker.dataset.atomic import TEMP_SUFFIX, atomic_write, ensure_dir, fsync_dir, temp_glob
from worker.dataset.object_path import Location, LocationLike, ObjectPath, as_location, open_for_parquet
from worker.dataset.schema import (
    DICTIONARY_COLUMNS,
    DatasetError,
    DatasetSpec,
    batch_to_records,
    check_schema_version,
    records_to_table,
)

LABELS_DIR = "labels"
# A shard id: at least six zero-padded digits, then one ".0" / ".1" per bisection (000123.1.0).
SHARD_ID = re.compile(r"^[0-9]{6,}(?:\.[01])*$")
_SHARD_FILE = re.compile(r"^part-(?P<id>[0-9]{6,}(?:\.[01])*)\.parquet$")
# Row groups bound a reader's memory: 4,096 rows of 2048-d float32 embeddings are 32 MiB.
ROWS_PER_GROUP = 4096
COMPRESSION = "zstd"
# How every Parquet file of the dataset's schema is written: shard files and `labeler results` alike.
WRITE_OPTIONS = {"compression": COMPRESSION, "use_dictionary": DICTIONARY_COLUMNS, "write_statistics": True}
# A temporary file this old has no live writer (a 10k-row shard with embeddings takes ~1 s).
STALE_TEMP_S = 15 * 60.0


@dataclass(frozen=True)
class ShardFile:
    """What the ledger records for a written shard."""

    shard_id: str
    path: Location
    rows: int
    labeled: int
    failed: int
    bytes: int


def check_shard_id(shard_id: str) -> str:
    """`shard_id` if it is one (it becomes part of a file name), else DatasetError."""
    if not isinstance(shard_id, str) or not SHARD_ID.match(shard_id):
        raise DatasetError(f"bad shard id {shard_id!r}: six or more digits, then .0/.1 per bisection")
    return shard_id


def shard_sort_key(shard_id: str) -> tuple[int, ...]:
    """Numeric order: 000002 < 000010, and a bisected shard's halves right after their parent."""
    return tuple(int(part) for part in shard_id.split("."))


def labels_dir(out_dir: LocationLike) -> Location:
    return as_location(out_dir) / LABELS_DIR


def shard_path(out_dir: LocationLike, shard_id: str) -> Location:
    """Where shard `shard_id` of the run writing into `out_dir` lives."""
    return labels_dir(out_dir) / f"part-{check_shard_id(shard_id)}.parquet"


def write_shard(
    out_dir: Path | str,
    shard_id: str,
    records: Iterable[dict[str, Any]],
    spec: DatasetSpec,
    *,
    worker: str,
    labeled_at: datetime | None = None,
) -> ShardFile:
    """Write one shard's records as its Parquet file, atomically and durably; returns what the
    ledger needs. Call it once per shard with every record of the shard: the file replaces any
    earlier one of the same shard. A path may appear once only."""
    final = shard_path(out_dir, shard_id)
    rows = sorted(records, key=lambda record: record.get("path") or "")
    _refuse_duplicate_paths(rows, shard_id)
    try:
        table = records_to_table(
            rows, spec, shard_id=shard_id, worker=worker, labeled_at=labeled_at or datetime.now(UTC)
        )
    except DatasetError as exc:
        raise DatasetError(f"shard {shard_id}: {exc}") from exc
    except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"shard {shard_id}: a record does not fit the schema ({exc!r})") from exc
    ensure_dir(final.parent)
    size = atomic_write(final, lambda handle: _write_parquet(table, handle))
    remove_stale_temps(out_dir, shard_id=shard_id)
    failed = sum(1 for record in rows if "error" in record)
    return ShardFile(shard_id, final, len(rows), len(rows) - failed, failed, size)


def _refuse_duplicate_paths(rows: Sequence[dict[str, Any]], shard_id: str) -> None:
    for before, after in zip(rows, rows[1:], strict=False):
        if before.get("path") == after.get("path"):
            raise DatasetError(f"shard {shard_id}: {after.get('path')!r} has two records")


def _write_parquet(table: pa.Table, handle: Any) -> None:
    pq.write_table(table, handle, row_group_size=ROWS_PER_GROUP, **WRITE_OPTIONS)


def shard_files(out_dir: LocationLike) -> dict[str, Location]:
    """The shard files present (for resume), in shard order. Temporary files are not shards."""
    folder = labels_dir(out_dir)
    found: dict[str, Location] = {}
    if isinstance(folder, ObjectPath):
        for child in folder.iterdir():
            match = _SHARD_FILE.match(child.name)
            if match:
                found[match["id"]] = child
    elif folder.is_dir():
        for entry in os.scandir(folder):
            match = _SHARD_FILE.match(entry.name)
            if match and entry.is_file():
                found[match["id"]] = Path(entry.path)
    return {shard_id: found[shard_id] for shard_id in sorted(found, key=shard_sort_key)}


def remove_shard(out_dir: Path | str, shard_id: str) -> bool:
    """Delete a shard's file (e.g. a bisected parent that a late worker still wrote): its rows
    belong to its halves now. True if there was one."""
    path = shard_path(out_dir, shard_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def remove_stale_temps(
    out_dir: Path | str, *, shard_id: str | None = None, older_than_s: float = STALE_TEMP_S
) -> list[Path]:
    """Delete temporary files that writers killed before their rename left behind, of one shard
    or of all. Only files older than `older_than_s`: a younger one may be a live writer's."""
    folder = labels_dir(out_dir)
    if isinstance(folder, ObjectPath) or not folder.is_dir():
        return []  # an object store has no temporary files: a PUT is whole or absent
    pattern = temp_glob(shard_path(out_dir, shard_id)) if shard_id else f".part-*{TEMP_SUFFIX}"
    cutoff = time.time() - older_than_s
    removed = []
    for temp in folder.glob(pattern):
        try:
            if temp.stat().st_mtime <= cutoff:
                temp.unlink()
                removed.append(temp)
        except FileNotFoundError:
            continue  # another cleaner, or its writer's rename, got there first
    return removed


def iter_batches(
    out_dir: Path | str, *, shard_ids: Iterable[str] | None = None, batch_rows: int = ROWS_PER_GROUP,
    columns: Sequence[str] | None = None,
) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """The dataset's rows as Arrow batches, shard by shard, one row group in memory at a time.
    `shard_ids`: only these shards (e.g. a manifest's list), each of which must exist; default:
    every shard file present. `columns`: only those of them a file has (an older minor lacks some)."""
    present = shard_files(out_dir)
    if shard_ids is None:
        paths = list(present.values())
    else:
        wanted = [check_shard_id(shard_id) for shard_id in shard_ids]
        missing = [shard_id for shard_id in wanted if shard_id not in present]
        if missing:
            raise DatasetError(f"{labels_dir(out_dir)}: no file for shard(s) {', '.join(missing[:10])}")
        paths = [present[shard_id] for shard_id in wanted]
    for path in paths:
        source = open_for_parquet(path)
        try:
            with pq.ParquetFile(source) as parquet:
                check_schema_version(parquet.schema_arrow, str(path))
                names = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                yield from parquet.iter_batches(batch_size=batch_rows, columns=names)
        finally:
            if source is not path:
                source.close()


def iter_records(
    out_dir: Path | str, *, shard_ids: Iterable[str] | None = None, batch_rows: int = ROWS_PER_GROUP
) -> Iterator[dict[str, Any]]:
    """The dataset as records of today's shape (what `labeler results` writes as JSONL or CSV),
    streaming; in shard order, by path within a shard."""
    for batch in iter_batches(out_dir, shard_ids=shard_ids, batch_rows=batch_rows):
        yield from batch_to_records(batch)
