"""The result dataset's columns (a stable contract, docs/dataset.md) and records <-> Arrow rows.

Records keep today's shape (`{"path", "labels": [...], "embedding"?}` or `{"path", "error": {...}}`)
on both sides, so workers, `labeler run` and `labeler results` change where rows go, not what they say.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from worker.records import SOURCE_COLUMNS
from worker.sidecar import ModelSpec

# Major.minor: a reader accepts every minor of its major. A minor may only add nullable columns;
# renaming, retyping or removing a column is a new major.
SCHEMA_VERSION = "1.2"  # 1.1 added source_url, source_key, source_row (container samples); 1.2 source_version
VERSION_KEY = b"resnet_labeler.schema_version"
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DatasetError(ValueError):
    """A record, setting, shard id or file that the dataset's contract cannot hold or read."""


@dataclass(frozen=True)
class DatasetSpec:
    """What every shard of one run shares: the model, and whether rows carry an embedding."""

    model_sha256: str
    precision: str
    embedding_size: int | None = None  # the model's feature size; None: no embedding column
    embedding_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not _SHA256.match(self.model_sha256):
            raise DatasetError(f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}")
        if not self.precision:
            raise DatasetError("precision must be named (fp32, fp16, int8, ...)")
        if self.embedding_size is not None and self.embedding_size < 1:
            raise DatasetError(f"embedding_size must be positive, got {self.embedding_size}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise DatasetError(f"embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}")


    @classmethod
    def for_model(cls, model: ModelSpec, precision: str, embeddings: bool, embedding_dtype: str) -> DatasetSpec:
        """The spec of a run served by the bundle `model` at `precision` (a bundle without a
        recorded checksum writes zeros)."""
        return cls(
            model_sha256=model.model_for(precision)[1] or "0" * 64,
            precision=precision,
            embedding_size=model.feature_size if embeddings else None,
            embedding_dtype=embedding_dtype,
        )


def _element(value_type: pa.DataType) -> pa.Field:
    """List items named as Parquet names them ("element"), so this schema equals the one read back."""
    return pa.field("element", value_type)


def dataset_schema(spec: DatasetSpec) -> pa.Schema:
    """The Arrow schema of every shard file of a run made with `spec`."""
    if spec.embedding_size is None:
        return _schema(None)
    return _schema(pa.list_(_element(EMBEDDING_DTYPES[spec.embedding_dtype]), spec.embedding_size))


def schema_of_rows(found: pa.Schema) -> pa.Schema:
    """This version's schema for the rows of a file of schema `found` (any minor of this major):
    its embedding column, if it has one, and every column this version writes."""
    return _schema(found.field("embedding").type if "embedding" in found.names else None)


def _schema(embedding: pa.DataType | None) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("top1_index", pa.int32()),
        pa.field("top1_label", pa.string()),
        pa.field("top1_score", pa.float32()),
        pa.field("topk_index", pa.list_(_element(pa.int32()))),
        pa.field("topk_label", pa.list_(_element(pa.string()))),
        pa.field("topk_score", pa.list_(_element(pa.float32()))),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
    ]
    if embedding is not None:
        fields.append(pa.field("embedding", embedding))
    fields += [
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("precision", pa.string(), nullable=False),
        pa.field("worker", pa.string(), nullable=False),
        pa.field("labeled_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        # Where a container's sample came from (null for loose files): the shard file's URL or path,
        # the sample's key (a tar's __key__, a Parquet file's key column), its ordinal in the file.
        pa.field("source_url", pa.string()),
        pa.field("source_key", pa.string()),
        pa.field("source_row", pa.int64()),
        # The version of what was read (worker/sources/version.py): `size:mtime_ns` of a file, an
        # object's ETag, a container file's for each of its samples. Incremental runs compare it.
        pa.field("source_version", pa.string()),
    ]
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode()})


