"""`DIR/manifest.json`: written once at the end of a run, beside its shards, atomically.

It says what the folder holds (counts, the shard list, the model, the run's settings, the schema
version), so a reader knows the run is complete and which files are its rows. Counts come from the
shard files' own footers, not from the caller, so the manifest cannot disagree with the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from worker.dataset.atomic import atomic_write
from worker.dataset.files import remove_shard, shard_files, shard_sort_key
from worker.dataset.object_path import (
    Location,
    LocationLike,
    as_location,
    file_size,
    open_for_parquet,
)
from worker.dataset.schema import (
    SCHEMA_VERSION,
    DatasetError,
    DatasetSpec,
    check_schema_version,
    dataset_schema,
)

MANIFEST = "manifest.json"


def manifest_path(out_dir: LocationLike) -> Location:
    return as_location(out_dir) / MANIFEST


def write_manifest(
    out_dir: Path | str,
    *,
    run_id: str,
    shard_ids: Iterable[str],
    spec: DatasetSpec,
    settings: Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
    remove_strays: bool = False,
    lineage: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Check that every shard of the run has a file of the run's schema and model, then write the
    manifest; returns it. A shard file that is not in `shard_ids` (a bisected parent a late worker
    wrote) would duplicate rows for every glob reader: refused, or deleted with `remove_strays`.
    `lineage`: the earlier datasets an incremental run built on (worker/delta/lineage.py)."""
    wanted = sorted({*shard_ids}, key=shard_sort_key)
    present = shard_files(out_dir)
    missing = [shard_id for shard_id in wanted if shard_id not in present]
    if missing:
        raise DatasetError(f"{out_dir}: {len(missing)} shard(s) without a file: {', '.join(missing[:10])}")
    strays = sorted(set(present) - set(wanted), key=shard_sort_key)
    if strays and not remove_strays:
        raise DatasetError(f"{out_dir}: shard file(s) not in the run: {', '.join(strays[:10])}")
    for stray in strays:
        remove_shard(out_dir, stray)
    shards = [_shard_entry(shard_id, present[shard_id], spec) for shard_id in wanted]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {**(model or {}), "sha256": spec.model_sha256, "precision": spec.precision},
        "embedding": (
            {"size": spec.embedding_size, "dtype": spec.embedding_dtype} if spec.embedding_size else None
        ),
        "settings": dict(settings),
        "counts": {key: sum(shard[key] for shard in shards) for key in ("rows", "labeled", "failed", "bytes")}
        | {"shards": len(shards)},
        "shards": shards,
    }
    if lineage:
        manifest["lineage"] = lineage
    data = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    atomic_write(manifest_path(out_dir), lambda handle: handle.write(data))
    return manifest


def read_manifest(out_dir: Path | str) -> dict[str, Any] | None:
    """The run's manifest, or None while the run has not finished (or never wrote here)."""
    try:
        manifest = json.loads(manifest_path(out_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if str(manifest.get("schema_version", "")).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise DatasetError(
            f"{out_dir}: manifest schema {manifest.get('schema_version')}, reader {SCHEMA_VERSION}"
        )
    return manifest


def _footer(path: Location) -> Any:
    """A shard file's footer (one small read), once its schema version is one this reader knows."""
    source = open_for_parquet(path)
    try:
        metadata = pq.read_metadata(source)
    finally:
        if source is not path:
            source.close()
    check_schema_version(metadata.schema.to_arrow_schema(), str(path))
    return metadata


def _failed_rows(path: Location, metadata: Any, model_sha256: str | None = None) -> int:
    """Rows with an error code, from the row groups' null counts; with `model_sha256`, every row
    group must have been labeled by that model."""
    names = metadata.schema.to_arrow_schema().names
    failed = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        code = row_group.column(names.index("error_code")).statistics
        sha = row_group.column(names.index("model_sha256")).statistics
        if code is None or not code.has_null_count or sha is None or not sha.has_min_max:
            raise DatasetError(f"{path}: written without statistics (not by write_shard)")
        if model_sha256 is not None and (sha.min != model_sha256 or sha.max != model_sha256):
            raise DatasetError(f"{path}: labeled by model {sha.min[:12]}..., the run's is {model_sha256[:12]}...")
        failed += row_group.num_rows - code.null_count
    return failed


def check_columns(path: Location, spec: DatasetSpec) -> Any:
    """The file's footer, once its columns are the run's; DatasetError says what differs."""
    metadata = _footer(path)
    schema = metadata.schema.to_arrow_schema()
    if not schema.equals(dataset_schema(spec), check_metadata=False):
        raise DatasetError(f"{path}: columns differ from the run's (model, embedding size or dtype)")
    return metadata


def file_counts(path: Location) -> tuple[int, int]:
    """(rows, failed rows) of a shard file, from its footer alone (no data read)."""
    metadata = _footer(path)
    return metadata.num_rows, _failed_rows(path, metadata)


def spec_of_shard_file(path: Location) -> DatasetSpec:
    """The run's spec as one of its shard files records it (model checksum and precision from the
    footer's statistics, the embedding from the columns): a manifest written by someone who never
    loaded the model (the reconciler) says what the rows say."""
    metadata = _footer(path)
    schema = metadata.schema.to_arrow_schema()
    names = schema.names
    if metadata.num_row_groups == 0:
        raise DatasetError(f"{path}: no rows to read the model from")
    group = metadata.row_group(0)
    sha = group.column(names.index("model_sha256")).statistics
    precision = group.column(names.index("precision")).statistics
    if sha is None or not sha.has_min_max or precision is None or not precision.has_min_max:
        raise DatasetError(f"{path}: written without statistics (not by write_shard)")
    size = dtype = None
    if "embedding" in names:
        field_type = schema.field("embedding").type
        size, dtype = field_type.list_size, str(field_type.value_type)
        dtype = {"float": "float32", "halffloat": "float16"}.get(dtype, dtype)
    return DatasetSpec(model_sha256=str(sha.min), precision=str(precision.min), embedding_size=size,
                       embedding_dtype=dtype or "float32")  # fmt: skip


def _shard_entry(shard_id: str, path: Location, spec: DatasetSpec) -> dict[str, Any]:
    """A shard's counts from its footer (row counts and error_code null counts: no data read)."""
    metadata = check_columns(path, spec)
    failed = _failed_rows(path, metadata, spec.model_sha256)
    return {
        "id": shard_id,
        "file": f"{path.parent.name}/{path.name}",
        "rows": metadata.num_rows,
        "labeled": metadata.num_rows - failed,
        "failed": failed,
        "bytes": file_size(path),
    }
