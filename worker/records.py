"""What a result record is: one per image, its labels or its error, and its compact JSON.

Every input gets exactly one record; a bad input gets an error record with one of the stable
`ErrorCode`s and never stops a batch, a worker or a run. The shape and the codes are part of the
result contract (README, docs/queue-contract.md), shared by the pipeline that makes records, the
stores that keep them and the client that exports them: never rename a code.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import numpy as np

Record = dict[str, Any]

# The keys a record carries back to its source (dataset schema 1.1 and 1.2, nullable columns): a
# container sample's shard file URL or path, its key (a tar's `__key__`, a Parquet file's own key
# column) and ordinal in the file (tar sample index, Parquet row index); and the version of the
# file, object or container that was read (worker/sources/version.py; null where nothing was read).
SOURCE_COLUMNS = ("source_url", "source_key", "source_row", "source_version")


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    NOT_A_FILE = "not_a_file"
    TOO_LARGE = "too_large"
    DECODE_FAILED = "decode_failed"
    OUTSIDE_ALLOWED_ROOTS = "outside_allowed_roots"
    INFERENCE_FAILED = "inference_failed"
    READ_FAILED = "read_failed"  # an object store kept failing after retries with backoff
    INTERNAL_ERROR = "internal_error"
    # Samples of container shards (WebDataset tars, Parquet image rows; worker/sources/):
    TRUNCATED = "truncated"  # the shard file ends inside this sample (a cut-short download or copy)
    CORRUPT = "corrupt"  # the shard file is damaged here (a tar header that fails its checksum)
    NO_IMAGE = "no_image"  # a sample without an image member, or a Parquet row with null image bytes
    DUPLICATE_KEY = "duplicate_key"  # a sample key seen before in the same shard file: one row each
    BAD_COLUMN = "bad_column"  # a Parquet image column of a type that holds no image bytes


class Embedding(np.ndarray):
    """A record's pooled features: float32, one array from the engine to the Parquet column.

    Rounding 2048 values into Python floats cost ~2 ms and ~65 KiB per image on the inference
    thread (bench/RESULTS.md, issue 18); as an array a record holds 8 KiB. Its JSON form (values
    rounded to 6 decimals, as records have always carried them) is made where a record becomes
    JSON: `compact_json`, and a Celery result through kombu's `__json__` hook."""

    @classmethod
    def of(cls, values: Any) -> Embedding:
        """A float32 copy the record owns (a runner may reuse its output buffers)."""
        return np.array(values, dtype=np.float32).view(cls)

    def __json__(self) -> list[float]:
        # Exactly [round(float(v), 6) for v in self]: a float32 times 1e6 (15625 * 2**6) is exact in
        # float64, so NumPy's multiply, round-half-even and divide round the exact value, as round() does.
        return np.round(self.astype(np.float64), 6).tolist()


def label_record(path: str, labels: list[dict[str, Any]], embedding: np.ndarray | None = None) -> Record:
    record: Record = {"path": path, "labels": labels}
    if embedding is not None:
        record["embedding"] = Embedding.of(embedding)
    return record


def error_record(path: str, code: str, message: str) -> Record:
    return {"path": path, "error": {"code": str(code), "message": message}}


def is_error(record: Record) -> bool:
    return "error" in record


def error_code(record: Record) -> str | None:
    """The record's error code; None for labels (and "unknown" for a malformed error)."""
    error = record.get("error")
    if error is None:
        return None
    return str(error.get("code", "unknown")) if isinstance(error, dict) else "unknown"


def is_engine_failure(record: Record) -> bool:
    """An `inference_failed` record says the engine failed, not the image: it is never kept as the
    image's result (the image is retried: its job requeued, or `labeler run --resume`)."""
    return error_code(record) == ErrorCode.INFERENCE_FAILED


def compact_json(value: object) -> str:
    """One line, no spaces, UTF-8 kept: the form records take in files, Redis and messages."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_form)


def _json_form(value: object) -> object:
    """What a value that is not JSON itself (an `Embedding`) is written as."""
    if isinstance(value, Embedding):
        return value.__json__()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