# Columns Parquet stores dictionary-encoded: few distinct values per file (1,000 classes, a handful
# of error codes, one model, worker, time and shard per file). Paths, scores and embeddings are
# nearly unique per row, where a dictionary only costs.
DICTIONARY_COLUMNS = [
    "top1_index",
    "top1_label",
    "topk_index",
    "topk_label",
    "error_code",
    "error_message",
    "model_sha256",
    "precision",
    "worker",
    "labeled_at",
    "shard_id",
    "source_url",
]


def check_schema_version(schema: pa.Schema, where: str) -> None:
    """Refuse a file written under another major version of the contract (or by something else)."""
    found = (schema.metadata or {}).get(VERSION_KEY)
    if found is None:
        raise DatasetError(f"{where}: not a resnet-labeler shard (no {VERSION_KEY.decode()} in its schema)")
    if found.decode().split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise DatasetError(f"{where}: schema version {found.decode()}, this reader knows {SCHEMA_VERSION}")


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A batch read from a shard file, as `schema`: a file written under an earlier minor version
    lacks the columns a later one added (nullable, by the rule above), so they come back null. A
    column of another type (another model's embedding) is refused, never cast."""
    columns = []
    for field in schema:
        if field.name not in batch.schema.names:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        found = batch.schema.field(field.name)
        if not found.equals(field):
            raise DatasetError(f"column {field.name} is {found.type}, the run's is {field.type}")
        columns.append(batch.column(field.name))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def records_to_table(
    records: Sequence[dict[str, Any]],
    spec: DatasetSpec,
    *,
    shard_id: str,
    worker: str,
    labeled_at: datetime,
) -> pa.Table:
    """One shard's records, in the order given, as a table of `dataset_schema(spec)`."""
    if labeled_at.tzinfo is None:
        raise DatasetError("labeled_at must carry a time zone (UTC is stored)")
    if not worker:
        raise DatasetError("worker must name the node that labeled the shard")
    columns: dict[str, list[Any]] = {name: [] for name in _RECORD_COLUMNS}
    for record in records:
        _append_record(columns, record, spec)
    n = len(records)
    embeddings = columns.pop("embedding")
    arrays: dict[str, Any] = dict(columns)
    if spec.embedding_size is not None:
        arrays["embedding"] = _embedding_array(embeddings, spec)
    arrays.update(
        model_sha256=[spec.model_sha256] * n,
        precision=[spec.precision] * n,
        worker=[worker] * n,
        labeled_at=[labeled_at.astimezone(UTC)] * n,
        shard_id=[shard_id] * n,
    )
    return pa.table(arrays, schema=dataset_schema(spec))


_RECORD_COLUMNS = [
    "path",
    "source_url",
    "source_key",
    "source_row",
    "source_version",
    "top1_index",
    "top1_label",
    "top1_score",
    "topk_index",
    "topk_label",
    "topk_score",
    "error_code",
    "error_message",
    "embedding",
]


def _append_record(columns: dict[str, list[Any]], record: dict[str, Any], spec: DatasetSpec) -> None:
    path = record.get("path")
    if not isinstance(path, str) or not path:
        raise DatasetError(f"a record needs a non-empty string path: {record!r:.200}")
    labels, error = record.get("labels"), record.get("error")
    if (labels is None) == (error is None):
        raise DatasetError(f"{path}: a record has either labels or an error, not both or neither")
    columns["path"].append(path)
    for name in SOURCE_COLUMNS:
        columns[name].append(record.get(name))
    if error is not None:
        for name in ("top1_index", "top1_label", "top1_score", "topk_index", "topk_label", "topk_score"):
            columns[name].append(None)
        if not isinstance(error.get("code"), str) or not error["code"]:
            raise DatasetError(f"{path}: an error record needs a code (ErrorCode, worker/records.py)")
        columns["error_code"].append(error["code"])
        columns["error_message"].append(error.get("message", ""))
        columns["embedding"].append(None)
        return
    if not labels:
        raise DatasetError(f"{path}: a labeled record needs at least one label")
    columns["top1_index"].append(labels[0]["index"])
    columns["top1_label"].append(labels[0]["label"])
    columns["top1_score"].append(labels[0]["score"])
    columns["topk_index"].append([item["index"] for item in labels])
    columns["topk_label"].append([item["label"] for item in labels])
    columns["topk_score"].append([item["score"] for item in labels])
    columns["error_code"].append(None)
    columns["error_message"].append(None)
    embedding = record.get("embedding")
    if (embedding is None) != (spec.embedding_size is None):
        want = (
            "needs an embedding"
            if spec.embedding_size is not None
            else "has an embedding, the run asked for none"
        )
        raise DatasetError(f"{path}: the record {want}")
    columns["embedding"].append(embedding)


def _embedding_array(rows: list[Any], spec: DatasetSpec) -> pa.Array:
    """Rows of floats (a worker's float32 `Embedding`s, or lists; None for error rows) as one
    fixed-size list array over a single contiguous block.

    Values are rounded to the 6 decimals records carry, in float64 before the one cast to the
    column's type, so the column holds what it held when records carried rounded lists (and a
    float16 column is not rounded twice). Rounding goes a chunk of rows at a time: a float64 copy
    of a whole 10,000-row shard would be 160 MiB."""
    size = spec.embedding_size
    assert size is not None
    block = np.zeros((len(rows), size), dtype=np.dtype(spec.embedding_dtype))
    valid = np.fromiter((row is not None for row in rows), dtype=bool, count=len(rows))
    for start in range(0, len(rows), _ROUNDING_ROWS):
        chunk = np.zeros((min(_ROUNDING_ROWS, len(rows) - start), size))
        for i, row in enumerate(rows[start : start + len(chunk)]):
            if row is not None:
                chunk[i] = _vector(row, size)
        block[start : start + len(chunk)] = np.round(chunk, 6, out=chunk)
    values = pa.array(block.reshape(-1))
    validity = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.Array.from_buffers(pa.list_(values.type, size), len(rows), [validity], children=[values])


_ROUNDING_ROWS = 512  # 8 MiB of float64 at 2048-d


def _vector(row: Any, size: int) -> np.ndarray:
    vector = np.asarray(row)
    if vector.shape != (size,):
        raise DatasetError(f"embedding of shape {vector.shape}, the run's feature size is {size}")
    return vector


def batch_to_records(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows of a shard file back as records of today's shape; scores and embeddings rounded to the
    6 decimals today's records carry (float32 holds those exactly enough to give them back)."""
    columns = {name: batch.column(name).to_pylist() for name in _READ_COLUMNS}
    embeddings = _embedding_rows(batch) if "embedding" in batch.schema.names else None
    sources = [name for name in SOURCE_COLUMNS if name in batch.schema.names]  # absent before 1.1
    source_values = {name: batch.column(name).to_pylist() for name in sources}
    records: list[dict[str, Any]] = []
    for i, path in enumerate(columns["path"]):
        origin = {name: source_values[name][i] for name in sources if source_values[name][i] is not None}
        code = columns["error_code"][i]
        if code is not None:
            records.append({"path": path, "error": {"code": code, "message": columns["error_message"][i]}} | origin)
            continue
        labels = [
            {"index": index, "label": label, "score": round(score, 6)}
            for index, label, score in zip(
                columns["topk_index"][i], columns["topk_label"][i], columns["topk_score"][i], strict=True
            )
        ]
        record: dict[str, Any] = {"path": path, "labels": labels}
        if embeddings is not None and embeddings[i] is not None:
            record["embedding"] = embeddings[i]
        records.append(record | origin)
    return records


_READ_COLUMNS = ["path", "topk_index", "topk_label", "topk_score", "error_code", "error_message"]


def _embedding_rows(batch: pa.RecordBatch) -> list[list[float] | None]:
    """The embedding column through one NumPy block: to_pylist() on 2048-d rows is ~10x slower."""
    column = batch.column("embedding")
    size = column.type.list_size
    start = column.offset * size
    block = column.values.slice(start, len(column) * size).to_numpy(zero_copy_only=False)
    rows = np.round(block.astype(np.float64).reshape(len(column), size), 6).tolist()
    valid = column.is_valid().to_pylist()
    return [row if ok else None for row, ok in zip(rows, valid, strict=True)]
