"""Model outputs -> result records: top-k labels with names and softmax scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.errors import ErrorCode


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """For each row, the k best classes, best first."""
    k = max(1, min(k, probabilities.shape[1]))
    if k < probabilities.shape[1]:
        candidates = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    else:
        candidates = np.tile(np.arange(probabilities.shape[1]), (probabilities.shape[0], 1))
    rows = []
    for row, idx in zip(probabilities, candidates, strict=True):
        order = idx[np.argsort(-row[idx], kind="stable")]
        rows.append([{"index": int(i), "label": classes[i], "score": round(float(row[i]), 6)} for i in order])
    return rows


def label_record(path: str, labels: list[dict[str, Any]], embedding: np.ndarray | None = None) -> dict:
    record: dict[str, Any] = {"path": path, "labels": labels}
    if embedding is not None:
        record["embedding"] = [round(float(v), 6) for v in embedding]
    return record


def error_record(path: str, code: str, message: str) -> dict:
    return {"path": path, "error": {"code": code, "message": message}}


def is_engine_failure(record: dict) -> bool:
    """An `inference_failed` record says the engine failed, not the image: it is never kept as the
    image's result (the image is retried: its job requeued, or `labeler run --resume`)."""
    return record.get("error", {}).get("code") == ErrorCode.INFERENCE_FAILED
